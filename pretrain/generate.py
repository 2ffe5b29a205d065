"""``python -m pretrain.generate``: the command keeps its name; the code is pretrain/serve/generate.py."""
import sys

from pretrain.serve.generate import main

if __name__ == "__main__":
    sys.exit(main())
