"""The clip bounds of every kind are active in a reference comparison, so dropping one cannot pass.

The main reference test draws ratios close to 1; here the spread is wide enough that, for each variant,
some units sit below 1 - eps_low with A < 0, above 1 + eps_high with A > 0, and above the dual-clip
constant with A < 0. Each bound then changes the gradient, which is compared with the loop reference.
"""
import pytest
import torch

from tests.algorithms import reference
from tests.algorithms.test_policy_loss import VARIANTS, both_losses, make_batch

DUAL_C = 1.5
CLIP = (0.05, 0.1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lower_upper_and_dual_clip_are_active_and_match_the_reference(variant):
    logp, old, ref, adv, mask = make_batch(5, batch=12, length=4, spread=1.0)
    ours, expected, metrics = both_losses(logp, old, ref, adv, mask, variant, "token_mean", clip=CLIP,
                                          dual_clip_c=DUAL_C)
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    dual = metrics["clip_frac_tokens"] - metrics["clip_frac_low"] - metrics["clip_frac_high"]
    assert dual > 0, "no unit was dual-clipped"
    torch.testing.assert_close(ours, expected)
    grad_ours, = torch.autograd.grad(ours, logp)
    torch.testing.assert_close(grad_ours, torch.autograd.grad(expected, logp)[0])
    # Without dual clip the reference gradient differs: the bound matters for this batch.
    undual = reference.policy_loss(logp, old, adv, mask, variant, *CLIP, "token_mean", max_len=9)
    assert not torch.allclose(grad_ours, torch.autograd.grad(undual, logp)[0])
