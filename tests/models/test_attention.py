"""SDPA core attention: same outputs and gradients as megatron's DotProductAttention, fallback otherwise."""
import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from grpo_megatron.models import build_model, model_dims
from grpo_megatron.models.attention import SdpaDotProductAttention
from grpo_megatron.models.tiny import tiny_hf_config
from grpo_megatron.parallel import ParallelLayout, init_model_parallel

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 8, 7, 3


@pytest.fixture
def modules(dist_world1):
    from megatron.core.transformer import TransformerConfig

    from grpo_megatron.platform import setup_platform

    setup_platform()
    init_model_parallel(ParallelLayout(), num_layers=1, num_experts=None, num_attention_heads=HEADS,
                        num_query_groups=GROUPS, vocab_size=16)
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, attention_dropout=0.0,
                               masked_softmax_fusion=False, use_cpu_initialization=True)
    return [cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
            for cls in (DotProductAttention, SdpaDotProductAttention)]


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(SEQ, BATCH, n, HEAD_DIM, generator=g, requires_grad=True) for n in (HEADS, GROUPS, GROUPS)]


def test_causal_attention_and_gradients_match_megatron(modules):
    outputs, grads = [], []
    for module in modules:
        q, k, v = _qkv()
        out = module(q, k, v, attention_mask=None)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outputs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    assert outputs[1].shape == (SEQ, BATCH, HEADS * HEAD_DIM)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    for sdpa, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(sdpa, reference, rtol=0, atol=1e-5)


def test_explicit_mask_runs_megatrons_code_exactly(modules):
    q, k, v = _qkv()
    mask = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    mask[:, :, :, :2] = True  # not causal: SDPA's is_causal path would give a different result
    reference, ours = (m(q, k, v, attention_mask=mask) for m in modules)
    assert torch.equal(ours, reference)
    assert not torch.allclose(ours, modules[1](q, k, v, attention_mask=None))


def test_local_spec_models_use_sdpa(dist_world1):
    config = tiny_hf_config("qwen3_moe")
    layout = ParallelLayout()
    init_model_parallel(layout, **model_dims(config))
    model = build_model(config, layout)
    kinds = {type(layer.self_attention.core_attention) for layer in model.chunks[0].decoder.layers}
    assert kinds == {SdpaDotProductAttention}


@pytest.mark.parametrize("rot_dim", [HEAD_DIM, HEAD_DIM // 2])
def test_rope_without_the_trailing_copy_gives_megatrons_values(rot_dim, modules):
    from megatron.core.models.common.embeddings import rope_utils

    patched = rope_utils._apply_rotary_pos_emb_bshd
    assert getattr(patched, "_grpo_patched", False)  # setup_platform() installed it
    original = patched.__wrapped__
    t = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    freqs = torch.randn(SEQ, 1, 1, rot_dim, generator=torch.Generator().manual_seed(3))
    assert torch.equal(patched(t, freqs), original(t, freqs))
