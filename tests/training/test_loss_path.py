"""The learner's loss path without a model, each piece against a computation written out here (or the
seed-formula loops of tests/algorithms/reference.py): which tokens are in the loss, the normaliser over a
whole mini-batch, where old and reference log-probs come from, the actor's loss scale, and the
train-vs-rollout metrics. Megatron is replaced by fakes, so these run in milliseconds (and keep the
mutation runs of scripts/mutation_test.py fast)."""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from grpo_megatron.algorithms import Correction
from grpo_megatron.config import AlgorithmConfig, RolloutConfig, RunConfig, TrainConfig
from grpo_megatron.training import actor as actor_module
from grpo_megatron.training import learner as learner_module
from grpo_megatron.training.actor import Actor
from grpo_megatron.training.builder import learner_spec
from grpo_megatron.samples import Sample, TrainerFields
from grpo_megatron.training.batch import make_micro_batch
from grpo_megatron.training.learner import Learner
from grpo_megatron.training.update_math import loss_mask
from grpo_megatron.training.metrics import PhaseTimer
from grpo_megatron.training.mismatch import rollout_correction_metrics, train_rollout_mismatch
from tests.algorithms import reference

G = 4
MAX_NEW_TOKENS = 4
PADDING = 3.0  # what the fake model puts outside the response: it must never reach the loss


def current_logprobs(i: int, n: int) -> list[float]:
    """The fake policy's log-probs of sample i's n response tokens."""
    return [-0.2 - 0.1 * ((i + 2 * j) % 5) for j in range(n)]


def shifted(values: list[float], i: int, scale: float) -> list[float]:
    """Other log-probs of the same tokens, far enough from `values` that clip bounds act."""
    return [v + scale * (-1) ** (i + j) * (1 + j % 2) for j, v in enumerate(values)]


def make_samples() -> list[Sample]:
    """Two groups of 4 with varied rewards, response lengths 1..4, three truncated samples, and stale
    old log-probs on every sample (train_on must set its own)."""
    samples = []
    for i in range(8):
        n = 1 + (3 * i) % 4
        samples.append(Sample(
            prompt_ids=[1 + (i + j) % 9 for j in range(2 + i % 3)], response_ids=[10 + (5 * i + j) % 7 for j in range(n)],
            group=i // G, reward=((3 * i) % 5) / 4, truncated=i % 3 == 0,
            engine_logprobs=shifted(current_logprobs(i, n), i, 0.3),
            trainer=TrainerFields(old_logprobs=torch.full((n,), 9.0))))
    return samples


def recomputed_old(samples: list[Sample]) -> dict[int, torch.Tensor]:
    return {i: torch.tensor(shifted(current_logprobs(i, len(s.response_ids)), i + 1, 0.2)) for i, s in enumerate(samples)}


def reference_logprobs(samples: list[Sample]) -> dict[int, torch.Tensor]:
    return {i: torch.tensor(shifted(current_logprobs(i, len(s.response_ids)), i, -0.15)) for i, s in enumerate(samples)}


class FakeActor:
    """Evaluates every micro-batch's loss on the fake policy's log-probs, as megatron's schedule would."""

    lr = 0.125

    def __init__(self, samples: list[Sample]):
        self.samples = samples
        self.calls: list[dict] = []

    def logprobs(self, mb) -> torch.Tensor:
        values = torch.full(mb.tokens.shape, PADDING)
        for row, i in enumerate(mb.indices):
            sample = self.samples[i]
            start = len(sample.prompt_ids) - 1  # position t predicts token t + 1
            values[row, start:start + len(sample.response_ids)] = torch.tensor(
                current_logprobs(i, len(sample.response_ids)))
        return values

    def train_step(self, micro, loss_fn, temperature) -> dict:
        outputs = [loss_fn(mb, self.logprobs(mb), torch.zeros(mb.tokens.shape)) for mb in micro]
        self.calls.append({"loss": sum(float(loss) for loss, _ in outputs), "metrics": [m for _, m in outputs],
                           "temperature": temperature, "rows": sorted(i for mb in micro for i in mb.indices)})
        return {"pg_loss": self.calls[-1]["loss"]}


