"""A study's results (for pretrain/study/cli.py), rebuilt from each model's metrics.jsonl: curves against training
FLOPs, the plot (study.png) and the table (study.md, study.json), each written atomically (conf/files.py).

Two FLOPs counts per model, both from model/flops.py. *Planned*: steps × FLOPs per step at the plan's depth
loads (spec.ModelPlan.plan_basis; for token-choice, uniform loads — an assumption). *Measured*: the same counter at
the depth loads each run logged — every logged training step's r{i}/kept_frac (rank 0's last micro-batch of that
step) counts for the steps since the previous logged one; a run's steps past its last log keep that log's loads.
Where the loads cannot change the FLOPs (no router; expert-choice, whose top-k keeps exactly the capacities) the
two are the same number. A token-choice run that logged no router statistics (a pipeline-parallel run logs none)
has no measured count; its curves fall back to the planned one and say so. The curves' x axis is the measured
count where there is one.
"""
from __future__ import annotations

import bisect
import io
import json
from pathlib import Path
from typing import Any, Optional

from conf.files import atomic_write_bytes, atomic_write_text
from model.config import ROUTINGS
from model.sharing import build_plan
from pretrain.study.spec import ModelPlan, StudyConfig
from pretrain.training.metrics import read_metrics

SKIP = ("downstream_avg", "downstream_items")   # downstream_<task> keys that are no task


def _kept(rec: dict, n: int) -> Optional[list[float]]:
    """The fraction of tokens that ran each of the ``n`` recursion steps, as a training record logged them."""
    keys = [f"r{i}/kept_frac" for i in range(1, n + 1)]
    return [float(rec[k]) for k in keys] if n and all(k in rec for k in keys) else None


def curves(run_dir: Path, n_steps: int = 0) -> dict[str, Any]:
    """Last training step, validation and downstream records by step, and the logged recursion-step kept fractions
    of the training records by step (``n_steps`` recursion steps; a resumed run's repeats: the last one)."""
    path = run_dir / "metrics.jsonl"
    val: dict[int, dict] = {}
    down: dict[int, dict] = {}
    kept: dict[int, list[float]] = {}
    last = 0
    for rec in read_metrics(path) if path.exists() else []:
        if "event" in rec or "step" not in rec:
            continue
        if "val_loss" in rec:
            val[rec["step"]] = rec
        elif "downstream_avg" in rec:
            down[rec["step"]] = rec
        elif "loss" in rec:
            last = max(last, rec["step"])
            k = _kept(rec, n_steps)
            if k is not None:
                kept[rec["step"]] = k
    return {"step": last, "val": [val[s] for s in sorted(val)], "down": [down[s] for s in sorted(down)],
            "kept": dict(sorted(kept.items()))}


class MeasuredFlops:
    """Cumulative training FLOPs of a run at its logged depth loads (module docstring)."""

    def __init__(self, plan: ModelPlan, kept: dict[int, list[float]]):
        self.steps: list[int] = []
        self.totals: list[float] = []          # FLOPs through each logged step
        self.per_step: list[float] = []        # FLOPs of one step at that log's loads
        total, prev = 0.0, 0
        for step, fractions in kept.items():
            per = plan.step_flops(fractions)
            total += (step - prev) * per
            self.steps.append(step)
            self.totals.append(total)
            self.per_step.append(per)
            prev = step

    def __bool__(self) -> bool:
        return bool(self.steps)

    def at(self, step: int) -> float:
        """FLOPs through ``step``: the logs up to it, then the next log's loads (the last log's, past the end)."""
        i = min(bisect.bisect_left(self.steps, step), len(self.steps) - 1)
        before, total = (self.steps[i - 1], self.totals[i - 1]) if i > 0 else (0, 0.0)
        if step > self.steps[i]:
            before, total = self.steps[i], self.totals[i]
        return total + (step - before) * self.per_step[i]


