"""Tools around training: the end-to-end demo, benchmarks and plots. Each runs as ``python -m pretrain.tools.X``."""
