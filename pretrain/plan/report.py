"""The planner's output: a ranked table, the best layout's sbatch line, and the same as JSON."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from pretrain.plan.layouts import Cluster, Prediction

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9


@dataclass(frozen=True)
class Request:
    """What was asked, for the header and the sbatch line."""
    name: str                  # the run file or preset as given (a name of conf/ or a path)
    is_run: bool               # a run file of conf/run (else a model preset)
    model_name: str
    gpu: str
    global_batch: int
    seq_len: int
    precision: str
    rate_note: str             # where the compute rate came from


def _slurm_script(model_name: str) -> tuple[str, Optional[str]]:
    """(slurm/mor_<scale>.sh, its default MOR_RUN); the largest scale's script when there is none for this one."""
    scale = model_name.split("_")[0]
    script = ROOT / "slurm" / f"mor_{scale}.sh"
    if not script.is_file():
        script = ROOT / "slurm" / "mor_1b7.sh"
    default = None
    if script.is_file():
        found = re.search(r"^export MOR_RUN=\$\{MOR_RUN:-(\w+)\}$", script.read_text(), re.M)
        default = found.group(1) if found else None
    return script.relative_to(ROOT).as_posix(), default


def _same_run(given: str, default: Optional[str]) -> bool:
    from conf import run_file
    return default is not None and run_file(given).resolve() == run_file(default).resolve()


def sbatch_line(pred: Prediction, cluster: Cluster, request: Request) -> str:
    """The command that runs ``pred``'s layout with the scale's sbatch script."""
    script, default = _slurm_script(request.model_name)
    env = ""
    extra: list[str] = []
    if request.is_run and not _same_run(request.name, default):
        env = f"MOR_RUN={request.name} "
    elif not request.is_run:
        extra.append(f"model={request.name}")
    per_node = cluster.gpus_per_node
    return (f"{env}sbatch --nodes={cluster.nodes} --ntasks-per-node={per_node} --gpus-per-node={per_node} {script} "
            + " ".join(extra + pred.layout.overrides()))


def _row(i: int, p: Prediction, fits: bool) -> list[str]:
    lay, t = p.layout, p.time
    return [str(i), str(lay.tp), "yes" if lay.sp else "-", str(lay.pp), str(lay.dp), str(lay.zero),
            f"{lay.micro_batch}x{lay.micro_batches}", "yes" if lay.checkpointing else "-",
            _num(p.peak_memory / GB) + ("" if fits else " OOM"),
            _num(p.group_bytes("tp") / GB), _num(p.group_bytes("pp") / GB), _num(p.group_bytes("dp") / GB),
            f"{100 * t.bubble:.1f}", _num(t.compute), _num(t.tp + t.pp + t.dp), _num(t.total),
            f"{p.tokens_per_second / cluster_gpus(p):,.0f}"]


def _num(x: float) -> str:
    """Three significant digits, without an exponent down to 0.001, e.g. 46.7, 0.761, 19.9, 1.54e-05."""
    return "0" if x == 0 else f"{x:.3g}" if x >= 1e-3 else f"{x:.2e}"


def cluster_gpus(p: Prediction) -> int:
    return p.layout.gpus


HEADER = ["#", "TP", "SP", "PP", "DP", "ZeRO", "micro", "ckpt", "mem/GPU GB", "TP GB", "PP GB", "DP GB",
          "bubble %", "compute s", "comm s", "step s", "tok/s/GPU"]


def table(rows: Sequence[tuple[Prediction, bool]]) -> str:
    cells = [HEADER] + [_row(i + 1, p, fits) for i, (p, fits) in enumerate(rows)]
    widths = [max(len(r[c]) for r in cells) for c in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header(request: Request, cluster: Cluster, n_valid: int, n_fit: int) -> str:
    links = cluster.links
    return "\n".join([
        f"{request.name}: model {request.model_name}, global batch {request.global_batch} x {request.seq_len} "
        f"tokens, {request.precision}",
        f"cluster: {cluster.nodes} node(s) x {cluster.gpus_per_node} {request.gpu.upper()} "
        f"({cluster.memory / GB:.0f} GB each); compute {request.rate_note}",
        f"links (modelled): NVLink {links.intra_bw / GB:.0f} GB/s, InfiniBand {links.inter_bw / GB:.0f} GB/s per GPU; "
        f"latency {links.intra_alpha * 1e6:g} / {links.inter_alpha * 1e6:g} us",
        f"{n_valid} valid layouts, {n_fit} fit in memory. Per GPU and optimizer step, the busiest pipeline stage: "
        "memory peak, collective payload (GB), time (s)."])


def as_json(preds: Sequence[tuple[Prediction, bool]], cluster: Cluster, request: Request) -> dict:
    def one(p: Prediction, fits: bool) -> dict:
        return {"layout": asdict(p.layout), "fits": fits, "peak_memory_bytes": p.peak_memory,
                "memory_per_stage": [m.as_dict() for m in p.memory],
                "traffic_per_stage": [{f"{k}/{g}": v for (k, g), v in t.items()} for t in p.traffic],
                "time": asdict(p.time), "tokens_per_second": p.tokens_per_second,
                "overrides": p.layout.overrides(), "sbatch": sbatch_line(p, cluster, request)}
    return {"request": asdict(request),
            "cluster": {"gpus": cluster.gpus, "gpus_per_node": cluster.gpus_per_node, "memory_bytes": cluster.memory,
                        "flops_per_gpu": cluster.rate, "links": asdict(cluster.links)},
            "layouts": [one(p, f) for p, f in preds]}
