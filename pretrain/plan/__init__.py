"""The layout planner (``python -m pretrain.plan_layout``): for a model and a cluster, every valid TP × PP × DP ×
ZeRO × micro-batch layout with its predicted memory per GPU, collective bytes per step and step time.

    shapes     what runs where: parameters per pipeline stage (TP-local), layer ops and their token counts
    zero3      DeepSpeed ZeRO-3's parameter gathers, replayed from the module order
    traffic    payload bytes per optimizer step by (kind, group), per pipeline stage
    memory     bytes per GPU: weights, gradients, optimizer state, activations
    timing     an α–β model of the collectives plus compute time from model/flops.py
    layouts    the enumeration and its validity rules
    report     the ranked table, the sbatch line, JSON
    inputs     the run or preset, the cluster and the compute rate from the command line; its one-line errors
    cli        the command line

The byte counts are the quantity that pretrain/parallel/traffic.py measures (its docstring defines it);
tests/plan checks the two against each other on CPU runs.
"""
