"""Rule-based rewards: registry, answer extraction, numeric comparison, format regex, weighted sums."""
from __future__ import annotations

import pytest

from grpo_megatron.rollout.rewards.functions import (
    RewardSpec, compute_rewards, extract_final_answer, get_reward_fn, register_reward,
)


def test_unknown_reward_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*exact_match.*math_answer"):
        get_reward_fn("accuracy")


def test_register_reward_and_reject_duplicates():
    @register_reward("test_length_penalty")
    def length_penalty(response_text, answer, meta):
        return -len(response_text) / 10

    assert get_reward_fn("test_length_penalty")("abcd", None, {}) == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length_penalty")(length_penalty)


def test_exact_match_strips_whitespace():
    fn = get_reward_fn("exact_match")
    assert fn("  a c b \n", "a c b", {}) == 1.0
    assert fn("a c", "a c b", {}) == 0.0
    with pytest.raises(ValueError, match="`answer`"):
        fn("a", None, {})


@pytest.mark.parametrize("text,expected", [
    ("so it is 12 then #### 1,234", "1,234"),
    ("we get \\boxed{\\frac{1}{2}} and later \\boxed{7}", "7"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("3 apples and 4 pears make 7.", "7."),
    ("no numbers here", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("response,answer,reward", [
    ("The total is 72.", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),  # GSM8K-style reference
    ("#### 1,000", "1000", 1.0),
    ("\\boxed{0.50}", "0.5", 1.0),
    ("\\boxed{3}", "-3", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # non-numbers compare as strings
    ("\\boxed{x+1}", "x + 2", 0.0),
    ("I do not know", "5", 0.0),
])
def test_math_answer(response, answer, reward):
    assert get_reward_fn("math_answer")(response, answer, {}) == reward


def test_format_takes_its_regex_from_the_config():
    fn = get_reward_fn("format", pattern=r"<think>.*</think>\s*<answer>.*</answer>")
    assert fn("<think>a\nb</think> <answer>4</answer>", None, {}) == 1.0
    assert fn("<answer>4</answer>", None, {}) == 0.0
    with pytest.raises(ValueError, match="bad options"):
        get_reward_fn("format")
    with pytest.raises(ValueError, match="bad options"):
        get_reward_fn("exact_match", pattern="x")


def test_compute_rewards_weights_and_breakdown():
    texts = ["#### 4", "<answer>5</answer>", "#### 5"]
    rewards = compute_rewards(texts, ["4", "5", "5"], [{}, {}, {}], [
        ("math_answer", 1.0),
        RewardSpec("format", 0.5, {"pattern": r"<answer>.*</answer>"}),
        ("exact_match", 2.0, {}),
    ])
    assert rewards.by_name["math_answer"] == [1.0, 1.0, 1.0]
    assert rewards.by_name["format"] == [0.0, 1.0, 0.0]
    assert rewards.by_name["exact_match"] == [0.0, 0.0, 0.0]
    assert rewards.total == [1.0, 1.5, 1.0]
    with pytest.raises(ValueError, match="one answer and one meta per completion"):
        compute_rewards(texts, ["4"], [{}], [("math_answer", 1.0)])


@pytest.mark.parametrize("response, answer, reward", [
    ("so the answer is $\\frac{1}{2}$", "0.5", 1.0),
    ("The result: \\boxed{\\frac{3}{6}}", "\\frac{1}{2}", 1.0),
    ("I get 7.", "7", 1.0),
    ("I get 8.", "7", 0.0),
    ("no idea", "7", 0.0),
])
def test_math_verify_judges_equivalent_answers(response, answer, reward):
    assert get_reward_fn("math_verify")(response, answer, {}) == reward


def test_length_reward_penalises_words_over_the_limit():
    fn = get_reward_fn("length", max_words=3, penalty_per_word=0.25)
    assert fn("a b c", None, {}) == 0.0
    assert fn("a b c d e", None, {}) == -0.5
    assert fn(" ".join("x" * 1 for _ in range(50)), None, {}) == -1.0
    with pytest.raises(ValueError, match="bad options"):
        get_reward_fn("length")
