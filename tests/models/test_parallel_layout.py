"""A layout that cannot work fails before any model is built, naming the fix."""
import pytest

from grpo_megatron.parallel import ParallelLayout, ParallelLayoutError


@pytest.mark.parametrize(
    "layout, world, dims, message",
    [
        (ParallelLayout(tensor_parallel=2), 3, {}, "not divisible by tensor_parallel"),
        (ParallelLayout(pipeline_parallel=2), 2, {"num_layers": 3}, "do not split evenly over 2 pipeline"),
        (ParallelLayout(expert_parallel=3), 3, {"num_experts": 4}, "does not divide the 4 experts"),
        (ParallelLayout(expert_parallel=2), 2, {"num_experts": None}, "needs an MoE model"),
        (ParallelLayout(tensor_parallel=2, sequence_parallel=False), 2, {"num_experts": 4},
         "set sequence_parallel: true"),
        (ParallelLayout(tensor_parallel=2), 2, {"num_attention_heads": 3}, "does not divide the 3 attention"),
        (ParallelLayout(tensor_parallel=2), 2, {"num_query_groups": 1}, "does not divide the 1 key/value"),
        (ParallelLayout(tensor_parallel=2), 2, {"vocab_size": 63}, "pad the vocabulary"),
        (ParallelLayout(virtual_pipeline_parallel=2), 1, {}, "needs pipeline_parallel > 1"),
        (ParallelLayout(tensor_parallel=0), 1, {}, "must be >= 1"),
        (ParallelLayout(expert_parallel=2, expert_tensor_parallel=2), 2, {"num_experts": 4},
         "not divisible by expert_tensor_parallel"),
        (ParallelLayout(context_parallel=2), 2, {}, "needs TransformerEngine"),
    ],
)
def test_bad_layouts_are_refused_with_the_fix(layout, world, dims, message):
    with pytest.raises(ParallelLayoutError, match=message):
        layout.validate(world, **dims)


def test_good_layouts_pass():
    ParallelLayout(tensor_parallel=2).validate(4, num_layers=2, num_experts=4, num_attention_heads=4,
                                               num_query_groups=2, vocab_size=64)
    ParallelLayout(pipeline_parallel=2, expert_parallel=2).validate(4, num_layers=2, num_experts=4)
    assert ParallelLayout(tensor_parallel=2).sp and not ParallelLayout().sp
    assert ParallelLayout(tensor_parallel=2).data_parallel(8) == 4
