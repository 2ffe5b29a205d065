"""Inference throughput with continuous depth-wise batching, the paper's protocol: ``python -m pretrain.serve_bench``.

    python -m pretrain.serve_bench 360m_vanilla 360m_mor_ec --device cuda --dtype bf16 --batch 32
    python -m pretrain.serve_bench 360m_vanilla 360m_mor_ec --device cuda --dtype bf16 --batch max
    python -m pretrain.serve_bench tiny_vanilla tiny_mor_ec --requests 64 --gen-mean 48 --gen-std 12 --batch 8

Protocol (Bae et al., §3.3 and appendix E): ``--requests`` requests wait in a queue; each has no prompt (a start
token) and a generation length drawn from a normal distribution (``--gen-mean``, ``--gen-std``, clipped to
1..max_seq_len-1; the same lengths for every model, ``--seed``). ``--batch`` slots decode together; when a
sequence ends its slot takes the next request at once (model/inference/engine.py). MoR models batch the tokens
of every recursion depth through the shared block together; vanilla and recursive models get the same engine as
ordinary continuous batching. ``--batch max`` sizes the slots from free memory (GPU: free device memory; CPU:
available RAM) and each slot's KV cache at its longest sequence, leaving ``--headroom`` for activations. Each
model first serves ``--warmup`` requests untimed (allocator, kernels), then the timed queue. Generation
samples (``--temperature``, seeded) and stops only at the drawn length (no EOS), so every model makes the same
number of tokens.

Weights are random unless ``--checkpoint`` gives a run (or checkpoint folder) per model. A random router's
decisions are not a trained one's: ``--depths f1,f2,...`` (expert-choice) gives each step's router a bias,
calibrated on random tokens, so that the fractions of tokens taking 1, 2, ... recursion steps come near f (the
paper's trained 360M models route most tokens shallow). The realised distribution is printed.

Prints, per model, from one run: generated tokens/s, mean time per engine iteration, KV-cache bytes (allocated
for the slots, and held per token at the end), peak memory, the realised depth distribution, and the ratio of
tokens/s to the first model (put the vanilla baseline first); ``--json FILE`` writes the same as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.serve_bench", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model presets (conf/model/NAME.yaml) or YAML paths; the first is the "
                                             "baseline of the ratios (with --checkpoint: labels)")
    p.add_argument("--checkpoint", action="append", default=None, metavar="RUN",
                   help="a run or checkpoint folder per model, in order (trained weights and their config)")
    p.add_argument("--requests", type=int, default=1000, help="requests in the timed queue (default 1000)")
    p.add_argument("--gen-mean", type=float, default=256.0, help="mean generation length (default 256)")
    p.add_argument("--gen-std", type=float, default=64.0, help="its standard deviation (default 64)")
    p.add_argument("--batch", default="32", help="slots decoding together: a number, or max (default 32)")
    p.add_argument("--headroom", type=float, default=0.2,
                   help="--batch max: the share of free memory kept for weights' activations (default 0.2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed requests first (default: one per slot)")
    p.add_argument("--depths", default=None, metavar="F1,F2,...",
                   help="expert-choice models (others ignore it): fractions of tokens taking 1..Nr recursion "
                        "steps, reached by a calibrated router bias")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--dtype", default="fp32", choices=list(_DTYPES), help="weights and caches (default fp32)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0; 0 = greedy: a random model then repeats one token, "
                        "and every token takes the same path)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the lengths and sampling (default 0)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON here")
    return p


def _lengths(n: int, mean: float, std: float, limit: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    drawn = torch.normal(mean, std, (n,), generator=g).round().clamp(1, limit)
    return [int(x) for x in drawn]


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # the process's, since it started


def calibrate_depths(model, fractions: list[float], *, tokens: int = 4096, seed: int = 0) -> list[float]:
    """Give each expert-choice step's router a bias so that, on random tokens under causal routing, the share of
    tokens running 1..Nr steps comes near ``fractions``. Returns the biases. Step by step: among the tokens that
    reach step r, the wanted share goes on, so the bias puts the router's logit quantile there."""
    import torch.nn as nn
    cfg = model.cfg
    nr = cfg.num_recursions
    from model.routing.expert_choice import ExpertChoiceRouting
    if not isinstance(model.router, ExpertChoiceRouting) or cfg.router.aux_router:
        raise ValueError("--depths needs expert-choice routing without an auxiliary router")
    if len(fractions) != nr or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"--depths: {nr} fractions that sum to 1 (tokens taking 1..{nr} steps)")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (max(1, tokens // cfg.max_seq_len), cfg.max_seq_len), generator=g)
    x = x.to(device)
    biases = []
    for r, head in enumerate(model.router.routers):
        old = head.net
        head.net = nn.Linear(old.in_features, 1, bias=True, device=device, dtype=old.weight.dtype)
        with torch.no_grad():
            head.net.weight.copy_(old.weight)
            head.net.bias.zero_()
    for r in range(nr):
        seen = []
        hook = model.router.routers[r].register_forward_hook(lambda m, i, o: seen.append(o.squeeze(-1).float()))
        model.trace = []
        with torch.no_grad():
            model(x, causal_routing=True)
        hook.remove()
        trace, model.trace = model.trace, None
        reached = trace[r - 1]["active"] if r > 0 else torch.ones_like(x, dtype=torch.bool)
        logits = seen[0][reached]
        # a token runs step index r iff its depth > r; of the tokens that reach it (depth ≥ r), that share
        share = sum(fractions[r:]) / max(sum(fractions[r - 1:]) if r > 0 else 1.0, 1e-9)
        if r == 0 and cfg.capacities[0] >= 1.0:
            bias = 0.0
        elif share <= 0:
            bias = -1e4
        elif share >= 1:
            bias = 1e4
        else:
            bias = -float(torch.quantile(logits, 1.0 - share))
        with torch.no_grad():
            model.router.routers[r].net.bias.fill_(bias)
        biases.append(bias)
    return biases


def bench_one(name: str, checkpoint: Optional[str], args, lengths: list[int], warmup: list[int],
              device: torch.device, dtype: torch.dtype) -> dict:
    from conf import load_config
    from model.config import ModelConfig
    from model.inference.engine import DepthBatchEngine, Request
    from model.inference.cache import KVCache
    from model.mor import MoRModel
    from pretrain.generate import open_generator
    if checkpoint:
        model = open_generator(Path(checkpoint), device=device.type, dtype=args.dtype).model
    else:
        torch.manual_seed(args.seed)
        model = MoRModel(load_config(name, [], schema=ModelConfig)).to(device=device, dtype=dtype).eval()
        from model.layers import use_attention_backend
        use_attention_backend(model, device)
    from model.routing.expert_choice import ExpertChoiceRouting
    if args.depths and isinstance(model.router, ExpertChoiceRouting):   # the others decide no depth by a threshold
        calibrate_depths(model, [float(f) for f in args.depths.split(",")])
    max_len = max(lengths + warmup) + 1
    per_slot = KVCache(model.cfg, 1, max_len, dtype=dtype, device="meta").allocated_bytes()
    if args.batch == "max":
        slots = max(1, int(_free_bytes(device) * (1 - args.headroom) // per_slot))
        slots = min(slots, len(lengths))
    else:
        slots = int(args.batch)
    from model.inference import Sampling
    engine = DepthBatchEngine(model, slots, max_len, cache_dtype=dtype,
                              sampling=Sampling(temperature=args.temperature, seed=args.seed))
    start_token = 0
    engine.run([Request([start_token], n) for n in warmup])
    engine.stats = type(engine.stats)(depth_counts=[0] * (engine.nr + 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    engine.run([Request([start_token], n) for n in lengths])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    st = engine.stats
    counts = st.depth_counts
    total = max(1, sum(counts))
    return {"model": name, "slots": slots, "requests": len(lengths), "tokens": st.tokens, "seconds": wall,
            "tokens_per_s": st.tokens / wall, "ms_per_iteration": 1000 * wall / max(1, st.ticks),
            "iterations": st.ticks, "block_rows_per_iteration": st.block_rows / max(1, st.ticks),
            "kv_allocated_bytes": engine.cache.allocated_bytes(), "kv_bytes_per_slot": per_slot,
            "peak_bytes": _peak_bytes(device),
            "depths": [c / total for c in counts[1:]] if engine.nr > 1 else [1.0]}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be >= 1")
    if args.batch != "max" and not (args.batch.isdigit() and int(args.batch) >= 1):
        parser.error(f"--batch: a number >= 1 or max, got {args.batch!r}")
    if args.gen_mean < 1 or args.gen_std < 0:
        parser.error("--gen-mean must be >= 1 and --gen-std >= 0")
    if args.checkpoint and len(args.checkpoint) != len(args.models):
        parser.error(f"--checkpoint given {len(args.checkpoint)} times for {len(args.models)} models")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    from conf import cli_errors, load_config
    from model.config import ModelConfig
    from pretrain.parallel.layout import init_single_process
    init_single_process()
    device, dtype = torch.device(args.device), _DTYPES[args.dtype]
    rows = []
    for i, name in enumerate(args.models):
        with cli_errors():
            ckpt = args.checkpoint[i] if args.checkpoint else None
            limit = (load_config(name, [], schema=ModelConfig).max_seq_len if not ckpt else 10**9) - 1
            lengths = _lengths(args.requests, args.gen_mean, args.gen_std, limit, args.seed)
            n_warm = args.warmup if args.warmup is not None else (int(args.batch) if args.batch != "max" else 8)
            warmup = _lengths(n_warm, args.gen_mean, args.gen_std, limit, args.seed + 1)
            try:
                rows.append(bench_one(name, ckpt, args, lengths, warmup, device, dtype))
            except ValueError as e:
                parser.error(f"{name}: {e}")
    base = rows[0]["tokens_per_s"]
    print(f"{args.device} {args.dtype}; {args.requests} requests, generation lengths ~ N({args.gen_mean:g}, "
          f"{args.gen_std:g}); batch {args.batch}")
    print(f"{'model':<24} {'slots':>5} {'tokens/s':>10} {'vs first':>8} {'ms/iter':>8} {'block rows':>10} "
          f"{'KV MiB':>8} {'peak MiB':>9}  depths 1..Nr")
    for r in rows:
        r["vs_first"] = r["tokens_per_s"] / base
        print(f"{r['model']:<24} {r['slots']:>5} {r['tokens_per_s']:>10,.0f} {r['vs_first']:>8.2f} "
              f"{r['ms_per_iteration']:>8.2f} {r['block_rows_per_iteration']:>10.1f} "
              f"{r['kv_allocated_bytes'] / 2**20:>8.1f} {r['peak_bytes'] / 2**20:>9.0f}  "
              + " ".join(f"{d:.2f}" for d in r["depths"]))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
