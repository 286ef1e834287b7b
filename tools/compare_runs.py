#!/usr/bin/env python
"""Compare training runs: aligned plots and a Markdown summary table from each run's metrics and config.

    python tools/compare_runs.py runs/stability/cpu/*/seed* --output runs/stability/cpu/compare

Reads RUN_DIR/metrics.jsonl (one JSON object per step, "step" key) and RUN_DIR/config.yaml (the resolved
config). Writes to OUTPUT: one PNG per panel (each metric against step and against tokens consumed, the
cumulative `rollout/tokens`), summary.md (per-run and per-arm tables, config differences, warnings) and
summary.json (the same numbers). Runs whose configs differ only in run_dir and train.seed form one arm.

Definitions used in the table:
  final / best acc   last / highest value of --accuracy-metric (default eval/accuracy, greedy held-out)
  steps to target    first step at which the accuracy metric reaches --target (tokens: rollout tokens by then)
  loss / grad spikes steps whose |train/pg_loss| (|train/grad_norm|) exceeds --spike-factor times both the
                     median of the previous --spike-window steps' values (at least half a window of them, so
                     the first steps are never spikes) and the run's median: the second condition keeps
                     the noise of a converged run, whose typical values are tiny, from counting
  max acc drop       largest fall of the accuracy metric below its best value so far (a collapse measure)
  NaN steps          steps with any non-finite number in their metrics
  means              over the steps where the metric is present and finite; the mismatch columns (train vs
                     rollout log-prob diff, ratio outside 2x, rollout-train routing agreement, and the
                     rollout_correction/* chi-square, ESS before/after, truncated / masked / rejected
                     fractions and IS weights) appear only when some run logged them
Runs with different metric sets or lengths are compared anyway, with a warning; a run directory without
metrics is an error.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
# where a run wrote and which server addresses it was handed: never part of what the run did
IGNORED_CONFIG_KEYS = ("run_dir", "rollout.sglang.urls")
SEED_KEY = "train.seed"
# panel name -> (metrics, log-scale y); a panel is drawn when at least one run has one of its metrics
PANELS: dict[str, tuple[tuple[str, ...], bool]] = {
    "accuracy": (("reward/accuracy", "eval/accuracy"), False),
    "clip_fraction": (("train/clip_frac_tokens", "train/clip_frac_seqs"), True),
    "train_rollout": (("train_rollout/k3_kl", "train_rollout/logprob_abs_diff", "train_rollout/ratio_outside_2x"),
                      True),
    # the mismatch correction (algorithms/rollout_correction.py): old-vs-rollout divergence, ESS, what was cut
    "rollout_correction_divergence": (("rollout_correction/chi2_token", "rollout_correction/chi2_seq"), True),
    "rollout_correction_ess": (("rollout_correction/ess_raw", "rollout_correction/ess"), False),
    "rollout_correction_weights": (("rollout_correction/frac_truncated", "rollout_correction/frac_masked",
                                    "rollout_correction/frac_rejected", "rollout_correction/weight_max"), False),
    "policy_drift": (("train/approx_kl_old", "train/ratio_max"), True),
    "routing": (("routing/agree_old_current", "routing/agree_rollout_train"), False),
    "grad_norm": (("train/grad_norm",), True),
    "entropy": (("train/entropy",), False),
    "response_length": (("response/length_mean",), False),
}
SPIKE_COLUMNS = {"loss spikes": "train/pg_loss", "grad spikes": "train/grad_norm"}
MEAN_COLUMNS = {  # summary column -> metric averaged over steps
    "clip frac (tokens)": "train/clip_frac_tokens",
    "clip frac (seqs)": "train/clip_frac_seqs",
    "KL old-current": "train/approx_kl_old",
    "KL train-rollout (k3)": "train_rollout/k3_kl",
    "routing agree old-current": "routing/agree_old_current",
}
OPTIONAL_MEAN_COLUMNS = {  # like MEAN_COLUMNS, but a table shows them only when some run logged the metric
    "logprob diff train-rollout": "train_rollout/logprob_abs_diff",
    "ratio outside 2x train-rollout": "train_rollout/ratio_outside_2x",
    "routing agree rollout-train": "routing/agree_rollout_train",
    "chi2 token": "rollout_correction/chi2_token",
    "chi2 seq": "rollout_correction/chi2_seq",
    "ESS raw": "rollout_correction/ess_raw",
    "ESS corrected": "rollout_correction/ess",
    "frac truncated": "rollout_correction/frac_truncated",
    "frac masked": "rollout_correction/frac_masked",
    "frac rejected": "rollout_correction/frac_rejected",
    "IS weight mean": "rollout_correction/weight_mean",
    "IS weight max": "rollout_correction/weight_max",
}


class RunError(ValueError):
    """A run directory that cannot be compared; the message names it."""


class RunMismatchWarning(UserWarning):
    """Runs that differ in metric sets or lengths: compared on what they share."""


@dataclass
class Run:
    path: Path
    records: dict[int, dict]  # step -> metrics of that step
    config: dict  # flattened resolved config (dotted keys)
    name: str = ""
    arm: str = ""
    tokens: dict[int, float] = field(default_factory=dict)  # step -> cumulative rollout tokens

    @property
    def steps(self) -> list[int]:
        return sorted(self.records)

    @property
    def metric_names(self) -> set[str]:
        return {k for record in self.records.values() for k in record if k != "step"}

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """Steps and values of one metric, where present and numeric (NaN kept: the plot shows a gap)."""
        pairs = [(s, float(r[metric])) for s, r in sorted(self.records.items())
                 if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
        return [s for s, _ in pairs], [v for _, v in pairs]


def flatten(tree: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_run(path: Path) -> Run:
    """One run directory -> Run; a missing or empty metrics file is a RunError naming the directory."""
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise RunError(f"{path}: no {METRICS_FILE} (not a run directory, or the run has not logged a step)")
    records: dict[int, dict] = {}
    for number, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{metrics}:{number}: not JSON ({exc})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RunError(f"{metrics}:{number}: a metrics line needs a \"step\" key")
        records.setdefault(int(record["step"]), {}).update(record)
    if not records:
        raise RunError(f"{path}: {METRICS_FILE} is empty")
    config_path = path / CONFIG_FILE
    config = flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    if not config:
        warnings.warn(f"{path}: no {CONFIG_FILE}; its config differences are unknown", RunMismatchWarning)
    run = Run(path=path, records=records, config=config)
    total = 0.0
    for step in run.steps:
        total += float(records[step].get("rollout/tokens", 0) or 0)
        run.tokens[step] = total
    return run


def name_runs(runs: list[Run], ignored: tuple[str, ...] = IGNORED_CONFIG_KEYS) -> None:
    """Run names: paths relative to the runs' common parent; arms: runs equal in config but the ignored keys
    (run_dir, server URLs, --ignore-config) and the seed."""
    paths = [run.path.resolve() for run in runs]
    root = Path(os.path.commonpath(paths))
    if root in paths:  # one run, or a run inside another's directory: name it by its own last part
        root = root.parent
    arms: dict[tuple, list[Run]] = {}
    for run, path in zip(runs, paths):
        run.name = str(path.relative_to(root))
        key = tuple(sorted((k, repr(v)) for k, v in run.config.items() if k not in (*ignored, SEED_KEY)))
        arms.setdefault(key, []).append(run)
    for members in arms.values():
        parts = [Path(run.name).parts for run in members]
        common = [p[0] for p in zip(*parts) if len(set(p)) == 1]
        label = "/".join(common) if common and len(members) > 1 else members[0].name
        for run in members:
            run.arm = label


def check_alignment(runs: list[Run]) -> list[str]:
    """Warnings for metric sets and lengths that differ between runs (then compared on what they share)."""
    notes = []
    union = set().union(*(run.metric_names for run in runs))
    lacking: dict[tuple[str, ...], list[str]] = {}  # missing metrics -> runs missing them (one note each)
    for run in runs:
        missing = tuple(sorted(m for m in union - run.metric_names if "/layer_" not in m))
        if missing:
            lacking.setdefault(missing, []).append(run.name)
    for missing, names in lacking.items():
        notes.append(f"{', '.join(names)} {'lacks' if len(names) == 1 else 'lack'} {len(missing)} metric(s) other "
                     f"runs have: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    lengths = {run.name: run.steps[-1] for run in runs}
    if len(set(lengths.values())) > 1:
        notes.append("runs end at different steps: " + ", ".join(f"{n}={s}" for n, s in lengths.items()))
    for note in notes:
        warnings.warn(note, RunMismatchWarning)
    return notes


def finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def count_spikes(values: list[float], factor: float, window: int) -> int:
    """Steps with |value| above factor x both the median |value| of the previous `window` steps and the run's."""
    magnitudes = [abs(v) for v in values]
    run_median = statistics.median(finite(magnitudes)) if finite(magnitudes) else math.inf
    spikes = 0
    for i, value in enumerate(magnitudes):
        history = finite(magnitudes[max(0, i - window):i])
        if (math.isfinite(value) and len(history) >= max(1, window // 2)
                and value > factor * statistics.median(history) and value > factor * run_median):
            spikes += 1
    return spikes


def max_drop(values: list[float]) -> float:
    """Largest fall below the running maximum."""
    best, drop = -math.inf, 0.0
    for value in values:
        best = max(best, value)
        drop = max(drop, best - value)
    return drop


def summarize(run: Run, args: argparse.Namespace) -> dict:
    """The table row of one run (None where the metric is absent)."""
    acc_steps, acc = run.series(args.accuracy_metric)
    reached = [(s, v) for s, v in zip(acc_steps, acc) if math.isfinite(v) and v >= args.target]
    rl_steps = [s for s in run.steps if any(k.startswith("train/") for k in run.records[s])]
    row = {
        "run": run.name,
        "arm": run.arm,
        "steps": rl_steps[-1] if rl_steps else 0,
        "tokens": run.tokens[run.steps[-1]],
        "final acc": acc[-1] if acc else None,
        "best acc": max(finite(acc)) if finite(acc) else None,
        "max acc drop": max_drop(finite(acc)) if finite(acc) else None,
        "steps to target": reached[0][0] if reached else None,
        "tokens to target": run.tokens[reached[0][0]] if reached else None,
        **{column: count_spikes(run.series(metric)[1], args.spike_factor, args.spike_window)
           if run.series(metric)[0] else None for column, metric in SPIKE_COLUMNS.items()},
        "NaN steps": sum(1 for r in run.records.values() if any(
            isinstance(v, float) and not math.isfinite(v) for v in r.values())),
    }
    for column, metric in {**MEAN_COLUMNS, **OPTIONAL_MEAN_COLUMNS}.items():
        values = finite(run.series(metric)[1])
        row[column] = statistics.fmean(values) if values else None
    return row


def summarize_arms(rows: list[dict]) -> list[dict]:
    """Mean over each arm's runs (seeds); counts summed; clip fraction also relative to the least-clipping arm."""
    arms: dict[str, list[dict]] = {}
    for row in rows:
        arms.setdefault(row["arm"], []).append(row)
    out = []
    for arm, members in arms.items():
        merged: dict = {"arm": arm, "runs": len(members)}
        for column in rows[0]:
            if column in ("run", "arm"):
                continue
            values = [m[column] for m in members if m[column] is not None]
            if column in (*SPIKE_COLUMNS, "NaN steps"):
                merged[column] = sum(values) if values else None
            elif column in ("steps to target", "tokens to target"):
                merged[column] = statistics.fmean(values) if len(values) == len(members) else None
                merged[f"{column} reached"] = f"{len(values)}/{len(members)}"
            else:
                merged[column] = statistics.fmean(values) if values else None
                if len(values) > 1 and column in ("final acc", "best acc"):
                    merged[f"{column} std"] = statistics.stdev(values)
        out.append(merged)
    clips = [a["clip frac (tokens)"] for a in out if a["clip frac (tokens)"]]
    for arm in out:
        value = arm["clip frac (tokens)"]
        arm["clip frac / lowest"] = value / min(clips) if value is not None and clips else None
    return out


def config_differences(runs: list[Run], ignored: tuple[str, ...] = IGNORED_CONFIG_KEYS) -> dict[str, list]:
    keys = sorted(set().union(*(run.config for run in runs)) - set(ignored))
    return {k: [run.config.get(k, "—") for run in runs] for k in keys
            if len({repr(run.config.get(k, "—")) for run in runs}) > 1}


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e10:
            return f"{value:.4g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def write_summary(out: Path, runs: list[Run], rows: list[dict], arms: list[dict], notes: list[str],
                  args: argparse.Namespace) -> str:
    absent = {c for c in OPTIONAL_MEAN_COLUMNS if all(row[c] is None for row in rows)}
    run_cols = [c for c in rows[0] if c != "arm" and c not in absent]
    arm_cols = ["arm", "runs", "steps", "tokens", "final acc", "final acc std", "best acc", "max acc drop",
                "steps to target",
                "steps to target reached", *SPIKE_COLUMNS, "NaN steps", *MEAN_COLUMNS, "clip frac / lowest",
                *(c for c in OPTIONAL_MEAN_COLUMNS if c not in absent)]
    lines = ["# Run comparison", "",
             f"Accuracy metric `{args.accuracy_metric}`, target {args.target}. Spikes: steps whose |value| of "
             + " / ".join(f"`{m}`" for m in SPIKE_COLUMNS.values())
             + f" exceeds {args.spike_factor}x both the median of the previous {args.spike_window} steps and the "
             "run's median. Means are over steps.", "",
             "## Per arm (mean over its runs; spikes and NaN steps summed)", "", *markdown_table(arms, arm_cols),
             "", "## Per run", "", *markdown_table(rows, run_cols), "", "## Config differences", ""]
    diffs = config_differences(runs, ignored_keys(args))
    if diffs:
        lines += markdown_table([{"key": k, **{r.name: v for r, v in zip(runs, vals)}} for k, vals in diffs.items()],
                                ["key", *[r.name for r in runs]])
    else:
        lines.append("The configs are identical (apart from run_dir).")
    if notes:
        lines += ["", "## Warnings", "", *[f"- {n}" for n in notes]]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"runs": rows, "arms": arms, "config_differences": diffs,
                                                  "warnings": notes}, indent=1, default=str))
    return text


