"""Serving throughput, the paper's protocol: ``python -m pretrain.serve_bench MODEL...``.

    python -m pretrain.serve_bench 360m_vanilla 360m_mor_ec --device cuda --dtype bf16 --batch 32,max
    python -m pretrain.serve_bench tiny_vanilla tiny_mor_ec --requests 64 --gen-mean 48 --gen-std 12 --batch 8

Protocol (Bae et al., §3.3 and appendix E): requests wait in a queue; each has no prompt (a start token) and a
generation length drawn from a normal distribution (--gen-mean, --gen-std; clipped to 1 .. mean + 4 std and to
the shortest max_seq_len of the models, so every model serves the same lengths, --seed). --batch slots decode
together; a slot whose sequence ends takes the next request at once. How a model is served:

    no router (vanilla, recursive)   the plain batched decode, static KV cache (model/inference/static.py)
    MoR                              continuous depth-wise batching over recursion-wise KV pools, step r's
                                     holding c_r x slots x max_len positions (model/inference/engine.py)

--batch max sizes the slots per model from memory: the device's free memory (CPU: available RAM; --memory MIB
instead), less --headroom for activations, divided by what one more slot costs under the model's allocation
policy at the longest length served — so a model whose deeper steps cache fewer tokens gets more slots. The
timed queue holds max(--requests, --fill x slots) requests, enough to keep the slots full; each model first
serves --warmup requests untimed. Several settings (--batch 32,max) make one table. Generation samples
(--temperature, seeded) and stops only at the drawn length, so every model makes the same tokens per request.

Each model and setting is measured in a process of its own, forked from a server process that loaded the
libraries and never builds a model: peak memory is that process's (CPU: its ru_maxrss, the libraries' pages it
touches included; CUDA: max_memory_allocated, weights included). Weights are random unless --checkpoint gives a
run per model. A random router does not route like a trained one: --depths f1,f2,... biases an expert-choice
model's routers (calibrated on random tokens) so that about f_d of the tokens take d recursion steps; the
realised shares are printed.

Columns: tokens/s (wall clock) and vs first, its ratio to the first model at the same setting (put the baseline
first); the same per second of the measuring process's CPU time (steadier than the wall clock on a shared
machine, not a replacement for it); bound: the compute bound of the ratio, the first model's layer passes per
token over this model's (passes = unique first and last layers + mean depth x layers per step, from the
realised depths; vanilla: n_layers) — a ratio above it means each layer pass cost less than the first model's
(batch size, per-iteration overhead, idle slots), which a note under the table says; ms per iteration; rows per
call of the recursion block; KV MiB allocated (keys, values and their index); peak MiB; preemptions (sequences
set back because a pool was full); the realised depth shares (0..Nr steps).
--markdown prints the table as markdown; --json FILE writes the same numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from conf.errors import one_line

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

_DTYPES = ("fp32", "bf16")


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.serve_bench", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model presets (conf/model/NAME.yaml) or YAML paths; the first is the "
                                             "baseline of the ratios (with --checkpoint: labels)")
    p.add_argument("--checkpoint", action="append", default=None, metavar="RUN",
                   help="a run or checkpoint folder per model, in order (trained weights and their config)")
    p.add_argument("--requests", type=int, default=1000, help="timed requests, at least (default 1000)")
    p.add_argument("--fill", type=int, default=4, help="timed requests per slot, at least (default 4)")
    p.add_argument("--gen-mean", type=float, default=256.0, help="mean generation length (default 256)")
    p.add_argument("--gen-std", type=float, default=64.0, help="its standard deviation (default 64)")
    p.add_argument("--batch", default="32", help="slots: a number, max, or several, e.g. 32,max (default 32)")
    p.add_argument("--memory", type=float, default=None, metavar="MIB",
                   help="--batch max: size the slots from this much memory instead of the device's free memory")
    p.add_argument("--headroom", type=float, default=None,
                   help="--batch max: the share of that memory kept for activations (default 0.2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed requests first (default: one per slot)")
    p.add_argument("--depths", default=None, metavar="F1,F2,...",
                   help="expert-choice models (others ignore it): shares of tokens taking 1..Nr recursion steps, "
                        "reached by a calibrated router bias")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of each measuring process (torch.set_num_threads; default: torch's choice)")
    p.add_argument("--dtype", default="fp32", choices=list(_DTYPES), help="weights and caches (default fp32)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature, finite, >= 0 (default 1.0; 0 = greedy: a random model then repeats "
                        "one token, and every token takes the same path)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the lengths and sampling (default 0)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return p


@dataclass
class Job:
    """One measurement, run in its own process."""
    label: str
    preset: Optional[str]          # the model config to build (random weights), or None with a checkpoint
    checkpoint: Optional[str]
    server: str                    # "static" or "depth-wise"
    batch: str                     # a number or "max"
    depths: Optional[list[float]]  # router steering, expert-choice models only
    limit: int                     # tokens a slot holds: the longest request (1 + the longest generation)
    args: dict


# ---- checks: every mistake is one line before any work --------------------------------------------------------
def plan(args: argparse.Namespace) -> list[Job]:
    """The measurements the options ask for, in order; ConfigError (one line) for any mistake."""
    import torch

    from conf import load_config
    from conf.errors import ConfigError
    from model.config import ModelConfig
    from model.inference.depths import check_depths, steerable
    from model.routing import routing_class
    batches = args.batch.split(",")
    for b in batches:
        if b != "max" and not (b.isdigit() and int(b) >= 1):
            raise ConfigError(f"--batch: {b!r} is neither a number >= 1 nor max (e.g. --batch 32 or --batch 32,max)")
    if len(set(batches)) != len(batches):
        raise ConfigError(f"--batch: {args.batch} names a setting twice")
    for name, value, low in (("--requests", args.requests, 1), ("--fill", args.fill, 1)):
        if value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be >= 1, got {args.threads}")
    if args.warmup is not None and args.warmup < 0:
        raise ConfigError(f"--warmup: must be >= 0 (0: none), got {args.warmup}")
    for name, value, low, note in (("--gen-mean", args.gen_mean, 1, ""), ("--gen-std", args.gen_std, 0, ""),
                                   ("--temperature", args.temperature, 0, " (0: greedy)")):
        if not (math.isfinite(value) and value >= low):   # NaN fails every comparison: ask for what is valid
            raise ConfigError(f"{name}: must be a finite number >= {low}{note}, got {value}")
    if not -2**63 <= args.seed < 2**63:
        raise ConfigError(f"--seed: must be in [-2**63, 2**63), got {args.seed}")
    for name, value in (("--memory", args.memory), ("--headroom", args.headroom)):
        if value is not None and "max" not in batches:
            raise ConfigError(f"{name}: sizes --batch max only; with --batch {args.batch} it would do nothing")
    if args.memory is not None and not (math.isfinite(args.memory) and args.memory > 0):
        raise ConfigError(f"--memory: must be a finite number of MiB > 0, got {args.memory}")
    if args.headroom is not None and not (math.isfinite(args.headroom) and 0 <= args.headroom < 1):
        raise ConfigError(f"--headroom: must be in [0, 1), got {args.headroom}")
    if args.json is not None:
        parent = args.json.parent
        if args.json.is_dir():
            raise ConfigError(f"--json: {args.json} is a folder; give a file path, e.g. {args.json / 'serve.json'}")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ConfigError(f"--json: {parent} is not a folder we can write to; create it or give another path")
    if args.checkpoint and len(args.checkpoint) != len(args.models):
        raise ConfigError(f"--checkpoint: given {len(args.checkpoint)} times for {len(args.models)} models; give "
                          "one per model, in order")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")
    depths = None
    if args.depths is not None:
        try:
            depths = [float(f) for f in args.depths.split(",")]
        except ValueError:
            raise ConfigError(f"--depths: {args.depths!r} is not a comma-separated list of numbers") from None
        if not all(math.isfinite(f) for f in depths):
            raise ConfigError(f"--depths: {args.depths!r} holds a value that is not finite")
    configs = []
    for i, name in enumerate(args.models):
        if args.checkpoint:
            from pretrain.checkpoint.verify import CheckpointError
            from pretrain.checkpoint.consolidate import open_checkpoint
            try:
                configs.append(open_checkpoint(Path(args.checkpoint[i])).run.model)
            except CheckpointError as e:
                raise ConfigError(f"--checkpoint {args.checkpoint[i]}: {e}") from None
        else:
            configs.append(load_config(name, [], schema=ModelConfig))
    steered = [steerable(cfg) for cfg in configs]
    routed = [routing_class(cfg).has_router for cfg in configs]   # no router: the plain batched decode
    if depths is not None:
        if not any(steered):
            raise ConfigError("--depths: none of the models routes by expert choice; it would steer nothing")
        for name, cfg, s in zip(args.models, configs, steered):
            if s:
                try:
                    check_depths(cfg, depths, f"--depths for {name}")
                except ValueError as e:
                    raise ConfigError(str(e)) from None
    limit = min(min(cfg.max_seq_len for cfg in configs), math.ceil(args.gen_mean + 4 * args.gen_std) + 1)
    if "max" in batches and args.memory is not None:   # the free memory is only known where the model is loaded
        from model.inference.kv_pool import max_slots
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        for cfg, pooled in zip(configs, routed):
            if max_slots(cfg, budget_bytes(vars(args), None), limit, pooled=pooled, dtype=dtype) == 0:
                raise ConfigError(_too_small(budget_bytes(vars(args), None), cfg, limit, pooled, dtype))
    return [Job(name, None if args.checkpoint else name, args.checkpoint[i] if args.checkpoint else None,
                "depth-wise" if r else "static", b, depths if s else None, limit, vars(args))
            for b in batches for i, (name, r, s) in enumerate(zip(args.models, routed, steered))]


def lengths(n: int, mean: float, std: float, limit: int, seed: int) -> list[int]:
    """``n`` generation lengths ~ N(mean, std), clipped to 1..limit-1; the first k of n are the k drawn alone."""
    g = random.Random(seed)
    return [min(limit - 1, max(1, round(g.gauss(mean, std)))) for _ in range(n)]


# ---- one measurement (in its own process) -----------------------------------------------------------------------
def _free_bytes(device) -> int:
    import torch
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes(device) -> int:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def budget_bytes(args: dict, device) -> float:
    """--batch max: the memory the caches may take (--memory or the free memory, less the headroom)."""
    memory = args["memory"] * 2**20 if args["memory"] is not None else _free_bytes(device)
    return memory * (1 - (args["headroom"] if args["headroom"] is not None else 0.2))


def _too_small(budget: float, cfg, limit: int, pooled: bool, dtype) -> str:
    from model.inference.kv_pool import server_bytes
    one = server_bytes(cfg, 1, limit, pooled=pooled, dtype=dtype)
    return (f"--batch max: {budget / 2**20:.2f} MiB (after --headroom) holds not one sequence's KV cache "
            f"({one / 2**20:.2f} MiB at {limit} tokens); give more --memory or less --headroom")


def measure(job: Job) -> dict:
    import torch

    from conf import load_config
    from model.config import ModelConfig
    from model.inference import DepthBatchServer, Request, Sampling, StaticBatchServer
    from model.inference.depths import calibrate_depths, layer_passes
    from model.inference.kv_pool import max_slots
    from model.layers import use_attention_backend
    from model.mor import MoRModel
    from pretrain.parallel.layout import init_single_process
    init_single_process()
    a = job.args
    if a["threads"] is not None:
        torch.set_num_threads(a["threads"])
    device, dtype = torch.device(a["device"]), {"fp32": torch.float32, "bf16": torch.bfloat16}[a["dtype"]]
    if job.checkpoint:
        from pretrain.checkpoint.consolidate import load
        model = load(Path(job.checkpoint)).model
    else:
        torch.manual_seed(a["seed"])
        model = MoRModel(load_config(job.preset, [], schema=ModelConfig))
    model = model.to(device=device, dtype=dtype).eval()
    use_attention_backend(model, device)
    cfg = model.cfg
    if job.depths:
        calibrate_depths(model, job.depths)
    max_len, pooled = job.limit, job.server != "static"
    slots = int(job.batch) if job.batch != "max" else max_slots(cfg, budget_bytes(a, device), max_len,
                                                                 pooled=pooled, dtype=dtype)
    if slots == 0:
        raise ValueError(_too_small(budget_bytes(a, device), cfg, max_len, pooled, dtype))
    n = max(a["requests"], a["fill"] * slots)
    print(f"{job.label}, --batch {job.batch}: {slots} slots, {n} timed requests, {job.server}", file=sys.stderr,
          flush=True)
    timed = lengths(n, a["gen_mean"], a["gen_std"], max_len, a["seed"])
    warm = lengths(slots if a["warmup"] is None else a["warmup"], a["gen_mean"], a["gen_std"], max_len, a["seed"] + 1)
    kind = StaticBatchServer if job.server == "static" else DepthBatchServer
    server = kind(model, slots, max_len, cache_dtype=dtype, sampling=Sampling(temperature=a["temperature"],
                                                                               seed=a["seed"]))
    kv = server.cache if job.server == "static" else server.pool
    server.run([Request([0], k) for k in warm])
    server.stats = server.new_stats()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0, cpu0 = time.perf_counter(), time.process_time()
    server.run([Request([0], k) for k in timed])
    sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    st = server.stats
    shares = [c / max(1, sum(st.depth_counts)) for c in st.depth_counts]
    rows = st.block_rows if job.server != "static" else st.fed
    return {"model": job.label, "server": job.server, "batch": job.batch, "slots": slots, "requests": n,
            "max_len": max_len, "tokens": st.tokens, "fed": st.fed, "seconds": wall, "tokens_per_s": st.tokens / wall,
            "cpu_seconds": cpu, "tokens_per_cpu_s": st.tokens / cpu,
            "iterations": st.ticks, "ms_per_iteration": 1000 * wall / max(1, st.ticks),
            "rows_per_block_call": rows / max(1, st.ticks), "preemptions": st.preemptions,
            "kv_bytes": kv.allocated_bytes() + kv.index_bytes(), "peak_bytes": _peak_bytes(device),
            "depth_shares": shares, "layer_passes": layer_passes(cfg, shares), "device": str(device)}


def _child(job: Job, conn) -> None:
    from conf.errors import ConfigError
    # a world of one of its own: not the rendezvous of whatever started the benchmark (torchrun, a test process)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)
    try:
        conn.send(measure(job))
    except (ConfigError, ValueError) as e:     # a mistake only the loaded model shows (e.g. too little memory)
        conn.send({"error": one_line(e, None, name=False)})
    finally:
        conn.close()


def run_job(job: Job) -> dict:
    """``measure(job)`` in a process of its own: its peak memory is that measurement's alone."""
    from conf.errors import ConfigError
    # forked from a server process that imported the libraries once and never builds a model: each measurement
    # starts in seconds, holds no memory of another, and never inherits a CUDA context
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["conf", "model.inference", "model.mor", "pretrain.parallel.layout"])
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(job, there))
    proc.start()
    there.close()
    try:
        result = here.recv()
    except EOFError:
        result = None
    proc.join()
    if result is None:
        raise ConfigError(f"{job.label} at --batch {job.batch}: the measuring process ended without a result "
                          f"(exit code {proc.exitcode}; its error is above)")
    if "error" in result:
        raise ConfigError(f"{job.label} at --batch {job.batch}: {result['error']}")
    return result


