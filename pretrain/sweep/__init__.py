"""Sweeps: ``python -m pretrain.sweep SWEEP.yaml`` expands a grid into runs (plan) and submits them as one
submitit job array, then gathers the results (results)."""
