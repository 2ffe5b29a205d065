"""Training-step throughput of model configs, measured in one process so the ratios are fair.

    python -m pretrain.tools.model_bench 360m_vanilla 360m_mor_ec [--batch 16] [--seq-len 2048] [--steps 10] [--compile]

Each config trains ``--steps`` timed steps (after warm-up) of forward + backward + fused AdamW in bf16 autocast
with fp32 master weights on random tokens. Prints tokens/s, model TFLOP/s (from model/flops.py, causal
attention), MFU against the stated peak, peak memory, and each config's speed relative to the first one. The model
alone, without the distributed engine (for that: pretrain.tools.bench); a tool, not part of model/, because it
sets up megatron's one-process world from pretrain.parallel.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from conf import cli_errors, load_config
from model.attention import flash_available
from model.config import ModelConfig
from model.flops import param_counts, training_flops
from model.layers import make_parallel_config
from model.mor import MoRModel
from pretrain.parallel.layout import init_single_process


def bench_one(cfg, *, batch: int, seq_len: int, steps: int, warmup: int, compile_model: bool, peak_tflops: float,
              profile: bool = False):
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
    result = {"config": cfg.name, "unique_params": param_counts(cfg)["unique"], "tokens_per_s": round(tok_s),
              "tflops": round(tok_s * flops_tok / 1e12, 1), "mfu": round(tok_s * flops_tok / (peak_tflops * 1e12), 3),
              "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1), "loss": round(out.lm_loss.item(), 3)}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.tools.model_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="YAML files or presets; the first one is the baseline")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every config")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: pretrain.tools.model_bench needs a CUDA GPU")
    with cli_errors():
        cfgs = [load_config(c, args.set, schema=ModelConfig) for c in args.configs]
    init_single_process()
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  flash-attn: {flash_available()}  "
          f"batch {args.batch} x seq {args.seq_len}  compile={args.compile}", flush=True)
    results = []
    for cfg in cfgs:
        try:
            r = bench_one(cfg, batch=args.batch, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
                          compile_model=args.compile, peak_tflops=args.peak_tflops,
                          profile=args.profile)
        except torch.OutOfMemoryError:
            r = {"config": cfg.name, "tokens_per_s": None, "error": "out of memory"}
        gc.collect()  # free this config's model and optimizer before the next one
        torch.cuda.empty_cache()
        if results and results[0].get("tokens_per_s") and r.get("tokens_per_s"):
            r["speed_vs_first"] = round(r["tokens_per_s"] / results[0]["tokens_per_s"], 3)
        results.append(r)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
