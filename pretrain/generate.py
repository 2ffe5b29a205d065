"""``python -m pretrain.generate``: the command's name since the first release; the code is pretrain/serve/generate.py."""
import sys

from pretrain.serve.generate import main

if __name__ == "__main__":
    sys.exit(main())
