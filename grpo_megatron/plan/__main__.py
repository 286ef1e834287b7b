"""`python -m grpo_megatron.plan`: see grpo_megatron/plan/cli.py."""
import sys

from grpo_megatron.plan.cli import main

if __name__ == "__main__":  # importing the package's modules (scripts/check_imports.py) must not run it
    sys.exit(main())
