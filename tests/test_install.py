"""setup.py declares everything grpo_megatron's code imports (the GPU install once ended in an ImportError
of mbridge, which only scripts/install_cpu.sh installed).

Static and fast: the requirements are read from setup.py and every third-party import in grpo_megatron/
is mapped to a distribution. The real install from scratch (fresh venv, `pip install .[cluster]`, import
everything) needs the network and runs in .ci/run: scripts/check_install.sh.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from check_imports import third_party_imports  # noqa: E402

sys.path.pop(0)
PACKAGE = REPO / "grpo_megatron"
# import name -> distribution, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "megatron": "megatron-core", "math_verify": "math-verify",
                 "transformer_engine": "transformer-engine", "torch.utils.tensorboard": "tensorboard"}


def setup_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """install_requires and extras_require of setup.py, as sets of distribution names."""
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("install_requires", "extras_require")}

    def names(specs):
        return {re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}
    return names(args["install_requires"]), {k: names(v) for k, v in args["extras_require"].items()}


def distribution(module: str) -> str:
    for prefix, dist in sorted(DISTRIBUTIONS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return dist
    return module.split(".")[0].replace("_", "-").lower()


def uncovered(imports, allowed: set[str]) -> list[str]:
    return sorted(f"{m} ({distribution(m)})" for m in imports if distribution(m) not in allowed)


def test_the_gpu_cluster_install_covers_every_import():
    """`pip install .[gpu,cluster]` (README's GPU install) brings every module the code ever imports."""
    base, extras = setup_requirements()
    imports = third_party_imports(PACKAGE.rglob("*.py"))
    assert uncovered(imports, base | extras["cluster"] | extras["gpu"]) == []


def test_a_bare_install_imports_the_trainer():
    """What loads with the modules (outside the SGLang client, behind the `sglang` extra) is in install_requires."""
    base, extras = setup_requirements()
    files = [f for f in PACKAGE.rglob("*.py") if "sglang" not in f.relative_to(PACKAGE).parts]
    eager = [m for m, at_import in third_party_imports(files).items() if at_import]
    assert uncovered(eager, base) == []
    sglang_client = third_party_imports((PACKAGE / "rollout" / "sglang").rglob("*.py"))
    assert uncovered([m for m, at_import in sglang_client.items() if at_import], base | extras["sglang"]) == []


def test_the_scan_sees_lazy_imports():
    imports = third_party_imports(PACKAGE.rglob("*.py"))
    assert imports["mbridge"] is False  # inside make_bridge
    assert imports["yaml"] is True


def test_package_main_modules_run_only_as_main():
    """scripts/check_imports.py imports every module of the package (pkgutil.walk_packages includes
    `__main__` modules): a `__main__.py` whose body runs its command exits the install check with its usage
    error, as `grpo_megatron/plan/__main__.py` once did in CI."""
    for main in PACKAGE.rglob("__main__.py"):
        body = ast.parse(main.read_text()).body
        acts = [node for node in body if not isinstance(node, (ast.Import, ast.ImportFrom, ast.If))
                and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
        guards = [node for node in body if isinstance(node, ast.If)]
        assert not acts, f"{main.relative_to(REPO)} runs code at import; put it under `if __name__ == \"__main__\":`"
        assert all(ast.unparse(g.test) == "__name__ == '__main__'" for g in guards), main
