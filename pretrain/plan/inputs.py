"""The planner's inputs from its command line: the model (a run file or a preset, through conf's loaders), the
cluster, the compute rate, and one-line errors for requests that cannot be planned."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from conf import load_config, run_file
from conf.errors import ConfigError, one_line
from model.config import ModelConfig
from pretrain.plan.layouts import Cluster, divisors
from pretrain.plan.report import Request
from pretrain.plan.timing import GPUS, Links
from pretrain.plan.traffic import Precision

DEFAULT_GLOBAL_BATCH = 1024     # the reference recipe: 1024 sequences of 2048 tokens
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class Options:
    precision: Precision
    checkpointing: tuple[bool, ...]
    cfg: ModelConfig
    cluster: Cluster
    global_batch: int

    def why_none(self) -> str:
        """Why no layout of the cluster runs the model, in one line."""
        from pretrain.plan.layouts import _valid
        from pretrain.plan.shapes import Layout
        reasons: list[str] = []
        batch: list[int] = []          # data-parallel sizes that the global batch does not divide
        gpus, gbs = self.cluster.gpus, self.global_batch
        for tp in divisors(gpus):
            for pp in divisors(gpus // tp):
                dp = gpus // (tp * pp)
                if gbs % dp:
                    batch.append(dp)
                    continue
                why = _valid(self.cfg, Layout(tp, pp, dp, 0, False, 1, gbs // dp), self.cluster)
                if why and why.split(":")[0] not in [r.split(":")[0] for r in reasons]:
                    reasons.append(why)    # one of each kind: the first PP that is too deep, ...
        if batch:
            sizes = sorted(set(batch))
            reasons.insert(0, f"global batch {gbs} is not a multiple of DP={', '.join(map(str, sizes[:4]))}"
                           + (", ..." if len(sizes) > 4 else ""))
        return (f"no layout of {gpus} GPUs can run {self.cfg.name} with global batch {gbs}: "
                + "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else ""))


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}: must be > 0, got {value}")


def _load_model(name: str):
    """(model config, run config or None, whether it was a run file): a run file of conf/run (or a path to one),
    else a model preset of conf/model (or a path to one)."""
    from pretrain.config import RunConfig
    try:
        return None, load_config(run_file(name), schema=RunConfig), True
    except ConfigError as run_error:
        try:
            return load_config(name, schema=ModelConfig), None, False
        except ConfigError as preset_error:
            if "unknown preset" in str(preset_error) and "unknown run" in str(run_error):
                raise ConfigError(f"{name!r} is neither a run file of conf/run nor a model preset of conf/model; "
                                  f"{one_line(preset_error, None, name=False).partition('; ')[2]}") from None
            if "unknown preset" in str(preset_error):
                raise run_error from None
            if "unknown run" in str(run_error):
                raise preset_error from None
            raise ConfigError(f"{name}: neither a run file ({one_line(run_error, 100, name=False)}) nor a model "
                              f"config ({one_line(preset_error, 100, name=False)})") from None


def _rate(args: argparse.Namespace, cfg: ModelConfig, seq_len: int, peak: float) -> tuple[float, str]:
    """FLOP/s per GPU and where it came from."""
    if args.tokens_per_s_json is None:
        mfu = DEFAULT_MFU if args.mfu is None else args.mfu
        if not 0 < mfu <= 1:
            raise ConfigError(f"--mfu: must be in (0, 1], got {mfu}")
        return mfu * peak, f"modelled at MFU {mfu:g} of {peak / 1e12:.0f} TFLOP/s"
    path = Path(args.tokens_per_s_json)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--tokens-per-s-json: cannot read {path}: {e.strerror or e}") from None
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"--tokens-per-s-json: {path}: not JSON lines ({one_line(e, name=False)})") from None
    rows = [r for r in rows if any(k in r for k in ("tflops_per_gpu", "tflops", "tokens_per_s_per_gpu",
                                                     "tokens_per_s"))]
    if not rows:
        raise ConfigError(f"--tokens-per-s-json: {path} has no line with tflops or tokens_per_s "
                          "(python -m pretrain.tools.bench or model_bench writes them)")
    row = next((r for r in rows if r.get("config") == cfg.name), rows[0])
    for key in ("tflops_per_gpu", "tflops"):
        if row.get(key):
            return float(row[key]) * 1e12, f"measured: {row[key]} TFLOP/s per GPU ({path.name}, {row.get('config')})"
    from model.flops import training_flops
    tok = float(row.get("tokens_per_s_per_gpu") or row.get("tokens_per_s") or 0)
    if tok <= 0:
        raise ConfigError(f"--tokens-per-s-json: {path}: the {row.get('config')} line has no positive tokens/s")
    rate = tok * training_flops(cfg, seq_len).training_per_token
    return rate, f"measured: {tok:,.0f} tokens/s per GPU = {rate / 1e12:.0f} TFLOP/s ({path.name})"


def load_request(args: argparse.Namespace) -> tuple[ModelConfig, Cluster, Request, Options]:
    for name in ("gpus", "gpus_per_node", "gpu_memory_gb", "global_batch", "seq_len", "intra_bw", "inter_bw",
                 "max_micro_batch", "top"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.gpus % args.gpus_per_node:
        raise ConfigError(f"--gpus {args.gpus} is not a multiple of --gpus-per-node {args.gpus_per_node} "
                          "(whole nodes only; for one partial node give --gpus-per-node as many)")
    try:
        alphas = [float(a) for a in str(args.alpha_us).split(",")]
    except ValueError:
        raise ConfigError(f"--alpha-us: {args.alpha_us!r} is not one or two numbers (microseconds), e.g. 3,10") \
            from None
    if len(alphas) not in (1, 2) or min(alphas) < 0:
        raise ConfigError(f"--alpha-us: {args.alpha_us!r} is not one or two numbers >= 0, e.g. 3,10")
    cfg, run, is_run = _load_model(args.config)
    cfg = run.model if run is not None else cfg
    gpu = GPUS[args.gpu]
    seq_len = args.seq_len or cfg.max_seq_len
    global_batch = args.global_batch or (run.parallel.global_batch_size if run else None) or DEFAULT_GLOBAL_BATCH
    precision = args.precision or ("fp32" if run is not None and run.train.precision == "fp32" else "bf16")
    ckpt = args.activation_checkpointing or ("on" if run is not None and run.train.activation_checkpointing
                                             else "off")
    rate, note = _rate(args, cfg, seq_len, gpu.peak_flops)
    links = Links(args.intra_bw * 1e9, args.inter_bw * 1e9, alphas[0] * 1e-6, alphas[-1] * 1e-6)
    memory = args.gpu_memory_gb * 1e9 if args.gpu_memory_gb else gpu.memory
    cluster = Cluster(args.gpus, args.gpus_per_node, memory, rate, links)
    request = Request(args.config, is_run, cfg.name, args.gpu, global_batch, seq_len,
                      precision, note)
    checkpointing = {"off": (False,), "on": (True,), "both": (False, True)}[ckpt]
    return cfg, cluster, request, Options(Precision.of(precision), checkpointing, cfg, cluster, global_batch)
