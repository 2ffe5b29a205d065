"""Training: ``python -m pretrain.train`` (train.py) over the rooms parallel/ (layout, the engine seam), data/
(the shard loader), training/ (the loop and its callbacks), sweep/ and tools/."""
