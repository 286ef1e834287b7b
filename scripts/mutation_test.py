"""Mutation testing of the algorithms and of the training loss path: which small changes to the code
do the tests fail to notice?

    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_test.py                 # both areas
    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_test.py --area algorithms --only kl.py
    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_test.py --list          # the mutants, nothing run
    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_test.py --only policy_loss.py --functions resolve_clip

Prints every surviving mutant (file, line, function, diff) and the kill rate per file and per area:
killed / (total - equivalent), where the equivalent mutants are the ones listed in
docs/mutation_survivors.md (matched by file, function and diff, so line shifts do not matter).

Why a small AST mutator of its own rather than mutmut or cosmic-ray (both tried here with Python 3.11):
- mutmut 3.3.1 fails while collecting its coverage stats (`set_start_method('fork')`: "context has
  already been set" once torch is imported);
- mutmut 3.8.1 runs, but never mutates decorated functions, i.e. the registered GRPO / GSPO / GSPO-token
  surrogates and the KL estimators (the core of the math); it mutates whole files only, and most of its
  mutants are edits of error-message strings;
- cosmic-ray 8.4.4 mutates whole modules and runs each mutant in a fresh interpreter: 741 mutants for
  loop.py alone, each paying for the torch + megatron import and the trainer tests (hours here).
This script mutates only chosen functions (the loss path of training/), imports torch and megatron once
and forks one child per mutant, which runs only the tests mapped to the mutated file, one at a time.

Operators: arithmetic swaps (+ -, * /, // /, % //, ** *, & |), comparison swaps (boundary and negation),
and/or, dropping unary - / not / ~, numeric constants (c -> c + 1, c -> 0; 0 -> 1, -1), True/False,
min/max-style name swaps (min max, minimum maximum, amin amax, any all, clamp's min= max=), negated if
conditions, and statements replaced by `pass` (calls, raises, augmented assignments, attribute/item
writes and re-bindings such as `x = f(x)`). Strings, annotations, decorators and docstrings are left alone.

It never writes to the checkout it is run from: the tracked and untracked-but-not-ignored files are
copied to a scratch directory (--workdir, removed afterwards unless given), mutants are written there,
and the tests run there with that copy first on sys.path (and on PYTHONPATH for subprocesses).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SURVIVORS_DOC = "docs/mutation_survivors.md"

ALG_TESTS = ("tests/algorithms/test_policy_loss.py", "tests/algorithms/test_properties.py",
             "tests/algorithms/test_advantages_kl_dapo.py", "tests/algorithms/test_errors.py",
             "tests/algorithms/test_boundaries.py", "tests/algorithms/test_more_losses.py",
             "tests/algorithms/test_more_losses_edges.py")
NEW_LOSS_TESTS = ("tests/algorithms/test_more_losses_edges.py", "tests/algorithms/test_more_losses.py",
                  "tests/algorithms/test_errors.py",
                  "tests/algorithms/test_properties.py", "tests/training/test_covariance_loss_path.py")
"""The newer losses' own tests first: they kill most of their mutants within a second."""
LOSS_TESTS = ("tests/training/test_loss_path.py", "tests/training/test_batch.py", "tests/training/test_actor.py",
              "tests/training/test_covariance_loss_path.py", "tests/training/test_opd_loss_path.py")
"""Fast tests only: the trainer-level ones (test_trainer_math.py, test_loop.py) take minutes per mutant here."""


@dataclass(frozen=True)
class Target:
    """A file to mutate, the tests that cover it (fastest first: the first failure stops a run), and the
    functions (qualified names) to mutate; none: the whole file."""

    path: str
    area: str
    tests: tuple[str, ...]
    scopes: tuple[str, ...] = ()


def _alg(name: str, *extra: str) -> Target:
    return Target(f"grpo_megatron/algorithms/{name}", "algorithms", (*ALG_TESTS, *extra))


