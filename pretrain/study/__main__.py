"""``python -m pretrain.study``: see pretrain/study/cli.py."""
import sys

from pretrain.study.cli import main

sys.exit(main())