class FakeRouting:
    mode, num_moe_layers, topk, num_experts = "r2", 1, 1, 2  # r2 without engine routes: nothing is delivered

    def __init__(self):
        self.begun = None

    def begin_step(self, samples, engine=None):
        assert engine is None
        self.begun = samples

    def end_step(self) -> dict:
        return {"replay/agreement": 0.5}


class FakeReference:
    model = "reference"

    @contextlib.contextmanager
    def on_device(self):
        yield self.model


def make_learner(monkeypatch, samples, algorithm: dict, rollout: dict, num_minibatches: int,
                 with_reference: bool, **train) -> Learner:
    """A Learner over fakes: a policy whose log-probs are `current_logprobs`, the passes' values fixed;
    `train`: TrainConfig fields besides num_minibatches (micro_batch_size 3 unless given)."""
    monkeypatch.setattr(learner_module, "data_parallel_info", lambda: (0, 1))
    cfg = RunConfig(
        algorithm=AlgorithmConfig(**{"loss": "grpo", "clip_low": 0.2, "clip_high": 0.28, **algorithm}),
        rollout=RolloutConfig(group_size=G, max_new_tokens=MAX_NEW_TOKENS, **rollout),
        train=TrainConfig(**{"micro_batch_size": 3, **train, "num_minibatches": num_minibatches}))
    learner = Learner(learner_spec(cfg), policy="policy", actor=FakeActor(samples), memory=None,
                      tokenizer=SimpleNamespace(pad_token_id=0), train_data=None, routing=FakeRouting(),
                      reference=FakeReference() if with_reference else None)
    passes = {"policy": recomputed_old(samples), "reference": reference_logprobs(samples)}
    learner.logprobs = lambda model, batch: passes[model]
    return learner


def reference_minibatch_loss(samples, rows, alg: AlgorithmConfig, old: dict, ref: dict | None) -> float:
    """The seed-formula loss of the mini-batch `rows`, from per-sample lists (no learner code)."""
    adv = reference.group_advantages([s.reward for s in samples], G, normalize_std=alg.advantage == "grpo", eps=1e-6)
    width = max(len(samples[i].response_ids) for i in rows)
    shape = (len(rows), width)
    logp, old_t, ref_t, mask = (torch.zeros(shape, dtype=torch.float64) for _ in range(4))
    for r, i in enumerate(rows):
        n = len(samples[i].response_ids)
        logp[r, :n] = torch.tensor(current_logprobs(i, n), dtype=torch.float64)
        old_t[r, :n] = torch.as_tensor(old[i], dtype=torch.float64)
        if ref is not None:
            ref_t[r, :n] = torch.as_tensor(ref[i], dtype=torch.float64)
        mask[r, :n] = 0.0 if alg.overlong_filter and samples[i].truncated else 1.0
    adv_t = torch.tensor([adv[i] for i in rows], dtype=torch.float64)
    return float(reference.policy_loss(logp, old_t, adv_t, mask, alg.loss, alg.clip_low, alg.clip_high, alg.loss_agg,
                                       ref=ref_t, kl_coef=alg.kl_coef, kl_estimator=alg.kl_estimator,
                                       dual_c=alg.dual_clip_c, max_len=MAX_NEW_TOKENS))


CASES = {
    # old log-probs from the engine; truncated samples filtered out; token-mean normaliser
    "engine_old": (dict(loss_agg="token_mean", overlong_filter=True), dict(use_engine_logprobs=True, temperature=0.7),
                   2, False),
    # a separate old-policy pass (two mini-batches), KL to a reference, GSPO's per-sequence normaliser
    "recomputed_old": (dict(loss="gspo", loss_agg="seq_mean_token_mean", clip_low=0.05, clip_high=0.05, kl_coef=0.1,
                            kl_estimator="k2"), dict(use_engine_logprobs=False, temperature=0.7), 2, True),
    # one mini-batch: the training pass's own log-probs are the old ones; Dr. GRPO; greedy rollout temperature
    "training_pass_is_old": (dict(loss="gspo_token", loss_agg="seq_mean_token_sum_norm", advantage="dr_grpo",
                                  dual_clip_c=1.5), dict(use_engine_logprobs=False, temperature=0.0), 1, False),
}


