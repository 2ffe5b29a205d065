"""Decoding throughput and KV-cache bytes of model configs, measured in one process so the ratios are fair.

    python -m pretrain.serve.decode_bench tiny_vanilla tiny_mor_ec [--batch 8] [--prompt 64] [--new 128]
    python -m pretrain.serve.decode_bench 360m_vanilla 360m_mor_ec --device cuda --dtype bf16

Each config prefills ``--batch`` random prompts of ``--prompt`` tokens and decodes ``--new`` tokens per prompt
with the KV cache (model/inference: causal routing, recursion-wise caches, recursive KV sharing when the config
has it), after one untimed warm-up round. Prints prefill and decode tokens/s, the KV bytes the sequences hold at
the end (and as a fraction of caching every token at every layer), the mean recursion depth the tokens took,
and each config's decode speed relative to the first. Weights are random unless ``--checkpoint`` gives a run (or
checkpoint folder) per config: a random router's decisions are not a trained one's, so depths — and with them
speed and bytes — differ from a trained model's.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

    from model.inference import KVCache
    from model.mor import MoRModel

# torch and the model are imported in the functions that use them, so that --help answers at once
_DTYPES = ("fp32", "bf16")


def _torch_dtype(name: str) -> torch.dtype:
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _sync(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def _depth(model: MoRModel, cache: KVCache) -> float:
    """Mean recursion steps per token: the tokens in the first layer of each step's cache, over all tokens."""
    firsts = {}
    for op in cache.layer_ops:
        if op.step >= 0 and op.kv_from < 0 and op.step not in firsts:
            firsts[op.step] = cache.buffers[op.pos].count.sum()
    if model.cfg.sharing == "none" or len(firsts) < model.cfg.num_recursions:
        return float("nan")  # vanilla: no recursion; KV sharing: later steps keep no cache, so no count
    return float(sum(firsts.values()) / cache.lengths.sum())


def bench_one(model: MoRModel, *, batch: int, prompt: int, new: int, dtype: torch.dtype) -> dict:
    import torch

    from model.inference import KVCache, decode_step, prefill
    device = next(model.parameters()).device
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    result = {}
    with torch.no_grad():
        for timed in (False, True):  # a warm-up round first (allocator, kernels), then the measured one
            cache = KVCache(model.cfg, batch, prompt + new, dtype=dtype, device=device)
            live = torch.ones(batch, dtype=torch.bool, device=device)
            _sync(device)
            start = time.perf_counter()
            logits = prefill(model, cache, prompts.tolist())[:, -1]
            _sync(device)
            mid = time.perf_counter()
            for _ in range(new):
                logits = decode_step(model, cache, logits.argmax(dim=-1), live)
            _sync(device)
            end = time.perf_counter()
            if timed:
                used, full = int(cache.used_bytes().sum()), int(cache.full_bytes().sum())
                result = {"prefill_tok_s": batch * prompt / (mid - start), "decode_tok_s": batch * new / (end - mid),
                          "kv_bytes_per_seq": used / batch, "kv_frac": used / full,
                          "kv_allocated": cache.allocated_bytes(), "depth": _depth(model, cache)}
    return result


def _load(name: str, checkpoint: Optional[str], device: torch.device, dtype: torch.dtype) -> MoRModel:
    import torch

    from conf import load_config
    from model.config import ModelConfig
    from model.mor import MoRModel
    if checkpoint:
        from conf.errors import ConfigError
        from pretrain.checkpoint.verify import CheckpointError
        from pretrain.checkpoint.consolidate import load
        try:
            model = load(Path(checkpoint)).model
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    else:
        torch.manual_seed(0)
        model = MoRModel(load_config(name, [], schema=ModelConfig))
    return model.to(device=device, dtype=dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.serve.decode_bench", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("models", nargs="+", help="model presets (conf/model/NAME.yaml) or YAML paths; the first "
                                                  "is the baseline of the ratios (with --checkpoint: labels)")
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="a run or checkpoint folder per model, in order (weights, and the config they were "
                             "trained with, instead of the preset's random init)")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (default 64)")
    parser.add_argument("--new", type=int, default=128, help="tokens decoded per sequence (default 128)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    parser.add_argument("--dtype", default="fp32", choices=_DTYPES, help="weights and caches (default fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    for key in ("batch", "prompt", "new"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1")
    if args.checkpoint and len(args.checkpoint) != len(args.models):
        parser.error(f"--checkpoint given {len(args.checkpoint)} times for {len(args.models)} models")
    import torch

    import model as _model  # noqa: F401 - before megatron-core: model/__init__.py silences its optional-kernel notice
    from conf import cli_errors
    from pretrain.parallel.layout import init_single_process
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    init_single_process()
    device, dtype = torch.device(args.device), _torch_dtype(args.dtype)
    rows = []
    for i, name in enumerate(args.models):
        with cli_errors():
            model = _load(name, args.checkpoint[i] if args.checkpoint else None, device, dtype)
        if args.prompt + args.new > model.cfg.max_seq_len:
            parser.error(f"{name}: --prompt + --new = {args.prompt + args.new} passes max_seq_len "
                         f"{model.cfg.max_seq_len}")
        rows.append((name, bench_one(model, batch=args.batch, prompt=args.prompt, new=args.new, dtype=dtype)))
        del model
    base = rows[0][1]["decode_tok_s"]
    print(f"{args.device} {args.dtype}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens each")
    print(f"{'model':<28} {'prefill tok/s':>14} {'decode tok/s':>13} {'vs first':>9} {'KV MiB/seq':>11} "
          f"{'of full':>8} {'depth':>6}")
    for name, r in rows:
        depth = "-" if r["depth"] != r["depth"] else f"{r['depth']:.2f}"  # NaN: not counted
        print(f"{name:<28} {r['prefill_tok_s']:>14,.0f} {r['decode_tok_s']:>13,.0f} {r['decode_tok_s'] / base:>9.2f} "
              f"{r['kv_bytes_per_seq'] / 2**20:>11.3f} {r['kv_frac']:>8.3f} {depth:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
