"""``python -m pretrain.export``: see pretrain/export/__init__.py."""
import sys

from pretrain.export import main

sys.exit(main())