TARGETS = (
    _alg("advantages.py"),
    _alg("aggregation.py"),
    _alg("dapo.py"),
    _alg("kl.py"),
    _alg("policy_loss.py", "tests/algorithms/test_rollout_correction.py"),
    _alg("registry.py"),
    *(Target(f"grpo_megatron/algorithms/{name}", "algorithms", NEW_LOSS_TESTS)
      for name in ("is_weighted.py", "gmpo.py", "covariance.py", "token_selection.py", "loss_params.py")),
    Target("grpo_megatron/registry.py", "algorithms", ("tests/test_registry.py", *ALG_TESTS)),  # what config names resolve through
    Target("grpo_megatron/algorithms/evaluation.py", "algorithms",
           ("tests/algorithms/test_rollout_correction_edges.py", "tests/algorithms/test_rollout_correction.py")),
    Target("grpo_megatron/algorithms/rollout_correction.py", "algorithms",
           ("tests/algorithms/test_rollout_correction_edges.py", "tests/algorithms/test_rollout_correction.py",
            "tests/algorithms/test_boundaries.py",
            "tests/algorithms/test_errors.py")),
    Target("grpo_megatron/algorithms/logprobs.py", "algorithms",
           ("tests/algorithms/test_logprobs.py", "tests/algorithms/test_errors.py",
            "tests/algorithms/test_logprobs_tp.py")),
    Target("grpo_megatron/algorithms/opd.py", "algorithms",
           ("tests/algorithms/test_opd_vocab_parallel.py", "tests/algorithms/test_opd.py",
            "tests/training/test_opd_loss_path.py")),
    Target("grpo_megatron/training/opd.py", "loss_path", ("tests/training/test_opd_loss_path.py",),
           ("distillation_advantages", "topk_distillation_loss", "_student_topk_hook",
            "prepare_training_micro_batches", "score_with_teacher")),
    Target("grpo_megatron/training/batch.py", "loss_path", LOSS_TESTS, ("response_span", "_aligned", "make_micro_batch")),
    Target("grpo_megatron/samples.py", "loss_path", LOSS_TESTS, ("MicroBatch.num_response_tokens", "MicroBatch.to")),
    Target("grpo_megatron/training/mismatch.py", "loss_path",
           ("tests/training/test_loss_path.py", "tests/algorithms/test_rollout_correction.py", *LOSS_TESTS[1:])),
    Target("grpo_megatron/training/actor.py", "loss_path", LOSS_TESTS, ("Actor.train_step",)),
    Target("grpo_megatron/training/update_math.py", "loss_path", LOSS_TESTS,
           ("assign_advantages", "policy_loss_fn", "loss_mask", "select_minibatch_tokens", "old_logprobs_are_current")),
    Target("grpo_megatron/training/learner.py", "loss_path", LOSS_TESTS, ("Learner.update",)),
    Target("grpo_megatron/config/validation.py", "loss_path", ("tests/training/test_loss_config.py",), ("_validate_loss",)),
)

# ---------------------------------------------------------------------------------------------- mutations

_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
_COMPARE = {ast.Lt: (ast.LtE, ast.GtE), ast.LtE: (ast.Lt, ast.Gt), ast.Gt: (ast.GtE, ast.LtE),
            ast.GtE: (ast.Gt, ast.Lt), ast.Eq: (ast.NotEq,), ast.NotEq: (ast.Eq,), ast.Is: (ast.IsNot,),
            ast.IsNot: (ast.Is,), ast.In: (ast.NotIn,), ast.NotIn: (ast.In,)}
_SWAP_NAMES = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "amin": "amax",
               "amax": "amin", "any": "all", "all": "any"}

Mutation = tuple[str, Callable[[ast.AST], ast.AST]]
"""(operator name, function that edits a node in place or returns its replacement)."""


def _set(attr: str, value) -> Callable[[ast.AST], ast.AST]:
    def apply(node: ast.AST) -> ast.AST:
        setattr(node, attr, value)
        return node
    return apply


def _set_op(index: int, op: type) -> Callable[[ast.AST], ast.AST]:
    def apply(node: ast.Compare) -> ast.AST:
        node.ops[index] = op()
        return node
    return apply


def _rebinds(node: ast.Assign) -> bool:
    """True for `x = f(x)` and writes to attributes or items: dropping them leaves valid code."""
    names = {t.id for t in node.targets if isinstance(t, ast.Name)}
    reads = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
    return bool(names & reads) or any(isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets)


def _statement_mutations(node: ast.stmt) -> list[Mutation]:
    droppable = (isinstance(node, (ast.AugAssign, ast.Raise))
                 or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call))
                 or (isinstance(node, ast.Assign) and _rebinds(node)))
    mutations: list[Mutation] = [("drop statement", lambda n: ast.Pass())] if droppable else []
    if isinstance(node, ast.If):
        mutations.append(("negate condition", lambda n: _set("test", ast.UnaryOp(ast.Not(), n.test))(n)))
    return mutations