def measured_flops(p: ModelPlan, kept: dict[int, list[float]]) -> Optional[MeasuredFlops | float]:
    """The run's measured count: the plan's per-step FLOPs (a float) where the loads cannot change them (no
    router, or expert-choice's capacities, which its logs repeat exactly); else a MeasuredFlops from the logged
    loads, None where the run logged none."""
    if not p.loads_decide_flops:
        return p.flops_per_step
    m = MeasuredFlops(p, kept)
    return m if m else None


def _at(m: Optional[MeasuredFlops | float], step: int) -> Optional[float]:
    if m is None:
        return None
    return step * m if isinstance(m, float) else m.at(step)


def tasks_of(rec: dict) -> dict[str, float]:
    """Each task's primary metric in a downstream record (``downstream_<task>``)."""
    return {k.removeprefix("downstream_"): v for k, v in rec.items()
            if k.startswith("downstream_") and k not in SKIP and not k.endswith("_acc")}


def summary(plans: list[ModelPlan]) -> list[dict[str, Any]]:
    """One row per model: its plan, how far it trained, its planned and measured training FLOPs, the final
    validation losses and last downstream record."""
    rows = []
    for p in plans:
        c = curves(p.point.run_dir, len(build_plan(p.cfg.model).steps))
        m = measured_flops(p, c["kept"])
        val, down = (c["val"][-1] if c["val"] else {}), (c["down"][-1] if c["down"] else {})

        def point(r: dict, **values) -> dict:
            return {"step": r["step"], "planned_flops": r["step"] * p.flops_per_step,
                    "measured_flops": _at(m, r["step"]), **values}
        rows.append({
            "model": p.name, "overrides": p.own, "routing": p.routing, "params_unique": p.params,
            "flops_per_token": p.flops_per_token, "tokens_per_step": p.tokens_per_step, "steps": p.steps,
            "tokens": p.steps * p.tokens_per_step, "plan_basis": p.plan_basis,
            "planned_train_flops": p.steps * p.flops_per_step,
            # through the step the run reached (the whole plan once it is done)
            "measured_train_flops": _at(m, c["step"]), "measured_logs": len(c["kept"]),
            "eval_every": p.eval_every, "step": c["step"], "done": c["step"] >= p.steps,
            "val_step": val.get("step"), "val_loss": val.get("val_loss"), "val_loss_causal": val.get("val_loss_causal"),
            "downstream_step": down.get("step"), "downstream_avg": down.get("downstream_avg"),
            "downstream_items": down.get("downstream_items"), "downstream": tasks_of(down),
            "run_dir": str(p.point.run_dir),
            "curve": [point(r, val_loss=r.get("val_loss"), val_loss_causal=r.get("val_loss_causal"))
                      for r in c["val"]],
            "downstream_curve": [point(r, downstream_avg=r["downstream_avg"]) for r in c["down"]]})
    return rows


def _x(pt: dict) -> float:
    """A curve point's x: measured FLOPs where the run has them, else the planned ones."""
    return pt["planned_flops"] if pt["measured_flops"] is None else pt["measured_flops"]


