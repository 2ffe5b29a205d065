"""``python -m pretrain.plan_layout``: the command; the code is pretrain/plan/ (cli.py for the options)."""
import sys

from pretrain.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
