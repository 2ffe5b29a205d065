"""The training loop (trainer) and what hangs on it: callbacks, validation, the LR schedule, metrics, preemption,
the run lock. Checkpoints are pretrain/checkpoint/'s."""
