#!/usr/bin/env python
"""Import every module of grpo_megatron and every third-party module its code imports, lazily or not.

Run by scripts/check_install.sh inside a fresh install, outside the source tree, so an ImportError here is
one a user would hit at some point of a run (a lazy `import mbridge` inside a function fails only when a
model is built). `third_party_imports` is also what tests/test_install.py checks setup.py against.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from collections.abc import Iterable
from pathlib import Path

# Needs a CUDA build; installed by the `gpu` extra on GPU machines only.
GPU_ONLY = {"transformer_engine"}


def third_party_imports(files: Iterable[Path], package: str = "grpo_megatron") -> dict[str, bool]:
    """Imported module (dotted, as written) -> whether some import of it runs when its module is imported
    (a statement at module level, not inside a function or an `except ImportError` fallback)."""
    found: dict[str, bool] = {}
    for file in sorted(files):
        tree = ast.parse(file.read_text(), str(file))
        eager = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in (package, "__future__"):
                    found[name] = found.get(name, False) or id(node) in eager
    return found


def main() -> int:
    import grpo_megatron

    package_dir = Path(grpo_megatron.__file__).parent
    modules = [m.name for m in pkgutil.walk_packages(grpo_megatron.__path__, "grpo_megatron.")]
    imports = third_party_imports(package_dir.rglob("*.py"))
    modules += [name for name in imports if name.split(".")[0] not in GPU_ONLY]
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed.append(f"{name}: {exc}")
    print(f"imported {len(modules) - len(failed)} of {len(modules)} modules from {package_dir}")
    for line in failed:
        print(f"error: cannot import {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