def plot_panels(out: Path, runs: list[Run]) -> list[Path]:
    """One PNG per panel: a row per metric, against step (left) and tokens consumed (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arm_names = list(dict.fromkeys(run.arm for run in runs))
    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arm_names)}
    written = []
    for panel, (metrics, log_y) in PANELS.items():
        present = [m for m in metrics if any(run.series(m)[0] for run in runs)]
        if not present:
            continue
        fig, axes = plt.subplots(len(present), 2, figsize=(10, 2.8 * len(present)), squeeze=False)
        for row, metric in enumerate(present):
            labelled: set[str] = set()
            for run in runs:
                steps, values = run.series(metric)
                if not steps:
                    continue
                style = dict(color=colors[run.arm], lw=1, alpha=0.8,
                             label=None if run.arm in labelled else run.arm,
                             marker="o" if metric.startswith("eval/") else None, ms=3)
                labelled.add(run.arm)
                axes[row][0].plot(steps, values, **style)
                axes[row][1].plot([run.tokens[s] for s in steps], values, **{**style, "label": None})
            for col, xlabel in enumerate(("step", "rollout tokens consumed")):
                ax = axes[row][col]
                ax.set_xlabel(xlabel)
                ax.set_ylabel(metric, fontsize=8)
                ax.grid(alpha=0.3)
                if log_y and any(v > 0 for run in runs for v in finite(run.series(metric)[1])):
                    ax.set_yscale("log", nonpositive="mask")  # zeros (nothing clipped) leave gaps
            axes[row][0].legend(fontsize=7)
        fig.suptitle(panel.replace("_", " "))
        fig.tight_layout()
        path = out / f"{panel}.png"
        save_small_png(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def save_small_png(fig, path: Path) -> None:
    """A 256-colour palette PNG: a third of the size of matplotlib's RGBA, so the plots can be committed."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=70)
    buffer.seek(0)
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)


