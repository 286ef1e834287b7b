"""examples/tool_use in its quick mode: the example's own checkpoint and data, tool-transcript SFT, RL steps
with the tool loop, and the before/after report (its numbers are the README's only in the full run)."""
import json

from tests.conftest import run_cli


def test_quick_tool_use_example_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(["examples/tool_use/run.py", "--quick", "--cache", str(tmp_path / "cache"),
                      "--run-dir", str(run_dir), "--logging.progress_bar", "false"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "== tool-use example: 16 held-out prompts, with the calculator" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["sampled_reward"]) == 2
    for stage in ("initial", "before_rl", "after_rl"):
        assert all(0 <= results[stage][k] <= 1 for k in ("accuracy", "tool_call_rate", "sampled_tool_call_rate"))
    assert results["before_rl"]["sft_loss_last"] < results["before_rl"]["sft_loss_first"]
    # the tokenizer of the example's checkpoint has the tool words; the shared tiny one is unchanged
    tokenizer = tmp_path / "cache" / "tiny_qwen3_moe_tools_hf" / "tokenizer.json"
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    assert {"<tool_call>", "</tool_call>", "calculator"} <= set(vocab) and len(vocab) == 70