def _constant_mutations(value) -> list[Mutation]:
    if isinstance(value, bool):
        return [("flip bool", _set("value", not value))]
    if not isinstance(value, (int, float)):
        return []
    replacements = [type(value)(1), type(value)(-1)] if value == 0 else [value + 1, type(value)(0)]
    return [("constant", _set("value", v)) for v in replacements]


def mutations_of(node: ast.AST) -> list[Mutation]:
    """Every single-site mutation of `node` itself (not of its children)."""
    if isinstance(node, ast.stmt):
        return _statement_mutations(node)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOP:
        return [("arithmetic", _set("op", _BINOP[type(node.op)]()))]
    if isinstance(node, ast.Compare):
        return [("comparison", _set_op(i, new)) for i, op in enumerate(node.ops) for new in _COMPARE.get(type(op), ())]
    if isinstance(node, ast.BoolOp):
        return [("and/or", _set("op", ast.Or() if isinstance(node.op, ast.And) else ast.And()))]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
        return [("drop unary", lambda n: n.operand)]
    if isinstance(node, ast.Constant):
        return _constant_mutations(node.value)
    if isinstance(node, ast.Name) and node.id in _SWAP_NAMES:
        return [("swap name", _set("id", _SWAP_NAMES[node.id]))]
    if isinstance(node, ast.Attribute) and node.attr in _SWAP_NAMES:
        return [("swap name", _set("attr", _SWAP_NAMES[node.attr]))]
    if isinstance(node, ast.keyword) and node.arg in ("min", "max"):
        return [("swap name", _set("arg", _SWAP_NAMES[node.arg]))]
    return []


_SKIPPED_FIELDS = {"annotation", "returns", "decorator_list", "type_comment"}


def _skipped(node: ast.AST) -> bool:
    """Imports, docstrings, f-strings (messages) and logging calls are not mutated."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return True
    logging_call = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "logger")
    return logging_call or isinstance(node, (ast.Import, ast.ImportFrom, ast.JoinedStr))


def _children(node: ast.AST) -> Iterator[ast.AST]:
    for name, value in ast.iter_fields(node):
        if name in _SKIPPED_FIELDS:
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                yield child


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """Functions and classes by qualified name (`Trainer._loss_fn`)."""
    found: dict[str, ast.AST] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found[prefix + child.name] = child
                visit(child, f"{prefix}{child.name}.")
    visit(tree, "")
    return found


Site = tuple[str, ast.AST, list[ast.AST]]
"""(qualified name of the enclosing function, node, its ancestors up to the function or module)."""


def _sites(tree: ast.Module, scopes: tuple[str, ...]) -> list[Site]:
    """Every node that can be mutated, in a fixed order (a mutant is named by its index here)."""
    if not scopes:
        return [site for stmt in tree.body for site in _sites_under("", stmt, [tree])]
    defs = _definitions(tree)
    missing = [s for s in scopes if s not in defs]
    if missing:
        raise SystemExit(f"functions not found (renamed?): {missing}")
    return [site for s in scopes for child in defs[s].body for site in _sites_under(s, child, [defs[s]])]


def _sites_under(scope: str, node: ast.AST, ancestors: list[ast.AST]) -> Iterator[Site]:
    if _skipped(node):
        return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):  # body only: no signature
        inner = f"{scope}.{node.name}" if scope else node.name
        for child in node.body:
            yield from _sites_under(inner, child, [*ancestors, node])
        return
    yield scope or "<module>", node, ancestors
    for child in _children(node):
        yield from _sites_under(scope, child, [*ancestors, node])


@dataclass
class Mutant:
    path: str
    area: str
    scope: str
    line: int
    operator: str
    before: str
    after: str
    source: str = field(repr=False)

    @property
    def digest(self) -> str:
        """Names this exact mutant of this exact file version (the cache key)."""
        return hashlib.sha256(f"{self.path}\0{self.source}".encode()).hexdigest()

    @property
    def key(self) -> tuple[str, str, str]:
        """How docs/mutation_survivors.md names it: stable when lines move."""
        return self.path, self.scope, f"`{self.before}` -> `{self.after}`"


def _context(node: ast.AST, ancestors: list[ast.AST]) -> ast.AST:
    """What a diff shows: the enclosing simple statement, or the header part of a compound one."""
    chain = [*ancestors, node]
    for i in range(len(chain) - 1, -1, -1):
        if isinstance(chain[i], ast.stmt):
            if not hasattr(chain[i], "body") or i == len(chain) - 1:
                return chain[i]
            return chain[i + 1]
    return node


def _replace(parent: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for name, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, name, new)
            return
        if isinstance(value, list) and any(v is old for v in value):
            value[[i for i, v in enumerate(value) if v is old][0]] = new
            return
    raise AssertionError("node not found in its parent")


def _one_line(node: ast.AST) -> str:
    text = ast.unparse(node) if not isinstance(node, ast.stmt) or not hasattr(node, "body") else \
        ast.unparse(node).splitlines()[0]
    return re.sub(r"\s+", " ", text)


def enumerate_mutants(target: Target, text: str) -> list[Mutant]:
    """Every mutant of `target` (with its full mutated source), skipping those that unparse unchanged."""
    original = ast.unparse(ast.parse(text))
    probes = _sites(ast.parse(text), target.scopes)
    mutants = []
    for index, (_, probe, _) in enumerate(probes):
        for m in range(len(mutations_of(probe))):
            tree = ast.parse(text)
            scope, node, ancestors = _sites(tree, target.scopes)[index]
            context = _context(node, ancestors)
            before = _one_line(context)
            operator, apply = mutations_of(node)[m]
            new = apply(node)
            if new is not node:
                _replace(ancestors[-1], node, new)
            after = _one_line(new if context is node else context)
            source = ast.unparse(ast.fix_missing_locations(tree))
            if source != original:
                mutants.append(Mutant(target.path, target.area, scope, node.lineno, operator, before, after, source))
    return mutants


# ---------------------------------------------------------------------------------------------- running

def copy_checkout(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files of this checkout, copied to `dest`."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(workdir: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    """Run `tests` in a forked child (stopping at the first failure): 'passed', 'failed' or 'timeout'."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: quiet pytest in the scratch copy
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest
        code = pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                            f"--basetemp={workdir / '.pytest_tmp'}"])
        os._exit(int(code))
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        elapsed = time.perf_counter() - start
        if done:
            return ("passed" if os.waitstatus_to_exitcode(status) == 0 else "failed"), elapsed
        if elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", elapsed
        time.sleep(0.02)


