"""Plan a run's layout: ``python -m pretrain.plan_layout RUN_OR_PRESET --gpus N [options]``.

Every TP x PP x DP x ZeRO (0-3) x micro-batch layout that can run the model on the cluster (the project's own
layout rules, a TP group inside a node), ranked by predicted step time, with memory per GPU, collective bytes
per step by group, the pipeline bubble and the time split; then the best layout's sbatch line.

RUN_OR_PRESET is a run file of conf/run (its global batch, micro-batch default and precision are used) or a
model preset of conf/model. Bandwidths, latencies and the compute rate are assumptions (options below); the byte
counts follow the code and are checked against measured runs on CPU (docs/planner.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, as every other mistake here
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m pretrain.plan_layout", description=__doc__.split("\n\n")[1],
                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="RUN_OR_PRESET", help="run file (conf/run/NAME) or model preset (conf/model/NAME)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all (a multiple of --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", choices=("h100", "h200"), default="h100",
                   help="H100 80 GB or H200 141 GB; both 989 dense bf16 TFLOP/s (default h100)")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="memory per GPU in GB (default: the GPU's)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="sequences per optimizer step (default: the run file's parallel.global_batch_size, or 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="default: the run file's train.precision (auto is bf16 on GPUs), else bf16")
    p.add_argument("--intra-bw", type=float, default=450.0,
                   help="NVLink bandwidth per GPU and direction, GB/s (default 450: H100 SXM, effective)")
    p.add_argument("--inter-bw", type=float, default=50.0,
                   help="InfiniBand bandwidth per GPU, GB/s (default 50: 400 Gb/s)")
    p.add_argument("--alpha-us", default="3,10", metavar="INTRA[,INTER]",
                   help="latency per message in microseconds, inside a node and across nodes (default 3,10)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--mfu", type=float, default=None,
                      help="fraction of the GPU's bf16 peak the model's FLOPs run at (default 0.4)")
    rate.add_argument("--tokens-per-s-json", metavar="BENCH.json", default=None,
                      help="a JSON line of python -m pretrain.tools.bench or model_bench: its TFLOP/s per GPU (or "
                           "tokens/s x this model's FLOPs per token) is the compute rate")
    p.add_argument("--activation-checkpointing", choices=("off", "on", "both"), default=None,
                   help="layouts with activation checkpointing off, on, or both (default: the run file's setting)")
    p.add_argument("--max-micro-batch", type=int, default=64, help="largest micro-batch tried (default 64)")
    p.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    p.add_argument("--all-micro-batches", action="store_true",
                   help="a row for every micro-batch size (default: each layout's fastest one that fits)")
    p.add_argument("--include-oom", action="store_true", help="also list the layouts that do not fit in memory")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def _shape(pred) -> tuple:
    lay = pred.layout
    return lay.tp, lay.sp, lay.pp, lay.dp, lay.zero, lay.checkpointing


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    from conf import cli_errors
    try:
        with cli_errors():
            return run(args)
    except BrokenPipeError:   # `| head`: the reader has what it wanted; nothing more to say at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(args: argparse.Namespace) -> int:
    from conf.errors import ConfigError
    from pretrain.plan.inputs import load_request
    from pretrain.plan.layouts import plan
    from pretrain.plan.report import as_json, header, sbatch_line, table

    cfg, cluster, request, options = load_request(args)
    preds = plan(cfg, cluster, global_batch=request.global_batch, seq_len=request.seq_len,
                 precision=options.precision, checkpointing=options.checkpointing,
                 max_micro_batch=args.max_micro_batch)
    if not preds:
        raise ConfigError(options.why_none())
    fitting = [p for p in preds if p.peak_memory <= cluster.memory]
    if not fitting and not args.include_oom:
        small = min(preds, key=lambda p: p.peak_memory)
        raise ConfigError(f"none of the {len(preds)} valid layouts fits in {cluster.memory / 1e9:.0f} GB per GPU (the "
                          f"smallest, {small.layout.describe()}, needs {small.peak_memory / 1e9:.1f} GB); try "
                          "--activation-checkpointing both, more GPUs or a smaller --global-batch")
    rows = preds if args.include_oom else fitting
    if not args.all_micro_batches:   # each layout once: its first (fastest) micro-batch, one that fits if any
        seen: set = set()
        rows = [p for p in sorted(rows, key=lambda p: p.peak_memory > cluster.memory)
                if not (_shape(p) in seen or seen.add(_shape(p)))]
        rows.sort(key=lambda p: p.peak_memory > cluster.memory)   # stable: fastest first within each
    shown = [(p, p.peak_memory <= cluster.memory) for p in rows][:args.top]
    best = fitting[0] if fitting else None
    if args.json:
        print(json.dumps(as_json(shown, cluster, request), indent=1))
        return 0
    print(header(request, cluster, len(preds), len(fitting)))
    print()
    print(table(shown))
    if best is not None:
        print()
        print(f"best: {best.layout.describe()}, {best.time.total:.3f} s per step, "
              f"{best.peak_memory / 1e9:.1f} GB per GPU")
        print(sbatch_line(best, cluster, request))
    return 0
