"""Every way replay data can fail to fit raises, naming the layer / sample and the micro-batch."""
from dataclasses import replace

import pytest
import torch

from grpo_megatron.models import build_model, load_hf_config, model_dims
from grpo_megatron.parallel import ParallelLayout, init_model_parallel
from grpo_megatron.replay import RoutingReplayError, attach_routing_replay
from grpo_megatron.replay.routers import Routes, Target
from grpo_megatron.training.actor import _run_schedule, forward_logprobs
from tests.replay.helpers import build_policy, make_samples, micro_batches_for, nll_loss, old_pass, train_pass


@pytest.fixture
def policy(tiny_hf_dir, dist_world1):
    return build_policy(tiny_hf_dir("qwen3_moe"), mode="r3")


def with_routes(**changes):
    samples = make_samples(with_routes=True)
    for i, routes in changes.items():
        k = int(i[1:])
        samples[k] = replace(samples[k], routed_experts=routes(samples[k].routed_experts))
    return samples


@pytest.mark.parametrize("change, message", [
    (lambda r: r[:-1], r"sample 2: routed_experts has shape \(9, 2, 2\), expected \(10, 2, 2\)"),
    (lambda r: r[:, :1], r"sample 2: .*expected \(10, 2, 2\) \(prompt\+response-1 positions, MoE layers"),
    (lambda r: r[..., :1], r"sample 2: .*expected \(10, 2, 2\)"),
    (lambda r: torch.where(torch.arange(2)[None, :, None] == 1, 7, r), r"sample 2, MoE layer 1: .*outside \[0, 4\)"),
    (lambda r: None, r"sample 2 has no routed_experts"),
])
def test_engine_routes_that_do_not_fit_the_sample_are_refused(policy, change, message):
    _, routing = policy
    with pytest.raises(RoutingReplayError, match=message):
        routing.begin_step(with_routes(s2=change))


def test_replay_data_of_the_wrong_token_count_names_layer_and_micro_batch(policy):
    model, routing = policy
    mb = micro_batches_for(model, make_samples())[:1]
    tokens = mb[0].tokens.numel()
    bad = Routes(torch.zeros(tokens - 1, 2, dtype=torch.long), torch.ones(tokens - 1, dtype=torch.bool))
    routing.layers[1].arm([Target(0, bad, None)], training_pass=False)
    with pytest.raises(RoutingReplayError, match=rf"layer 2, micro-batch 0: replay data has shape \({tokens - 1}, 2\)"):
        forward_logprobs(model, mb, 1.0)


def test_unused_and_reused_replay_data(policy):
    model, routing = policy
    samples = make_samples(with_routes=True)
    routing.begin_step(samples)
    micro = micro_batches_for(model, samples)
    with pytest.raises(RoutingReplayError, match=r"layer 1: replay data of micro-batches 2\.\.2 left unused"):
        with routing.pass_over(micro, forward_only=True):
            _schedule_without_arming(model, micro[:2])
    with pytest.raises(RoutingReplayError, match=r"layer 1: routing call 2 .* micro-batch 1 does not exist"):
        with routing.pass_over(micro[:1], forward_only=True):
            _schedule_without_arming(model, [micro[0], micro[0]])


def _schedule_without_arming(model, micro):
    """Run the schedule with the controller already armed by the caller (bypassing the actor's arming)."""
    saved = model.extra.pop("routing_replay")
    try:
        with torch.no_grad():
            _run_schedule(model, micro, nll_loss, 1.0, forward_only=True)
    finally:
        model.extra["routing_replay"] = saved


def test_step_without_training_pass_leaves_replay_data_unused(policy):
    model, routing = policy
    samples = make_samples(with_routes=True)
    routing.begin_step(samples)
    old_pass(model, samples)
    train_pass(model, samples, indices=[0, 1, 2])
    with pytest.raises(RoutingReplayError, match=r"r3: routes of samples \[3, 4, 5\] were never replayed"):
        routing.end_step()


def test_r2_needs_the_old_pass_and_records_it_once(tiny_hf_dir, dist_world1):
    model, routing = build_policy(tiny_hf_dir("qwen3_moe"), mode="r2")
    samples = make_samples()
    routing.begin_step(samples)
    with pytest.raises(RoutingReplayError, match="old-log-prob pass, which did not run"):
        train_pass(model, samples)
    old_pass(model, samples)
    with pytest.raises(RoutingReplayError, match="second forward-only pass"):
        old_pass(model, samples)


def test_policy_without_replay_hooks_is_refused(tiny_hf_dir, dist_world1):
    config = load_hf_config(tiny_hf_dir("qwen3_moe"))
    init_model_parallel(ParallelLayout(), **model_dims(config))
    with pytest.raises(RoutingReplayError, match="moe_enable_routing_replay=True"):
        attach_routing_replay(build_model(config, ParallelLayout()), "r2")