def prepare_process(workdir: Path) -> None:
    """Import the heavy dependencies once (children inherit them) and point imports at the copy."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(workdir))
    os.chdir(workdir)
    with warnings.catch_warnings():  # megatron warns about missing optional kernels
        warnings.simplefilter("ignore")
        import megatron.core.optimizer  # noqa: F401  (imported for the children)
        import pytest  # noqa: F401
        import torch  # noqa: F401


def equivalent_keys(doc: Path) -> set[tuple[str, str, str]]:
    """Rows `| file | function | `before` -> `after` | why |` of the survivors document (a `|` inside the
    code is written `\\|`)."""
    if not doc.exists():
        return set()
    keys = set()
    for line in doc.read_text().splitlines():
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) >= 4 and cells[0].endswith(".py") and " -> " in cells[2]:
            keys.add((cells[0], cells[1], cells[2]))
    return keys


def run_target(workdir: Path, target: Target, mutants: list[Mutant], timeout_factor: float,
               cache: dict[str, str], save: Callable[[], None], equivalent: set) -> dict[str, list[Mutant]]:
    """Run every mutant of `target` that `cache` does not record as killed, or as surviving and listed as
    equivalent (no test can kill those); prints survivors as they are found."""
    def settled(m: Mutant) -> bool:
        known = cache.get(m.digest)
        return known == "killed" or (known == "survived" and m.key in equivalent)

    pending = [m for m in mutants if not settled(m)]
    path = workdir / target.path
    text = path.read_text()
    baseline = 0.0
    try:
        if pending:  # the baseline runs the unparsed original, with the same tests
            path.write_text(ast.unparse(ast.parse(text)))
            status, baseline = run_tests(workdir, target.tests, timeout=1800)
            if status != "passed":
                raise SystemExit(f"{target.path}: the tests fail without any mutation ({status}); fix that first")
        for mutant in pending:
            path.write_text(mutant.source)
            status, _ = run_tests(workdir, target.tests, max(60.0, timeout_factor * baseline))
            cache[mutant.digest] = "survived" if status == "passed" else "killed"
            save()
            if cache[mutant.digest] == "survived" and mutant.key not in equivalent:
                print(_describe(mutant), flush=True)
    finally:
        path.write_text(text)
    outcome: dict[str, list[Mutant]] = {"killed": [], "survived": []}
    for mutant in mutants:
        outcome[cache[mutant.digest]].append(mutant)
    print(f"  {target.path}: {len(mutants)} mutants, {len(pending)} run, baseline {baseline:.1f} s, "
          f"{len(outcome['survived'])} survived", flush=True)
    return outcome


def _describe(m: Mutant) -> str:
    return f"SURVIVED {m.path}:{m.line} ({m.scope}) [{m.operator}]\n  - {m.before}\n  + {m.after}"


def report(results: dict[str, dict[str, list[Mutant]]], equivalent: set, elapsed: float) -> None:
    print("\nSurviving mutants (not listed as equivalent):")
    for path, outcome in results.items():
        for m in outcome["survived"]:
            if m.key not in equivalent:
                row = " | ".join(k.replace("|", "\\|") for k in m.key)
                print(f"{_describe(m)}\n  row for {SURVIVORS_DOC} if equivalent: | {row} | why |")
    rows = {}
    for path, outcome in results.items():
        area = (outcome["killed"] + outcome["survived"])[0].area if outcome["killed"] + outcome["survived"] else "?"
        eq = sum(m.key in equivalent for m in outcome["survived"])
        counts = (len(outcome["killed"]) + len(outcome["survived"]), len(outcome["killed"]), eq,
                  len(outcome["survived"]) - eq)
        rows[path] = (area, counts)
    print(f"\n{'file':48} {'total':>6} {'killed':>6} {'equiv':>6} {'surv':>6} {'kill rate':>9}")
    for area in sorted({a for a, _ in rows.values()}):
        totals = [0, 0, 0, 0]
        for path, (a, counts) in rows.items():
            if a == area:
                totals = [t + c for t, c in zip(totals, counts)]
                print(f"{path:48} {counts[0]:6} {counts[1]:6} {counts[2]:6} {counts[3]:6} {_rate(counts):>9}")
        print(f"{'AREA ' + area:48} {totals[0]:6} {totals[1]:6} {totals[2]:6} {totals[3]:6} {_rate(totals):>9}\n")
    print(f"run time {elapsed / 60:.1f} min")


def _rate(counts) -> str:
    total, killed, equivalent, _ = counts
    return f"{100 * killed / max(total - equivalent, 1):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--area", choices=("algorithms", "loss_path"), help="only this area")
    parser.add_argument("--only", nargs="*", default=[], help="only files whose path ends with one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--workdir", type=Path, help="scratch copy of the checkout (default: a temporary one)")
    parser.add_argument("--tests", nargs="*", default=[], help="run these tests instead of each file's map: a mutant "
                        "they kill is killed by the map too; one they miss may not be (a lower bound on the kill rate)")
    parser.add_argument("--cache", type=Path, help="JSON of earlier outcomes: mutants it records as killed are not "
                        "rerun (valid while tests were only added since; a changed file makes new mutants)")
    parser.add_argument("--timeout-factor", type=float, default=5.0, help="mutant timeout / baseline test time")
    parser.add_argument("--functions", nargs="*", default=[], help="only mutants inside these functions (qualified "
                        "names, e.g. resolve_clip select_minibatch_tokens): the changed code of a file already measured")
    args = parser.parse_args()
    targets = [replace(t, tests=tuple(args.tests) or t.tests) for t in TARGETS if (args.area in (None, t.area))
               and (not args.only or any(t.path.endswith(o) for o in args.only))]
    mutants = {t.path: [m for m in enumerate_mutants(t, (REPO / t.path).read_text())
                        if not args.functions or m.scope in args.functions] for t in targets}
    if args.list:
        for m in (m for ms in mutants.values() for m in ms):
            print(f"{m.path}:{m.line} ({m.scope}) [{m.operator}] {m.before}  ->  {m.after}")
        print(f"{sum(map(len, mutants.values()))} mutants")
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mutation_"))
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    equivalent = equivalent_keys(REPO / SURVIVORS_DOC)

    def save() -> None:
        if args.cache:
            args.cache.write_text(json.dumps(cache))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # still restore files and clean up
    start = time.perf_counter()
    results = {}
    try:
        copy_checkout(workdir)
        prepare_process(workdir)
        for target in targets:
            results[target.path] = run_target(workdir, target, mutants[target.path], args.timeout_factor, cache, save,
                                              equivalent)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, equivalent, time.perf_counter() - start)


if __name__ == "__main__":
    main()
