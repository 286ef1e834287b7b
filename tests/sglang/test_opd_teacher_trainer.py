"""The trainer with an SGLang teacher on the mock server (tests/sglang/mock_server.py): its batches are scored
once per step, also with async rollouts (the tokens as sampled, whatever weight version sampled them)."""
from __future__ import annotations

from tests.sglang.conftest import request_log
from tests.training.test_loop import VARIED


def _trainer(make_config, urls, **overrides):
    from grpo_megatron.training.loop import Trainer

    return Trainer(make_config(reward=VARIED, algorithm={
        "loss": "grpo", "rollout_correction": {"mode": "tis"},
        "opd": {"teacher": "sglang", "sglang_urls": urls, "mode": "rl", "coef": 0.5}}, **overrides))


def test_trainer_with_an_sglang_teacher_that_is_the_student(make_config, mock, dist_world1):
    """The mock serves the student's own initial checkpoint: the first step's teacher KL is ~0 (HF vs megatron
    numerics), and every response token of the batch was scored once."""
    trainer = _trainer(make_config, mock, train={"steps": 1, "num_minibatches": 1})
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    assert abs(metrics["opd/teacher_kl"]) < 1e-4 and metrics["time/teacher"] > 0
    assert sum("/generate" in line for url in mock for line in request_log(url)) == 4 * 4


def test_async_rollouts_are_scored_on_their_tokens_as_sampled(make_config, mock, dist_world1):
    trainer = _trainer(make_config, mock, rollout={"mode": "async", "max_staleness": 2}, train={"steps": 3})
    scored, stale = [], []
    score = trainer.learner.teacher.score

    def recording(pairs):
        scored.append(pairs)
        return score(pairs)

    trainer.learner.teacher.score = recording
    update = trainer.learner.update

    def checking(samples, step, timer=None, routes=None):
        stale.append(any(v < step for s in samples for v in s.weight_versions))
        result = update(samples, step, timer, routes)
        assert [(s.prompt_ids, s.response_ids) for s in samples] == scored[-1]
        for s in samples:  # the teacher's values sit on those tokens
            assert s.trainer.teacher_logprobs.shape == (len(s.response_ids),)
        return result

    trainer.learner.update = checking
    try:
        history = trainer.train()
    finally:
        trainer.close()
    assert len(scored) == 3 and any(stale)  # some batch was sampled by older weights
    assert all(abs(m["opd/teacher_kl"]) < 10 for m in history)
