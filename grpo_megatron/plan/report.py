"""The plan as a text table (per GPU, per phase) and as one JSON object."""
from __future__ import annotations

from grpo_megatron.plan import constants
from grpo_megatron.plan.planner import Plan

GiB = constants.GiB


def _gib(value: int | float) -> str:
    return f"{value / GiB:.2f}"


def _verdict(plan: Plan) -> str:
    if plan.fits:
        return "FITS"
    if plan.fix is not None:
        return f"DOES NOT FIT; fix: {plan.fix.change}"
    return "DOES NOT FIT; no single change found (try a larger allocation or a smaller model/sequence)"


def to_text(plan: Plan) -> str:
    job, lines = plan.job, []
    layout = job.layout
    lines.append(f"model {job.shapes.name} ({job.shapes.total_params() / 1e9:.1f}B params, shapes from "
                 f"{job.shapes.source})")
    lines.append(f"allocation {job.alloc.describe()}; trainer world {job.world}: TP{layout.tensor_parallel} "
                 f"PP{layout.pipeline_parallel} EP{layout.expert_parallel} ETP{layout.etp} CP{layout.context_parallel} "
                 f"DP{job.dp}")
    lines.append(f"micro-batch {job.micro_batch_rows} x {job.sequence} tokens (prompt {job.prompt_tokens} from "
                 f"{job.prompt_source} + response {job.cfg.rollout.max_new_tokens}), {job.micro_batches} per optimizer "
                 f"step per DP rank, recompute {'on' if job.cfg.model.recompute_activations else 'off'}")
    lines.append("")
    lines.append("per GPU (GiB)     " + "".join(f"{r.position.label:>28}" for r in plan.ranks))
    rows = [("rank", lambda r: str(r.position.rank)),
            ("dense params", lambda r: f"{r.rank.dense_params / 1e6:.1f}M"),
            ("expert params", lambda r: f"{r.rank.expert_params / 1e6:.1f}M"),
            ("params", lambda r: _gib(r.rank.param_bytes)),
            ("grad buffers", lambda r: _gib(r.rank.grad_bytes)),
            ("optimizer state", lambda r: _gib(r.rank.optimizer_bytes)),
            ("static (simulated)", lambda r: _gib(r.rank.static_bytes)),
            ("step peak (simulated)", lambda r: _gib(r.rank.peak_bytes)),
            ("  activations", lambda r: _gib(r.rank.activation_bytes)),
            ("  other recompute", lambda r: _gib(r.rank.other_recompute_peak_bytes)
             if r.rank.other_recompute_peak_bytes is not None else "-"),
            ("log-prob pass peak", lambda r: _gib(r.rank.logprob_peak_bytes))]
    for name in [p.name for p in plan.ranks[0].phases]:
        rows.append((f"phase {name}", lambda r, n=name: _gib(next(p.total for p in r.phases if p.name == n))))
    rows.append(("simulation seconds", lambda r: f"{r.rank.seconds:.0f}" + (" (cached)" if r.rank.extra.get("cached")
                                                                              else "")))
    for label, value in rows:
        lines.append(f"{label:<18}" + "".join(f"{value(r):>28}" for r in plan.ranks))
    lines.append("")
    for r in plan.ranks:
        peak = r.peak
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in peak.parts.items())
        lines.append(f"{r.position.label}: largest phase {peak.name} {_gib(peak.total)} GiB = {parts}")
    if plan.rollout is not None:
        s = plan.rollout
        where = "colocated" if job.colocated else "dedicated nodes"
        lines.append(f"SGLang ({where}, TP{s.tp}, --mem-fraction-static {s.fraction}): weights {_gib(s.weights_bytes)} "
                     f"GiB per rank, KV cache {_gib(max(s.kv_bytes, 0))} GiB = {s.kv_tokens} tokens "
                     f"({s.concurrent_sequences} full samples per server)")
    host = plan.host
    lines.append(f"host, rank 0's node: {_gib(host.steady)} GiB per step, {_gib(host.saving)} GiB while saving "
                 f"({', '.join(f'{k} {_gib(v)}' for k, v in {**host.parts, **host.save_parts}.items() if v)})")
    c = plan.costs
    lines.append(f"sample broadcast: {c.broadcast_bytes / 1e6:.0f} MB pickled, {c.broadcast_rounds} gloo rounds, "
                 f"~{c.broadcast_seconds:.1f} s per step (unpickling {c.unpickle_seconds:.1f} s on every rank)")
    if c.route_bytes_per_rank:
        lines.append(f"R3 routes: {c.route_bytes_per_rank / 1e6:.0f} MB per rank, rank 0 sends "
                     f"{c.route_bytes_sent_by_rank0 / 1e9:.2f} GB (~{c.route_seconds:.1f} s)")
    lines.append(f"weight sync: {c.weight_sync_bytes / 1e9:.1f} GB per push to {c.weight_sync_copies} server rank(s)")
    lines.extend(f"warning: {w}" for w in c.warnings)
    lines.append("not seen by the simulation (added): " + "; ".join(f"{k} {v}" for k, v in constants.describe()))
    lines.extend(f"problem: {p}" for p in plan.problems)
    lines.append(f"verdict: {_verdict(plan)}")
    return "\n".join(lines)


def to_json(plan: Plan) -> dict:
    job = plan.job
    return {
        "model": {"name": job.shapes.name, "source": job.shapes.source, "params": job.shapes.total_params()},
        "allocation": {**job.alloc.__dict__, "trainer_world": job.world},
        "layout": {**job.layout.to_dict(), "data_parallel": job.dp},
        "micro_batch": {"rows": job.micro_batch_rows, "sequence": job.sequence, "per_step": job.micro_batches,
                        "prompt_tokens": job.prompt_tokens, "prompt_source": job.prompt_source,
                        "recompute": job.cfg.model.recompute_activations},
        "ranks": [{"position": r.position.to_dict(), "hand_count": {"dense": r.hand_count[0], "expert": r.hand_count[1]},
                   **r.rank.to_dict(), "phases": {p.name: {"total": p.total, **p.parts} for p in r.phases},
                   "peak_phase": r.peak.name, "peak_bytes_per_gpu": r.peak.total,
                   "fits": r.peak.total <= job.alloc.gpu_memory}
                  for r in plan.ranks],
        "rollout": plan.rollout.to_dict() if plan.rollout else None,
        "host": {"steady_bytes": plan.host.steady, "saving_bytes": plan.host.saving, **plan.host.parts,
                 **plan.host.save_parts},
        "scale_costs": plan.costs.to_dict(),
        "constants": dict(constants.describe()),
        "fits": plan.fits,
        "problems": plan.problems,
        "fix": {"change": plan.fix.change, "plan": to_json(plan.fix.plan)} if plan.fix is not None else None,
        "verdict": _verdict(plan),
    }
