"""Chunked log-probs / entropy against the naive full softmax, single process."""
from __future__ import annotations

import pytest
import torch

from grpo_megatron.algorithms import token_logprobs_and_entropy
from grpo_megatron.algorithms.logprobs import CHUNK_ELEMENTS_CPU
from tests.algorithms import reference


def make_logits(seed: int, shape=(3, 5, 37), dtype=torch.float64, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    weights = torch.randn(2, *shape[:-1], generator=gen, dtype=torch.float64)
    return logits, targets, weights


@pytest.mark.parametrize("chunk_size", [1, 4, 15, None])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("uses", ["both", "logprobs", "entropy"])
def test_matches_naive_forward_and_backward(chunk_size, temperature, uses):
    logits, targets, (w_lp, w_h) = make_logits(0)
    logits.requires_grad_()
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature=temperature, chunk_size=chunk_size)
    naive_lp, naive_h = reference.logprobs_and_entropy(logits, targets, temperature)
    torch.testing.assert_close(logprobs, naive_lp)
    torch.testing.assert_close(entropy, naive_h)

    def objective(lp, h):
        return {"both": (w_lp * lp).sum() + (w_h * h).sum(), "logprobs": (w_lp * lp).sum(), "entropy": (w_h * h).sum()}[uses]

    grad, = torch.autograd.grad(objective(logprobs, entropy), logits)
    naive_grad, = torch.autograd.grad(objective(naive_lp, naive_h), logits)
    torch.testing.assert_close(grad, naive_grad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck(temperature):
    logits, targets, _ = make_logits(1, shape=(2, 3, 7))
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs_and_entropy(x, targets, temperature=temperature, chunk_size=4), (logits,)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits_compute_in_float32(dtype):
    logits, targets, (w_lp, w_h) = make_logits(2, dtype=dtype, scale=10.0)
    logits.requires_grad_()
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, chunk_size=4)
    assert logprobs.dtype == entropy.dtype == torch.float32
    naive_lp, naive_h = reference.logprobs_and_entropy(logits.detach(), targets)
    torch.testing.assert_close(logprobs.double(), naive_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), naive_h, rtol=1e-5, atol=1e-5)
    ((w_lp * logprobs).sum() + (w_h * entropy).sum()).backward()
    exact = logits.detach().double().requires_grad_()
    naive_lp, naive_h = reference.logprobs_and_entropy(exact, targets)
    ((w_lp * naive_lp).sum() + (w_h * naive_h).sum()).backward()
    assert logits.grad.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits.grad.double(), exact.grad, rtol=tolerance, atol=tolerance)


def test_inputs_untouched_and_large_logits_finite():
    logits, targets, _ = make_logits(3, scale=1e4)
    original = logits.clone()
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature=0.5, chunk_size=2)
    assert torch.equal(logits, original)
    assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all() and (entropy >= -1e-9).all()


def test_no_grad_path_and_unused_outputs():
    logits, targets, _ = make_logits(4)
    with torch.no_grad():
        logprobs, _ = token_logprobs_and_entropy(logits, targets)
    assert not logprobs.requires_grad
    logits.requires_grad_()
    logprobs, entropy = token_logprobs_and_entropy(logits, targets)
    (0 * logprobs.sum()).backward()  # only one output used, with zero gradient
    assert logits.grad.abs().sum() == 0


def test_temperature_two_divides_the_logits():
    """T = 2 (not only T = 1 skips the division): log_softmax(x / 2), and its gradient."""
    logits, targets, (w_lp, w_h) = make_logits(5, shape=(2, 3, 11))
    logits.requires_grad_()
    logprobs, entropy = token_logprobs_and_entropy(logits, targets, temperature=2.0, chunk_size=4)
    naive_lp, naive_h = reference.logprobs_and_entropy(logits, targets, 2.0)
    torch.testing.assert_close(logprobs, naive_lp)
    torch.testing.assert_close(entropy, naive_h)
    grad, = torch.autograd.grad((w_lp * logprobs).sum() + (w_h * entropy).sum(), logits)
    naive_grad, = torch.autograd.grad((w_lp * naive_lp).sum() + (w_h * naive_h).sum(), logits)
    torch.testing.assert_close(grad, naive_grad)


def test_a_vocab_larger_than_the_default_chunk_is_one_row_per_chunk():
    """V > CHUNK_ELEMENTS_CPU logits: the default chunk is one row (never zero rows)."""
    vocab = CHUNK_ELEMENTS_CPU + 3
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, vocab, generator=gen).requires_grad_()
    targets = torch.tensor([vocab - 1, 12345])
    logprobs, entropy = token_logprobs_and_entropy(logits, targets)
    naive_lp, naive_h = reference.logprobs_and_entropy(logits, targets)
    torch.testing.assert_close(logprobs.double(), naive_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), naive_h, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(logprobs.sum(), logits)
    naive_grad, = torch.autograd.grad(naive_lp.sum(), logits)
    torch.testing.assert_close(grad.double(), naive_grad.double(), rtol=1e-5, atol=1e-7)
