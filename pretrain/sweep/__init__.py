"""Sweeps: ``python -m pretrain.sweep SWEEP.yaml`` reads the sweep file and expands it into points (spec),
validates and submits them as one submitit job array (plan), then gathers the results (results)."""
