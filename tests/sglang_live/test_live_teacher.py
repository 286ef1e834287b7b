"""The OPD teacher against a REAL SGLang 0.5.23 server on CPU (tiny Qwen3-MoE, bf16): prefill-only scoring of
given tokens (log-probs and top-k against transformers in float32), input log-probs ignoring the sampling
temperature (why training/opd.py accepts this teacher only at rollout.temperature 1), and one trainer step
distilling from it."""
from __future__ import annotations

import httpx
import pytest
import torch
import transformers

from grpo_megatron.rollout.sglang.teacher import SGLangTeacher, scoring_payload
from tests.sglang_live.test_live_server import LOGPROB_TOL

pytestmark = pytest.mark.sglang_live

PAIRS = [([1, 5, 9, 12], [20, 3, 3, 41, 2]), ([1, 7], [8, 63]), ([1, 30, 31, 32, 33, 34], [35])]  # 63: last id


def _reference(model_dir, prompt, response, top_k):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        log_p = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1], -1)
    return log_p.gather(-1, torch.tensor(response)[:, None])[:, 0], log_p


def test_teacher_scores_given_tokens_like_transformers(live_server, live_model):
    scores = SGLangTeacher([live_server.spec.url], top_k=4, timeout_s=120, vocab_size=64).score(PAIRS)
    for (prompt, response), got in zip(PAIRS, scores):
        want, log_p = _reference(live_model, prompt, response, 4)
        torch.testing.assert_close(got.logprobs, want, atol=LOGPROB_TOL, rtol=0)
        # the top-k the server picked are the model's most likely tokens (bf16 may swap near-ties)
        torch.testing.assert_close(got.topk_logprobs, log_p.gather(-1, got.topk_ids), atol=LOGPROB_TOL, rtol=0)
        torch.testing.assert_close(got.topk_logprobs, log_p.topk(4, -1).values, atol=LOGPROB_TOL, rtol=0)


def test_input_logprobs_ignore_the_sampling_temperature(live_server):
    prompt, response = PAIRS[0]
    answers = []
    for temperature in (1.0, 0.5):
        payload = scoring_payload(prompt, response, top_k=0)
        payload["sampling_params"]["temperature"] = temperature
        body = httpx.post(live_server.spec.url + "/generate", json=payload, timeout=120).json()
        answers.append([e[0] for e in body["meta_info"]["input_token_logprobs"][1:]])
        assert body["meta_info"]["completion_tokens"] == 0  # prefill only
    assert answers[0] == answers[1]


def test_one_trainer_step_distilling_from_a_live_teacher(live_server, live_model, tmp_path):
    from grpo_megatron.config import load_config
    from grpo_megatron.parallel import init_distributed
    from grpo_megatron.rollout.data.tasks import make_task_dataset
    from grpo_megatron.training.loop import Trainer

    init_distributed()
    train = make_task_dataset("first_digit", 32, 0, tmp_path / "train.jsonl")
    cfg = load_config(None, {
        "run_dir": str(tmp_path / "run"), "model": {"hf_path": str(live_model)},
        "data": {"train_files": [str(train)]}, "reward": {"functions": [{"name": "first_digit"}]},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 4},
        "algorithm": {"loss": "grpo", "opd": {"teacher": "sglang", "sglang_urls": [live_server.spec.url],
                                              "mode": "distill"}},
        "train": {"steps": 1, "num_minibatches": 1, "micro_batch_size": 8, "num_threads": 1},
        "logging": {"progress_bar": False, "tensorboard": False}})
    trainer = Trainer(cfg)
    try:
        metrics = trainer.train_step()
    finally:
        trainer.close()
    # the live server serves the student's own initial weights (in bf16): the KL is bf16 noise
    assert abs(metrics["opd/teacher_kl"]) < LOGPROB_TOL and metrics["time/teacher"] > 0