@pytest.mark.parametrize("case", CASES)
def test_train_on_gives_each_minibatch_its_reference_loss(case, monkeypatch):
    algorithm, rollout, num_minibatches, with_reference = CASES[case]
    samples = make_samples()
    learner = make_learner(monkeypatch, samples, algorithm, rollout, num_minibatches, with_reference)
    metrics = learner.update(samples, 0, PhaseTimer())

    alg, calls = learner.spec.update.algorithm, learner.actor.calls
    if learner.spec.update.use_engine_logprobs:
        old = {i: s.engine_logprobs for i, s in enumerate(samples)}
    elif num_minibatches == 1:
        old = {i: current_logprobs(i, len(s.response_ids)) for i, s in enumerate(samples)}
    else:
        old = recomputed_old(samples)
    ref = reference_logprobs(samples) if with_reference else None
    per = len(samples) // num_minibatches
    assert [c["rows"] for c in calls] == [list(range(m * per, (m + 1) * per)) for m in range(num_minibatches)]
    for m, call in enumerate(calls):
        expected = reference_minibatch_loss(samples, call["rows"], alg, old, ref)
        assert call["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7), (case, m)
        assert call["temperature"] == (learner.spec.update.temperature or 1.0)
        # the train-vs-rollout comparison belongs to the first mini-batch only (policy == rollout weights)
        assert all(("train_rollout/k3_kl" in mbm) == (m == 0) for mbm in call["metrics"])
    assert metrics["train/lr"] == FakeActor.lr and metrics["replay/agreement"] == 0.5
    assert metrics["train/pg_loss"] == pytest.approx(sum(c["loss"] for c in calls) / len(calls))
    assert learner.routing.begun is samples


def test_decoupled_old_logprobs_report_their_divergence_from_the_rollout(monkeypatch):
    """chi2_token = mean over response tokens of (pi_old / pi_rollout)^2 - 1, written out per token."""
    samples = make_samples()
    algorithm, rollout, num_minibatches, with_reference = CASES["recomputed_old"]
    metrics = make_learner(monkeypatch, samples, algorithm, rollout, num_minibatches, with_reference).update(
        samples, 0, PhaseTimer())
    old = recomputed_old(samples)
    terms = [math.exp(2 * (float(o) - e)) - 1 for i, s in enumerate(samples) for o, e in zip(old[i], s.engine_logprobs)]
    assert metrics["rollout_correction/chi2_token"] == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_loss_mask_drops_filtered_samples_and_zero_weight_tokens():
    samples = [Sample(prompt_ids=[1, 2], response_ids=[3, 4], group=0),
               Sample(prompt_ids=[1], response_ids=[3, 4, 5], group=0, trainer=TrainerFields(in_loss=False)),
               Sample(prompt_ids=[1, 2, 3], response_ids=[4, 5], group=1, trainer=TrainerFields(in_loss=True))]
    mb = make_micro_batch(samples, [0, 1, 2], pad_id=0)  # 3 rows of width 5
    assert loss_mask(samples, mb).tolist() == [[0, 1, 1, 0, 0], [0] * 5, [0, 0, 1, 1, 0]]
    mb.rollout_weights = torch.tensor([[0, 0.5, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 2, 1e-3, 0]])
    assert loss_mask(samples, mb).tolist() == [[0, 1, 0, 0, 0], [0] * 5, [0, 0, 1, 1, 0]]


def test_tool_tokens_leave_the_loss_mask():
    """A sample's loss_mask (0 at inserted tool tokens) multiplies its response mask; samples without one
    count every response token."""
    samples = [Sample(prompt_ids=[1, 2], response_ids=[3, 4, 5], group=0, loss_mask=[1, 0, 1]),
               Sample(prompt_ids=[1], response_ids=[3, 4], group=0)]
    mb = make_micro_batch(samples, [0, 1], pad_id=0)  # 2 rows of width 5
    assert mb.loss_mask.tolist() == [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]]
    assert loss_mask(samples, mb).tolist() == [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]]
    assert make_micro_batch(samples, [1], pad_id=0).loss_mask is None  # all 1: no tensor at all


def test_rows_without_some_log_probs_get_none_for_all():
    samples = [Sample(prompt_ids=[1], response_ids=[2, 3], group=0, engine_logprobs=[-1.0, -2.0]),
               Sample(prompt_ids=[1], response_ids=[2], group=0)]
    assert make_micro_batch(samples, [0, 1], pad_id=0).engine_logprobs is None