def ignored_keys(args: argparse.Namespace) -> tuple[str, ...]:
    return (*IGNORED_CONFIG_KEYS, *getattr(args, "ignore_config", []))


def step_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition(":")
    try:
        return int(first or 0), int(last) if last else 2**62
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use FIRST:LAST, e.g. 1:30 or 40:") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--output", type=Path, required=True, help="directory for the PNGs and summary.md/json")
    parser.add_argument("--accuracy-metric", default="eval/accuracy")
    parser.add_argument("--target", type=float, default=0.9, help="accuracy for 'steps to target'")
    parser.add_argument("--steps", type=step_range, default=None, metavar="FIRST:LAST",
                        help="summarize and plot only these steps (inclusive; tokens still count from step 0)")
    parser.add_argument("--spike-factor", type=float, default=5.0)
    parser.add_argument("--spike-window", type=int, default=10)
    parser.add_argument("--ignore-config", action="append", default=[], metavar="KEY",
                        help="a dotted config key that does not split arms (repeatable; run_dir and "
                             "rollout.sglang.urls always ignored), e.g. rollout.sglang.probe_tolerance")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [load_run(path) for path in args.run_dirs]
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.steps:
        for run in runs:
            run.records = {s: r for s, r in run.records.items() if args.steps[0] <= s <= args.steps[1]}
            if not run.records:
                print(f"error: {run.path}: no metrics in steps {args.steps[0]}..{args.steps[1]}", file=sys.stderr)
                return 2
    name_runs(runs, ignored_keys(args))
    notes = check_alignment(runs)
    rows = [summarize(run, args) for run in runs]
    args.output.mkdir(parents=True, exist_ok=True)
    text = write_summary(args.output, runs, rows, summarize_arms(rows), notes, args)
    plots = plot_panels(args.output, runs)
    print(text)
    print(f"wrote {args.output / 'summary.md'} and {len(plots)} plots to {args.output}")
    return 0


if __name__ == "__main__":
    warnings.simplefilter("always", RunMismatchWarning)
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"
    sys.exit(main())