def plot(cfg: StudyConfig, rows: list[dict], path: Path) -> Path:
    """Left: validation loss against measured training FLOPs (planned, and labelled so, for a run without logged
    loads), one colour per model, expert-choice's causal-routing loss dashed in its colour; right: the downstream
    average. A dotted line marks the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        colour = colours[i % len(colours)]
        name = r["model"] + (" (planned FLOPs)" if r["measured_train_flops"] is None else "")
        xs = [_x(pt) for pt in r["curve"]]
        left.plot(xs, [pt["val_loss"] for pt in r["curve"]], "o-", color=colour, label=name)
        if not ROUTINGS[r["routing"]].causal_already:   # a causal-routing curve of its own
            left.plot(xs, [pt["val_loss_causal"] for pt in r["curve"]], "o--", color=colour, mfc="none",
                      label=f"{name} (causal routing)")
        down = r["downstream_curve"]
        right.plot([_x(pt) for pt in down], [pt["downstream_avg"] for pt in down], "o-", color=colour,
                   label=name)
    for ax, title, ylabel in ((left, "validation loss", "loss (nats/token)"),
                              (right, "downstream accuracy (average of the tasks' primary metrics)", "accuracy")):
        ax.axvline(cfg.flops, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training FLOPs, measured (at each run's logged depth loads)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not any(r["downstream_curve"] for r in rows):
        right.text(0.5, 0.5, "no downstream evaluations", ha="center", va="center", transform=right.transAxes)
    fig.suptitle(f"{cfg.name}: planned training-FLOPs budget {cfg.flops:.3g} (dotted; dashed: causal routing)",
                 fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _f(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(cfg: StudyConfig, rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(t for r in rows for t in r["downstream"]))
    cols = ["model", "unique params", "planned FLOPs/token", "steps", "tokens", "planned training FLOPs",
            "measured training FLOPs", "measured / planned", "evaluated at step", "val_loss", "val_loss_causal",
            "downstream_avg", *tasks]
    bases: dict[str, list[str]] = {}
    for r in rows:
        bases.setdefault(r["plan_basis"], []).append(r["model"])
    basis_text = "; ".join(f"{', '.join(names)}: {basis}" for basis, names in bases.items())
    lines = [f"# Equal-FLOPs study `{cfg.name}`", "",
             f"Base run `{cfg.run}`, planned training-FLOPs budget {cfg.flops:.3g} per model, {cfg.evals} "
             "evaluation(s) per run. Planned FLOPs: model/flops.py's count at the plan's depth loads, which set the "
             f"steps ({basis_text}). Measured FLOPs: the same count at the depth loads each run logged "
             "(r{i}/kept_frac of every logged training step, rank 0's last micro-batch, held over the steps "
             "since the previous log), through the step it reached; blank where a token-choice run logged no router "
             "statistics. val_loss: training routing; val_loss_causal: causal routing (the same number where "
             "training routing is causal already); both at the last validation, which falls at the last multiple of "
             "the evaluation interval (steps // evals). downstream: the last in-loop downstream evaluation (each "
             "task's primary metric and their average).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        steps = str(r["steps"]) if r["done"] else f"{r['step']} of {r['steps']}"
        measured = r["measured_train_flops"]
        # against the plan for the same steps, so that an unfinished run compares like with like
        ratio = None if not measured else measured / (r["step"] * r["planned_train_flops"] / r["steps"])
        cells = [r["model"], f"{r['params_unique'] / 1e6:.2f}M", f"{r['flops_per_token'] / 1e6:.2f}M", steps,
                 f"{r['tokens']:,}", f"{r['planned_train_flops']:.3g}", _f(measured, ".3g"), _f(ratio, ".3f"),
                 _f(r["val_step"], "d"), _f(r["val_loss"], ".4f"), _f(r["val_loss_causal"], ".4f"),
                 _f(r["downstream_avg"], ".3f"), *(_f(r["downstream"].get(t), ".3f") for t in tasks)]
        lines.append("| " + " | ".join(cells) + " |")
    items = {r["downstream_items"] for r in rows if r["downstream_items"] is not None}
    if items:
        lines += ["", f"Downstream items per evaluation: {', '.join(map(str, sorted(items)))}."]
    return "\n".join(lines) + "\n"


def write(cfg: StudyConfig, plans: list[ModelPlan]) -> tuple[list[dict], list[Path]]:
    """study.png, study.md and study.json in out_dir, from the runs as they are now."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary(plans)
    png = plot(cfg, rows, out / "study.png")
    md = out / "study.md"
    atomic_write_text(md, markdown(cfg, rows))
    js = out / "study.json"
    atomic_write_text(js, json.dumps({"name": cfg.name, "run": cfg.run, "flops": cfg.flops, "evals": cfg.evals,
                                      "models": rows}, indent=1) + "\n")
    return rows, [png, md, js]