class _FakeOptimizer:
    def __init__(self, update_ok: bool, grad_norm: float | None):
        self.result, self.zeroed = (update_ok, grad_norm, None), False

    def zero_grad(self):
        self.zeroed = True

    def step(self):
        return self.result


class _FakeChunk:
    zeroed = False

    def zero_grad_buffer(self):
        self.zeroed = True


@pytest.mark.parametrize("update_ok, grad_norm", [(True, 2.5), (False, None)])
def test_actor_scales_the_loss_by_micro_batches_times_dp_ranks(update_ok, grad_norm, monkeypatch):
    """Megatron divides by the number of micro-batches and DDP averages over DP ranks: the loss handed to
    the schedule must be the global-normalised loss times both."""
    samples = [Sample(prompt_ids=[1, 2], response_ids=[3] * n, group=0) for n in (1, 2, 3)]
    micro = [make_micro_batch(samples, [i], pad_id=0) for i in range(3)]
    seen = {}

    def schedule(model, micro_batches, loss_fn, temperature, forward_only):
        seen.update(temperature=temperature, forward_only=forward_only)
        outputs = [loss_fn(mb, torch.zeros(mb.tokens.shape), torch.zeros(mb.tokens.shape)) for mb in micro_batches]
        seen["losses"] = [float(loss) for loss, _ in outputs]
        return [m for _, m in outputs]

    monkeypatch.setattr(actor_module, "data_parallel_info", lambda: (1, 2))
    monkeypatch.setattr(actor_module, "_run_schedule", schedule)
    actor = Actor.__new__(Actor)
    actor.model = type("Model", (), {"chunks": [_FakeChunk()]})()
    actor.optimizer = _FakeOptimizer(update_ok, grad_norm)
    increments = []
    actor.scheduler = type("Scheduler", (), {"step": lambda self, increment: increments.append(increment)})()

    def loss_fn(mb, logprobs, entropy):
        share = 0.25 * (1 + mb.indices[0])
        return torch.tensor(share), {"pg_loss": torch.tensor(share), "ratio_mean": torch.tensor(float(mb.indices[0]))}

    metrics = actor.train_step(micro, loss_fn, 0.6)
    assert seen["losses"] == [0.25 * 6, 0.5 * 6, 0.75 * 6]  # 3 micro-batches x 2 DP ranks
    assert seen["temperature"] == 0.6 and seen["forward_only"] is False
    assert actor.model.chunks[0].zeroed and actor.optimizer.zeroed and increments == [1]
    assert metrics["pg_loss"] == pytest.approx(0.25 + 0.5 + 0.75)  # shares of the mini-batch loss: summed
    assert metrics["ratio_mean"] == pytest.approx((0 * 1 + 1 * 2 + 2 * 3) / 6)  # weighted by response tokens
    assert metrics["update_skipped"] == float(not update_ok)
    assert metrics["grad_norm"] == grad_norm if grad_norm is not None else math.isnan(metrics["grad_norm"])


