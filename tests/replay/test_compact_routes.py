"""R3 routes stay compact from SGLang's base64 int32 to the replay: the smallest integer dtype that holds the expert
ids (uint8 up to 256 experts, as verl keeps int16), never an int32 or int64 copy of a whole step's routes."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from grpo_megatron.replay.tables import RouteTable, storage_dtype
from grpo_megatron.rollout.sglang.errors import MalformedResponseError
from grpo_megatron.rollout.sglang.protocol import decode_routed_experts
from grpo_megatron.samples import Sample
from grpo_megatron.training.batch import make_micro_batch


def _encoded(ids: np.ndarray) -> str:
    return base64.b64encode(ids.astype(np.int32).tobytes()).decode()


def test_storage_dtype_is_the_smallest_that_holds_the_expert_ids():
    assert [storage_dtype(n) for n in (8, 128, 256, 257, 32767, 40000)] == [
        torch.uint8, torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32]


@pytest.mark.parametrize("experts, dtype", [(128, torch.uint8), (300, torch.int16)])
def test_decode_keeps_the_ids_in_the_smallest_dtype(experts, dtype):
    ids = np.random.default_rng(0).integers(0, experts, size=(5, 3, 2))
    ids[0, 0, 0] = experts - 1
    routes = decode_routed_experts(_encoded(ids), 5, (3, 2), "http://x")
    assert routes.dtype == dtype and routes.shape == (5, 3, 2)
    assert torch.equal(routes.long(), torch.from_numpy(ids).long())


def test_a_32k_token_response_decodes_to_a_byte_per_expert_id():
    """Qwen3-30B-A3B shapes (48 MoE layers, top-8, 128 experts): 12.6 MB per response, not 50 MB of int32."""
    rows, layers, topk = 32767, 48, 8
    ids = np.random.default_rng(1).integers(0, 128, size=rows * layers * topk, dtype=np.int32)
    routes = decode_routed_experts(_encoded(ids), rows, (layers, topk), "http://x")
    assert routes.element_size() * routes.numel() == rows * layers * topk


def test_negative_ids_stay_int32_for_the_range_check_and_a_wrong_size_is_refused():
    routes = decode_routed_experts(_encoded(np.array([-1, 3])), 1, (1, 2), "http://x")
    assert routes.dtype == torch.int32 and routes.tolist() == [[[-1, 3]]]
    with pytest.raises(MalformedResponseError, match="routed_experts has 2 values"):
        decode_routed_experts(_encoded(np.array([1, 3])), 2, (1, 2), "http://x")


def _samples_with_routes(num_experts: int = 128):
    g = torch.Generator().manual_seed(2)
    return [Sample(prompt_ids=[1, 2, 3], response_ids=[4] * (2 + i), group=0,
                   routed_experts=torch.randint(0, num_experts, (4 + i, 4, 2), generator=g).to(torch.uint8))
            for i in range(3)]


def test_the_engine_table_keeps_the_decoded_tensor_and_align_stays_compact():
    samples = _samples_with_routes()
    decoded = [s.routed_experts for s in samples]
    table = RouteTable.from_engine(samples, [0, 1, 2, 3], 4, 2, 128)
    assert all(table.routes[i].data_ptr() == decoded[i].data_ptr() for i in range(3))  # no copy at all
    mb = make_micro_batch(samples, [0, 1, 2], pad_id=0)
    aligned = table.align(mb, sp_rank=0, sp_size=1)
    assert all(r.indices.dtype == torch.uint8 for r in aligned)  # no int64 [b, s, layers, topk] expansion
    b, s = mb.tokens.shape
    for j, layer_routes in enumerate(aligned):
        by_token = layer_routes.indices.view(s, b, 2).transpose(0, 1)
        valid = layer_routes.valid.view(s, b).transpose(0, 1)
        for row, i in enumerate(mb.indices):
            n = samples[i].length - 1
            assert torch.equal(by_token[row, :n], decoded[i][:, j]) and valid[row, :n].all() and not valid[row, n:].any()


def test_a_stage_keeps_its_layers_in_the_storage_dtype():
    samples = _samples_with_routes()
    decoded = [s.routed_experts.clone() for s in samples]
    table = RouteTable.from_engine(samples, [1, 3], 4, 2, 128)
    assert all(table.routes[i].dtype == torch.uint8 and torch.equal(table.routes[i], decoded[i][:, [1, 3]])
               for i in range(3))
