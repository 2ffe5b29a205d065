"""The training loop (trainer) and what hangs on it: callbacks, checkpoints and resume, validation, the LR
schedule, metrics, preemption and fault injection points."""
