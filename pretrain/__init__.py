"""Training: ``python -m pretrain.train`` (train.py) over the rooms parallel/ (layout, the engine seam), data/
(the shard loader), training/ (the loop and its callbacks), sweep/ and tools/."""
from conf.imports import defer_compile_in_megatron

# Before any module here imports megatron-core: its import then skips torch.compile's ~2 s start-up (conf/imports.py).
defer_compile_in_megatron()