def _mismatch_reference(train, engine, mask) -> tuple[float, float, float]:
    """Per-token loop: mean |d|, mean k3 = e^d - d - 1 and the fraction of |d| > log 2, d = log p_train - log p_rollout."""
    diffs = [float(train[i, t] - engine[i, t]) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    if not diffs:
        return 0.0, 0.0, 0.0
    n = len(diffs)
    return (sum(abs(d) for d in diffs) / n, sum(math.exp(d) - d - 1 for d in diffs) / n,
            sum(abs(d) > math.log(2.0) for d in diffs) / n)


@pytest.mark.parametrize("mask", [
    [[1, 1, 1, 0], [0, 1, 0, 0]],
    [[0, 0, 1, 0], [0, 0, 0, 0]],  # one token
    [[0, 0, 0, 0], [0, 0, 0, 0]],  # none: zeros, not NaN
])
def test_train_rollout_mismatch_matches_a_token_loop(mask):
    # token (0, 2) sits exactly on the 2x bound (not outside), token (0, 1) is e times more likely under the
    # learner (outside 2x, inside 3x), token (1, 1) below 1/2; padding is garbage
    train = torch.tensor([[-1.0, -0.5, math.log(2.0), 50.0], [-40.0, -2.0, 7.0, 9.0]], dtype=torch.float64)
    engine = torch.tensor([[-1.25, -1.5, 0.0, -60.0], [3.0, -0.5, -8.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor(mask, dtype=torch.float64)
    metrics = train_rollout_mismatch(train, engine, mask)
    got = tuple(float(metrics[f"train_rollout/{k}"]) for k in ("logprob_abs_diff", "k3_kl", "ratio_outside_2x"))
    assert got == pytest.approx(_mismatch_reference(train, engine, mask), rel=1e-12, abs=1e-12)


def test_rollout_correction_metrics_of_no_response_tokens_are_neutral():
    """Nothing to compare: no divergence (chi2 0, log-PPL difference 0) and a PPL ratio of 1, never NaN."""
    old, rollout = torch.full((2, 3), -1.0), torch.full((2, 3), -2.0)
    metrics = rollout_correction_metrics(old, rollout, torch.zeros(2, 3))
    assert [metrics[f"rollout_correction/{k}"] for k in ("chi2_token", "chi2_seq", "log_ppl_diff", "ppl_ratio")] == \
        [0.0, 0.0, 0.0, 1.0]


def _correction_metrics(mask, log_unit, keep, weights, rejected, bound=2.0) -> dict:
    f64 = dict(dtype=torch.float64)
    correction = Correction(weights=torch.tensor(weights, **f64), keep=torch.tensor(keep),
                            log_unit=torch.tensor(log_unit, **f64), rejected=torch.tensor(rejected))
    zeros = torch.zeros(len(mask), len(mask[0]))
    metrics = rollout_correction_metrics(zeros, zeros, torch.tensor(mask, dtype=torch.float32), correction, "token", bound)
    return {k.split("/")[1]: v for k, v in metrics.items()}


def test_rollout_correction_metrics_count_what_the_correction_did():
    """Row 0: a truncated token (weight 3 > 2), one dropped by the mode, one exactly on the bound (not
    truncated), and a stray keep flag on padding; row 1 rejected whole; row 2 empty (its rejection flag
    counts for nothing). Five response tokens, two sequences."""
    log2, log3 = math.log(2.0), math.log(3.0)
    metrics = _correction_metrics(
        mask=[[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]],
        log_unit=[[log3, math.log(0.5), log2, 0.0], [0.1, 0.2, 0.0, 0.0], [0.0] * 4],
        keep=[[True, False, True, True], [False, False, False, False], [False] * 4],
        weights=[[2.0, 0.0, 2.0, 0.0], [0.0] * 4, [0.0] * 4], rejected=[False, True, True])
    expected = {"frac_truncated": 1 / 5, "frac_masked": 1 / 5, "frac_rejected": 1 / 2, "weight_min": 2.0,
                "weight_mean": 2.0, "weight_max": 2.0, "ess": 1.0, "bound": 2.0}
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mask, kept, rejected, expected", [
    ([[0, 1]], True, False, (1.0, 0.0, 0.0, 2.0, 2.0, 2.0)),  # one token, truncated (weight e > 2)
    ([[0, 1]], False, True, (0.0, 0.0, 1.0, 0.0, 0.0, 0.0)),  # one sequence, rejected: no weights left
    ([[0, 0]], False, False, (0.0,) * 6),  # nothing at all: zeros, never NaN
])
def test_rollout_correction_metrics_of_one_or_no_token(mask, kept, rejected, expected):
    metrics = _correction_metrics(mask=mask, log_unit=[[0.0, 1.0]], keep=[[False, kept]],
                                  weights=[[0.0, 2.0 if kept else 0.0]], rejected=[rejected])
    keys = ("frac_truncated", "frac_masked", "frac_rejected", "weight_min", "weight_mean", "weight_max")
    assert tuple(metrics[k] for k in keys) == expected


def test_without_a_truncation_bound_nothing_counts_as_truncated():
    """mis / reject drop weights instead of truncating them: no bound, frac_truncated 0."""
    metrics = _correction_metrics(mask=[[1, 1]], log_unit=[[0.0, 5.0]], keep=[[True, True]], weights=[[1.0, 1.0]],
                                  rejected=[False], bound=None)
    assert metrics["frac_truncated"] == 0.0 and "bound" not in metrics
