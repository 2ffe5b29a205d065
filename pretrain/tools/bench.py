"""Training throughput through the real distributed stack: megatron-core layers in a DeepSpeed ZeRO engine.

    python -m pretrain.tools.bench 360m_mor_ec --zero 2 [--batch 16] [--seq-len 2048] [--steps 10] [--compile]
    torchrun --nproc-per-node 8 -m pretrain.tools.bench 360m_mor_ec --zero 2 --tp 1
    python -m pretrain.tools.bench 360m_mor_ec --zero 2 --compile --baseline anchor.jsonl --baseline-batch 16

bf16 parameters with fp32 master weights in ZeRO's optimizer partitions, torch AdamW (fused on GPU), gradient
clipping at 1.0, random tokens. Prints tokens/s per GPU, model TFLOP/s and MFU (model/flops.py), peak memory,
and with ``--baseline`` the ratio to the yardstick's run (pretrain/tools/baseline.py).
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML file or preset from conf/model")
    parser.add_argument("overrides", nargs="*", help="dotted key=value model overrides")
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage 0-3 (default 2)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch size per GPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model inside the engine")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100: 989)")
    parser.add_argument("--baseline", metavar="FILE", help="the yardstick's JSON lines: add the ratio to it")
    parser.add_argument("--baseline-batch", type=int, default=None,
                        help="which of the baseline's runs (its micro-batch; default its first)")
    args = parser.parse_args(argv)
    # after the parse, so that --help answers at once
    import torch

    from conf import cli_errors, load_config
    from model.config import ModelConfig
    from model.flops import training_flops
    from pretrain.parallel.layout import ParallelConfig, init_distributed
    from pretrain.parallel.pipeline import build_stage
    from pretrain.parallel.zero import build_engine, param_groups
    from pretrain.tools.baseline import describe, ratio, read_baseline
    with cli_errors():
        base = read_baseline(args.baseline, args.baseline_batch) if args.baseline else None
    if not torch.cuda.is_available():
        raise SystemExit("error: pretrain.tools.bench needs CUDA GPUs")
    with cli_errors():
        cfg = load_config(args.config, args.overrides, schema=ModelConfig)
        pcfg = ParallelConfig(tensor_parallel=args.tp, sequence_parallel=args.sp, zero_stage=args.zero,
                              micro_batch_size=args.batch)
        layout = init_distributed(pcfg, cfg)
    model = build_stage(cfg, sequence_parallel=args.sp, use_cpu_initialization=False).cuda()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    engine = build_engine(model, opt, pcfg, layout, grad_clip=1.0, bf16=True)
    if args.compile:
        engine.compile()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=layout.device)
    torch.cuda.reset_peak_memory_stats()

    def step():
        out = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(out.loss)
        engine.step()
        return out

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        out = step()
    torch.cuda.synchronize()
    tok_s = args.batch * args.seq_len * args.steps / (time.perf_counter() - start)
    flops = training_flops(cfg, args.seq_len).training_per_token / args.tp
    if layout.rank == 0:
        if base is not None:
            print(f"# {describe(base)}", flush=True)
        row = {"config": cfg.name, "zero": args.zero, "tp": args.tp, "compile": args.compile,
               "micro_batch": args.batch, "gpus": layout.world, "tokens_per_s_per_gpu": round(tok_s / args.tp),
               "tflops_per_gpu": round(tok_s * flops / 1e12, 1),
               "mfu": round(tok_s * flops / (args.peak_tflops * 1e12), 3),
               "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
               "loss": round(out.lm_loss.item(), 3)}
        if base is not None:
            row["vs_baseline"] = ratio(tok_s / args.tp, base)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