# ---- the report --------------------------------------------------------------------------------------------------
COLUMNS = ("model", "server", "batch", "slots", "requests", "tokens/s", "vs first", "tok/CPU s", "vs first (CPU)",
           "bound", "ms/iter", "rows/iter", "KV MiB", "peak MiB", "preempt", "depths 0..Nr")


def compare(results: list[dict]) -> None:
    """Add each result's ratios to the first model at its setting (wall clock and CPU time), its compute bound
    and its pass speed (the wall-clock ratio over the bound)."""
    first: dict[str, dict] = {}
    for r in results:
        base = first.setdefault(r["batch"], r)
        r["vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["vs_first_cpu"] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        r["compute_bound"] = base["layer_passes"] / r["layer_passes"]
        r["pass_speed"] = r["vs_first"] / r["compute_bound"]


def _cells(r: dict) -> list[str]:
    return [r["model"], r["server"], r["batch"], str(r["slots"]), str(r["requests"]), f"{r['tokens_per_s']:,.0f}",
            f"{r['vs_first']:.2f}", f"{r['tokens_per_cpu_s']:,.0f}", f"{r['vs_first_cpu']:.2f}",
            f"{r['compute_bound']:.2f}", f"{r['ms_per_iteration']:.2f}", f"{r['rows_per_block_call']:.1f}",
            f"{r['kv_bytes'] / 2**20:.1f}", f"{r['peak_bytes'] / 2**20:,.0f}", str(r["preemptions"]),
            "/".join(f"{d:.2f}" for d in r["depth_shares"])]


def report(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"{args.device} {args.dtype}; generation lengths ~ N({args.gen_mean:g}, {args.gen_std:g}), 1.."
             f"{results[0]['max_len'] - 1}; timed requests max(--requests {args.requests}, --fill {args.fill} x "
             f"slots); temperature {args.temperature:g}"]
    table = [list(COLUMNS)] + [_cells(r) for r in results]
    if args.markdown:
        lines += ["", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        lines += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                  for row in table]
    for r in results:
        if r["vs_first"] > r["compute_bound"] * 1.001:
            base = next(b for b in results if b["batch"] == r["batch"])
            lines.append(f"note: {r['model']} at batch {r['batch']}: {r['vs_first']:.2f}x the first model, above "
                         f"its compute bound {r['compute_bound']:.2f}x: a layer pass cost {1 / r['pass_speed']:.2f} of "
                         f"the first model's ({r['rows_per_block_call']:.0f} rows per block call against "
                         f"{base['rows_per_block_call']:.0f}, {r['slots']} slots against {base['slots']}): batch "
                         "size, per-iteration overhead and idle slots, not fewer layers, make the difference")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from conf import cli_errors
    from conf.files import atomic_write_text
    args = _parser().parse_args(argv)
    with cli_errors():
        jobs = plan(args)
        results = [run_job(job) for job in jobs]
    compare(results)
    print(report(results, args))
    if args.json:
        atomic_write_text(args.json, json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                 "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
