"""A study's results (for pretrain/study/cli.py), rebuilt from each model's metrics.jsonl: curves against training
FLOPs (x = step × training FLOPs per optimizer step of that model), the plot (study.png) and the table (study.md,
study.json), each written atomically (conf/files.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from conf.files import atomic_write_bytes, atomic_write_text
from pretrain.study.spec import ModelPlan, StudyConfig
from pretrain.training.metrics import read_metrics

SKIP = ("downstream_avg", "downstream_items")   # downstream_<task> keys that are no task


def curves(run_dir: Path) -> dict[str, Any]:
    """Last training step, validation and downstream records by step (a resumed run's repeats: the last one)."""
    path = run_dir / "metrics.jsonl"
    val: dict[int, dict] = {}
    down: dict[int, dict] = {}
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
    return {"step": last, "val": [val[s] for s in sorted(val)], "down": [down[s] for s in sorted(down)]}


def tasks_of(rec: dict) -> dict[str, float]:
    """Each task's primary metric in a downstream record (``downstream_<task>``)."""
    return {k.removeprefix("downstream_"): v for k, v in rec.items()
            if k.startswith("downstream_") and k not in SKIP and not k.endswith("_acc")}


def summary(plans: list[ModelPlan]) -> list[dict[str, Any]]:
    """One row per model: its plan, how far it trained, the final validation losses and last downstream record."""
    rows = []
    for p in plans:
        c = curves(p.point.run_dir)
        val, down = (c["val"][-1] if c["val"] else {}), (c["down"][-1] if c["down"] else {})
        rows.append({
            "model": p.name, "overrides": p.own, "routing": p.routing, "params_unique": p.params,
            "flops_per_token": p.flops_per_token, "tokens_per_step": p.tokens_per_step, "steps": p.steps,
            "tokens": p.steps * p.tokens_per_step, "train_flops": p.steps * p.flops_per_step,
            "eval_every": p.eval_every, "step": c["step"], "done": c["step"] >= p.steps,
            "val_step": val.get("step"), "val_loss": val.get("val_loss"), "val_loss_causal": val.get("val_loss_causal"),
            "downstream_step": down.get("step"), "downstream_avg": down.get("downstream_avg"),
            "downstream_items": down.get("downstream_items"), "downstream": tasks_of(down),
            "run_dir": str(p.point.run_dir),
            "curve": [{"step": r["step"], "flops": r["step"] * p.flops_per_step, "val_loss": r.get("val_loss"),
                       "val_loss_causal": r.get("val_loss_causal")} for r in c["val"]],
            "downstream_curve": [{"step": r["step"], "flops": r["step"] * p.flops_per_step,
                                  "downstream_avg": r["downstream_avg"]} for r in c["down"]]})
    return rows


def plot(cfg: StudyConfig, rows: list[dict], path: Path) -> Path:
    """Left: validation loss against training FLOPs, one colour per model, expert-choice's causal-routing loss
    dashed in its colour; right: the downstream average. A dotted line marks the budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        colour = colours[i % len(colours)]
        xs = [pt["flops"] for pt in r["curve"]]
        left.plot(xs, [pt["val_loss"] for pt in r["curve"]], "o-", color=colour, label=r["model"])
        if r["routing"] == "expert_choice":
            left.plot(xs, [pt["val_loss_causal"] for pt in r["curve"]], "o--", color=colour, mfc="none",
                      label=f"{r['model']} (causal routing)")
        down = r["downstream_curve"]
        right.plot([pt["flops"] for pt in down], [pt["downstream_avg"] for pt in down], "o-", color=colour,
                   label=r["model"])
    for ax, title, ylabel in ((left, "validation loss", "loss (nats/token)"),
                              (right, "downstream accuracy (average of the tasks' primary metrics)", "accuracy")):
        ax.axvline(cfg.flops, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not any(r["downstream_curve"] for r in rows):
        right.text(0.5, 0.5, "no downstream evaluations", ha="center", va="center", transform=right.transAxes)
    fig.suptitle(f"{cfg.name}: equal training-FLOPs budget {cfg.flops:.3g} (dashed: causal routing)", fontsize=11)
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
    cols = ["model", "unique params", "FLOPs/token", "steps", "tokens", "training FLOPs", "evaluated at step",
            "val_loss", "val_loss_causal", "downstream_avg", *tasks]
    lines = [f"# Equal-FLOPs study `{cfg.name}`", "",
             f"Base run `{cfg.run}`, training-FLOPs budget {cfg.flops:.3g} per model, {cfg.evals} evaluation(s) per "
             "run. val_loss: training routing; val_loss_causal: causal routing (the same number where training "
             "routing is causal already); both at the last validation, which falls at the last multiple of the "
             "evaluation interval (steps // evals). downstream: the last in-loop downstream evaluation (each task's "
             "primary metric and their average).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        steps = str(r["steps"]) if r["done"] else f"{r['step']} of {r['steps']}"
        cells = [r["model"], f"{r['params_unique'] / 1e6:.2f}M", f"{r['flops_per_token'] / 1e6:.2f}M", steps,
                 f"{r['tokens']:,}", f"{r['train_flops']:.3g}", _f(r["val_step"], "d"), _f(r["val_loss"], ".4f"),
                 _f(r["val_loss_causal"], ".4f"), _f(r["downstream_avg"], ".3f"),
                 *(_f(r["downstream"].get(t), ".3f") for t in tasks)]
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
