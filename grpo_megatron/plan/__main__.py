"""`python -m grpo_megatron.plan`: see grpo_megatron/plan/cli.py."""
import sys

from grpo_megatron.plan.cli import main

sys.exit(main())
