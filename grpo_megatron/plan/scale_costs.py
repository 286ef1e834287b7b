"""Costs that grow with the job's size but are not GPU memory: the per-step sample broadcast, R3 route delivery,
and the weight-sync payload.

The sample broadcast is what the trainer does today (training/rollout_side.py `broadcast_from_rank0`): rank 0 pickles the whole
batch and `broadcast_object_list` sends it over the gloo control group to every rank, whose binomial tree
(gloo/broadcast.cc) takes ceil(log2 world) rounds of the whole message; every rank then unpickles all of it.
Pickle sizes and (un)pickling speed are measured here on a synthetic full-length batch; the network hop is
constants.GLOO_BYTES_PER_S.
"""
from __future__ import annotations

import math
import pickle
import random
import time
from dataclasses import asdict, dataclass

from grpo_megatron.plan import constants


@dataclass(frozen=True)
class ScaleCosts:
    world: int
    broadcast_bytes: int  # pickled batch, sent to every rank
    broadcast_rounds: int
    broadcast_seconds: float  # tree rounds over the network + rank 0's pickle + each rank's unpickle
    unpickle_seconds: float  # part of the above, on every rank
    route_bytes_per_rank: int  # R3: one rank's share (its DP samples, its stage's MoE layers)
    route_bytes_sent_by_rank0: int  # point to point to every other rank
    route_seconds: float
    weight_sync_bytes: int  # one full push of the policy (bf16 HF tensors)
    weight_sync_copies: int  # receivers of that payload (server ranks, or a disk read per server)
    warnings: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _synthetic_sample(prompt: int, response: int, vocab: int, logprobs: bool, rng: random.Random):
    from grpo_megatron.samples import Sample

    return Sample(prompt_ids=[rng.randrange(vocab) for _ in range(prompt)],
                  response_ids=[rng.randrange(vocab) for _ in range(response)], group=0,
                  engine_logprobs=[-rng.random() for _ in range(response)] if logprobs else None)


def measure_pickle(prompt: int, response: int, vocab: int, logprobs: bool) -> tuple[int, float, float]:
    """(bytes, pickle seconds, unpickle seconds) of one full-length Sample, pickled as broadcast_object_list does."""
    rng = random.Random(0)
    samples = [_synthetic_sample(prompt, response, vocab, logprobs, rng) for _ in range(4)]
    start = time.perf_counter()
    blob = pickle.dumps(samples)
    dumped = time.perf_counter()
    pickle.loads(blob)
    loaded = time.perf_counter()
    return len(blob) // 4, (dumped - start) / 4, (loaded - dumped) / 4


def scale_costs(*, world: int, samples: int, prompt: int, response: int, vocab: int, logprobs: bool, dp: int,
                tp_cp: int, moe_layers: int, topk: int, route_id_bytes: int, replay: bool, model_bytes: int,
                sync_copies: int) -> ScaleCosts:
    per_sample, dump_s, load_s = measure_pickle(prompt, response, vocab, logprobs)
    blob = per_sample * samples
    rounds = math.ceil(math.log2(world)) if world > 1 else 0
    network = rounds * blob / constants.GLOO_BYTES_PER_S
    unpickle = load_s * samples
    seconds = network + dump_s * samples + unpickle
    sequence = prompt + response
    route_rank = math.ceil(samples / dp) * sequence * moe_layers * topk * route_id_bytes if replay else 0
    # every rank of a DP group gets its samples; TP/CP ranks get copies: tp*cp*samples*layers in all
    route_sent = tp_cp * samples * sequence * moe_layers * topk * route_id_bytes if replay and world > 1 else 0
    warnings = []
    if world > 1 and seconds > 10:
        warnings.append(f"the sample broadcast takes ~{seconds:.0f} s per step at world {world} ({rounds} gloo rounds of "
                        f"{blob / 1e9:.2f} GB, then every rank unpickles the whole batch): send each DP rank only its "
                        f"samples")
    world128 = math.ceil(math.log2(128)) * blob / constants.GLOO_BYTES_PER_S + dump_s * samples + unpickle
    if world < 128 and world128 > 10:
        warnings.append(f"at 128 ranks the same batch would take ~{world128:.0f} s to broadcast")
    return ScaleCosts(world=world, broadcast_bytes=blob, broadcast_rounds=rounds, broadcast_seconds=seconds,
                      unpickle_seconds=unpickle, route_bytes_per_rank=route_rank, route_bytes_sent_by_rank0=route_sent,
                      route_seconds=route_sent / constants.GLOO_BYTES_PER_S, weight_sync_bytes=model_bytes,
                      weight_sync_copies=sync_copies, warnings=tuple(warnings))
