"""Serving a trained model: generation from a checkpoint (generate), and the benchmarks of the serving engine
(bench: continuous batching against a static batch; decode_bench: one decode step). The weights come through
pretrain/checkpoint/, never through training."""
