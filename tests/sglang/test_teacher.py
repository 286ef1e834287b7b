"""The SGLang teacher (rollout/sglang/teacher.py) against the mock server (tests/sglang/mock_server.py, which
follows sglang 0.5.23's logprob_result_processor.py for input log-probs): scores equal the model's own log-probs,
and malformed answers fail naming the field (the trainer with it: tests/sglang/test_opd_teacher_trainer.py)."""
from __future__ import annotations

import pytest
import torch
import transformers

from grpo_megatron.rollout.sglang.errors import MalformedResponseError
from grpo_megatron.rollout.sglang.teacher import SGLangTeacher, parse_scores, scoring_payload
from tests.sglang.conftest import request_log

PAIRS = [([1, 5, 9, 12], [20, 3, 3, 41, 2]), ([1, 7], [8, 63]), ([1, 30, 31], [])]  # 63: the vocabulary's last


def _hf_logprobs(model_dir, prompt, response, top_k):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_p = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
    return log_p.gather(-1, torch.tensor(response)[:, None])[:, 0], *log_p.topk(top_k, -1)


def test_payload_is_prefill_only_from_the_last_prompt_token():
    payload = scoring_payload([1, 2, 3], [4, 5], top_k=0)
    assert payload == {"input_ids": [1, 2, 3, 4, 5], "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                       "return_logprob": True, "logprob_start_len": 2}
    assert scoring_payload([1], [4], top_k=3)["top_logprobs_num"] == 3


def test_scores_are_the_models_logprobs_of_the_given_tokens(mock, tiny_hf_dir):
    teacher = SGLangTeacher(mock, top_k=3, vocab_size=64)
    scores = teacher.score(PAIRS)
    for (prompt, response), got in zip(PAIRS, scores):
        assert got.logprobs.shape == (len(response),) and got.topk_ids.shape == (len(response), 3)
        if not response:
            continue
        lp, top_values, top_ids = _hf_logprobs(tiny_hf_dir("qwen3_moe"), prompt, response, 3)
        torch.testing.assert_close(got.logprobs, lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.topk_logprobs, top_values, atol=1e-5, rtol=0)
        assert got.topk_ids.tolist() == top_ids.tolist()
    assert sum("/generate" in line for url in mock for line in request_log(url)) == 2  # the empty one not asked


@pytest.mark.parametrize("body, message", [
    ({"meta_info": {}}, "input_token_logprobs has no entries; expected 3"),
    ({"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 4, None]]}}, "has 2 entries; expected 3"),
    ({"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 4, None], [-2.0, 6, None]]}},
     "scored tokens [4, 6]"),
    ({"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 4, None], [None, 5, None]]}}, "held nulls"),
])
def test_malformed_answers_name_the_field(body, message):
    with pytest.raises(MalformedResponseError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_scores(body, [4, 5], top_k=0, url="http://h")


def test_the_last_vocabulary_id_is_echoed_as_0_and_only_it():
    body = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 0, None], [-2.0, 0, None]]}}
    assert parse_scores(body, [63, 0], top_k=0, url="http://h", vocab_size=64).logprobs.tolist() == [-1.0, -2.0]
    with pytest.raises(MalformedResponseError, match="scored tokens"):
        parse_scores(body, [62, 0], top_k=0, url="http://h", vocab_size=64)
    with pytest.raises(MalformedResponseError, match="scored tokens"):  # without the vocabulary: exact ids
        parse_scores(body, [63, 0], top_k=0, url="http://h")


def test_missing_top_logprobs_is_an_error():
    body = {"meta_info": {"input_token_logprobs": [[None, 1, None], [-1.0, 4, None]], "input_top_logprobs": [None]}}
    with pytest.raises(MalformedResponseError, match="input_top_logprobs is not 2 rows"):
        parse_scores(body, [4], top_k=2, url="http://h")
