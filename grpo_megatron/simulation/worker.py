"""`python -m grpo_megatron.simulation.worker '<RankSpec JSON>'`: simulate one rank in this fresh interpreter (started
with the shim preloaded by `simulate_rank`) and print `RANK_MEMORY <json>` as the last line."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict


def main(argv: list[str]) -> None:
    from grpo_megatron.simulation import shim
    from grpo_megatron.simulation.rank import RankSpec, simulate_rank_here

    shim.self_test()
    result = simulate_rank_here(RankSpec.from_json(argv[0]))
    print("RANK_MEMORY " + json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
