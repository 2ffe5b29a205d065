"""Parallelism: the layout and megatron's groups (layout), the DeepSpeed engine and ZeRO (zero), the pipeline
over a weight-shared model (pipeline), CPU shims for megatron (cpu_compat), and the seam the training loop calls
(engine): the model as the engine runs it."""
