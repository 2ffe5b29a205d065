"""Training-step throughput of model configs, measured in one process so the ratios are fair.

    python -m pretrain.tools.model_bench 360m_vanilla 360m_mor_ec 360m_mor_tc,tc_capacity=1.25 [--batch 16,32]
        [--seq-len 2048] [--steps 10] [--compile] [--baseline anchor.jsonl]

Each config trains ``--steps`` timed steps (after warm-up) of forward + backward + fused AdamW in bf16 autocast
with fp32 master weights on random tokens. Prints tokens/s, model TFLOP/s (from model/flops.py, causal
attention), MFU against the stated peak, peak memory, and each row's speed relative to the first one and, with
``--baseline``, to the yardstick's run (pretrain/tools/baseline.py). ``--batch`` takes several micro-batch
sizes: each config runs at each, to find the one that suits it best. The model
alone, without the distributed engine (for that: pretrain.tools.bench); a tool, not part of model/, because it
sets up megatron's one-process world from pretrain.parallel.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

# torch and the model are imported where they are used, so that --help answers at once


def bench_one(cfg, *, batch: int, seq_len: int, steps: int, warmup: int, compile_model: bool, peak_tflops: float,
              profile: bool = False):
    import torch

    from model.flops import param_counts, training_flops
    from model.layers import make_parallel_config
    from model.mor import MoRModel
    device = torch.device("cuda")
    model = MoRModel(cfg, make_parallel_config(cfg, use_cpu_initialization=False)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_fn = torch.compile(model) if compile_model else model
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = step_fn(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    for _ in range(warmup):
        out = step()
    torch.cuda.synchronize()
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tok_s = batch * seq_len * steps / elapsed
    flops_tok = training_flops(cfg, seq_len).training_per_token
    result = {"config": cfg.name, "micro_batch": batch, "unique_params": param_counts(cfg)["unique"], "tokens_per_s": round(tok_s),
              "tflops": round(tok_s * flops_tok / 1e12, 1), "mfu": round(tok_s * flops_tok / (peak_tflops * 1e12), 3),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1), "loss": round(out.lm_loss.item(), 3)}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.tools.model_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="YAML files or presets, each optionally with its own overrides "
                        "after commas (360m_mor_tc,tc_capacity=1.25); the first row is what speed_vs_first divides by")
    parser.add_argument("--batch", default="16", help="micro-batch size, or several comma-separated (16,32)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every config")
    parser.add_argument("--baseline", metavar="FILE", help="the yardstick's JSON lines: add each row's ratio to it")
    parser.add_argument("--baseline-batch", type=int, default=None,
                        help="which of the baseline's runs (its micro-batch; default its first)")
    args = parser.parse_args(argv)
    import torch

    from conf import cli_errors, load_config
    from conf.errors import ConfigError
    from model.attention import flash_available
    from model.config import ModelConfig
    from pretrain.parallel.layout import init_single_process
    from pretrain.tools.baseline import describe, ratio, read_baseline
    with cli_errors():
        batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
        if not batches or min(batches) < 1:
            raise ConfigError(f"--batch {args.batch}: give micro-batch sizes >= 1, e.g. 16 or 16,32")
        cfgs = []
        for spec in args.configs:   # CONFIG[,key=value...]: overrides for this config alone, after --set
            name, *own = spec.split(",")
            cfgs.append(load_config(name, [*args.set, *own], schema=ModelConfig))
        base = read_baseline(args.baseline, args.baseline_batch) if args.baseline else None
    if not torch.cuda.is_available():
        raise SystemExit("error: pretrain.tools.model_bench needs a CUDA GPU")
    init_single_process()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  flash-attn: {flash_available()}  "
          f"micro-batch {args.batch} x seq {args.seq_len}  compile={args.compile}", flush=True)
    if base is not None:
        print(f"# {describe(base)}", flush=True)
    results = []
    for cfg in cfgs:
        for batch in batches:
            try:
                r = bench_one(cfg, batch=batch, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                              compile_model=args.compile, peak_tflops=args.peak_tflops, profile=args.profile)
            except torch.OutOfMemoryError:
                r = {"config": cfg.name, "micro_batch": batch, "tokens_per_s": None, "error": "out of memory"}
            gc.collect()  # free this run's model and optimizer before the next one
            torch.cuda.empty_cache()
            if results and results[0].get("tokens_per_s") and r.get("tokens_per_s"):
                r["speed_vs_first"] = round(r["tokens_per_s"] / results[0]["tokens_per_s"], 3)
            if base is not None:
                r["vs_baseline"] = ratio(r.get("tokens_per_s"), base)
            results.append(r)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
