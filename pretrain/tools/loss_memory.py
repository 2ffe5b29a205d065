"""Peak memory of one training step with the output head's loss chunked (``model.loss_chunk``) or not.

    python -m pretrain.tools.loss_memory tiny_vanilla vocab_size=49152 --batch 4 --seq-len 1024 --chunks 0,2048

Each setting runs in a fresh child process: build the model, run one forward + backward on random tokens, and
report the memory the step added at its peak — on a GPU ``torch.cuda.max_memory_allocated`` over what the model
and its inputs held before the step, on the CPU the peak resident set size (``ru_maxrss``) over the resident
size before the step. Prints one JSON line per setting and each one's peak relative to the first; the fp32
logits of the whole micro-batch (B × T × V × 4 bytes) are printed beside them for scale.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.config import ModelConfig

# torch and the model are imported where they are used, so that --help answers at once


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(cfg: ModelConfig, *, batch: int, seq_len: int, device: str) -> dict:
    """One step of forward + backward; the bytes it added at its peak."""
    import torch

    from model.layers import make_parallel_config
    from model.mor import MoRModel
    from pretrain.parallel.layout import init_single_process
    init_single_process()
    cuda = device == "cuda"
    model = MoRModel(cfg, make_parallel_config(cfg, use_cpu_initialization=not cuda)).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"loss_chunk": cfg.loss_chunk, "device": device, "step_peak_mb": round(peak / 2**20, 1),
            "loss": round(float(out.lm_loss), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.tools.loss_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML file or preset from conf/model")
    parser.add_argument("overrides", nargs="*", help="dotted key=value model overrides")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch size")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--chunks", default="0,2048",
                        help="comma-separated loss_chunk values; 0 = the whole micro-batch's logits at once")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    from conf import cli_errors, load_config
    from model.config import ModelConfig
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with cli_errors():
        chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else []
        cfgs = [load_config(args.config, [*args.overrides, f"loss_chunk={c}"], schema=ModelConfig) for c in chunks]
    if args.child:   # one setting, in a process of its own
        print(json.dumps(measure(cfgs[0], batch=args.batch, seq_len=args.seq_len, device=args.device)))
        return
    cfg = cfgs[0]
    logits_mb = args.batch * args.seq_len * cfg.vocab_size * 4 / 2**20
    print(f"# {cfg.name}  vocab {cfg.vocab_size}  d_model {cfg.d_model}  batch {args.batch} x seq {args.seq_len}  "
          f"device {args.device}  fp32 logits of the micro-batch: {logits_mb:.1f} MB", flush=True)
    first = None
    for chunk in chunks:
        cmd = [sys.executable, "-m", "pretrain.tools.loss_memory", args.config, *args.overrides, "--child",
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--chunks", str(chunk),
               "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: loss_chunk={chunk} failed: {done.stderr.strip().splitlines()[-1:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        first = first or row["step_peak_mb"]
        row["vs_first"] = round(row["step_peak_mb"] / first, 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
