"""``python -m pretrain.serve_bench``: the command keeps its name; the code is pretrain/serve/bench.py."""
import sys

from pretrain.serve.bench import main

if __name__ == "__main__":
    sys.exit(main())
