"""Draw a run's curves from its metrics.jsonl: ``python -m pretrain.tools.plot RUN_DIR [--out FILE.png]``.

Top: training loss and, where evaluated, validation loss under training routing (top-k over the sequence,
``val_loss``) and under inference routing (each token decides alone, ``val_loss_causal``) against step.

Middle, where validation logged it (routed models): per recursion step r, one colour each, the sampling accuracy
(``val_r{r}_sampling_acc``: how often the causal rule agrees with top-k on the step's candidates; solid) and the
causal kept fraction (``val_r{r}_causal_kept``: the share of all tokens that run step r when each decides alone;
dashed). The training records' kept fraction is not drawn: under expert-choice it is the capacity, flat by
construction.

Then, for a data mixture (``data.sources``): per source, its own validation loss (``val_loss/<source>``, solid,
training routing) and, on the right axis, its share of all tokens trained so far (``tokens/<source>`` over
``tokens``, dashed): what the model learns where, and the mix as trained, phases included.

Last, where the run evaluated downstream in the loop: each task's primary metric (``downstream_<task>``, its own
colour and marker) over the average (``downstream_avg``, wide and grey), a dotted line at each chance level of the
tasks with a fixed number of choices (HellaSwag and MMLU 1/4, PIQA and WinoGrande 1/2; ARC mixes 3- to 5-choice
questions and LAMBADA has no choices, so they have none), and a dashed line at the average's chance level when every
task plotted has one.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from conf import cli_errors
from conf.files import atomic_write_bytes
from pretrain.training.metrics import read_metrics

# A random guess's expected accuracy, for tasks whose every question has the same number of choices.
CHANCE = {"hellaswag": 1 / 4, "piqa": 1 / 2, "winogrande": 1 / 2, "mmlu": 1 / 4}


def record_kind(rec: dict) -> str:
    if "val_loss" in rec:
        return "val"
    if "downstream_avg" in rec:
        return "downstream"
    return "event" if "event" in rec else "train"


def load_records(path: Path) -> list[dict]:
    """The records of metrics.jsonl (a torn last line skipped), keeping the last one of each (step, kind) so a
    resumed run plots once."""
    seen: dict[tuple[int, str], dict] = {}
    for rec in read_metrics(path):
        seen[(rec.get("step", 0), record_kind(rec))] = rec
    return [seen[k] for k in sorted(seen)]


def downstream_tasks(rec: dict) -> list[str]:
    """The tasks of a downstream record: each ``downstream_<task>`` that comes with its ``downstream_<task>_acc``."""
    return sorted(k[len("downstream_"):] for k in rec if k.startswith("downstream_") and f"{k}_acc" in rec)


def chance_level(down: list[dict]) -> float | None:
    """The chance level of ``downstream_avg``: the mean of its tasks' chance levels, when all records average the
    same tasks and each of those has one; None otherwise."""
    task_sets = {tuple(downstream_tasks(r)) for r in down}
    if len(task_sets) != 1 or not all(t in CHANCE for t in next(iter(task_sets))):
        return None
    tasks = next(iter(task_sets))
    return sum(CHANCE[t] for t in tasks) / len(tasks) if tasks else None


MARKERS = "osD^vP*Xh<>"


def _routing_series(val: list[dict]) -> list[tuple[int, str, str, list[tuple[int, float]]]]:
    """(step r, metric, label, points) for each per-step statistic validation logged, r ascending."""
    out = []
    steps = sorted({int(k[len("val_r"):].split("_")[0]) for r in val for k in r
                    if k.startswith("val_r") and k.endswith(("_sampling_acc", "_causal_kept"))})
    for step in steps:
        for metric, label in (("sampling_acc", "sampling accuracy"), ("causal_kept", "causal kept fraction")):
            key = f"val_r{step}_{metric}"
            pts = [(r["step"], r[key]) for r in val if key in r]
            if pts:
                out.append((step, metric, f"r{step} {label}", pts))
    return out


def _legend(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def figure(records: list[dict], title: str = ""):
    """The figure of load_records' records: loss; routing per recursion step and downstream accuracy where
    logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if record_kind(r) == "train" and "loss" in r]
    val = [r for r in records if record_kind(r) == "val"]
    down = [r for r in records if record_kind(r) == "downstream"]
    routing = _routing_series(val)
    sources = sorted({k.split("/", 1)[1] for r in train for k in r if k.startswith("tokens/")})
    panels = 1 + bool(routing) + bool(sources) + bool(down)
    fig, axes = plt.subplots(panels, 1, figsize=(10, 4 if panels == 1 else 3.6 * panels), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-",
                label="validation loss (training routing)")
        causal = [r for r in val if "val_loss_causal" in r]   # runs from before it was logged have none
        if causal:
            ax.plot([r["step"] for r in causal], [r["val_loss_causal"] for r in causal], "s--",
                    label="validation loss (causal routing)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax)
    if routing:
        ax = axes[1][0]
        for step, metric, label, pts in routing:
            acc = metric == "sampling_acc"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if acc else "s--", color=colours[(step - 1) % 10],
                    label=label)
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction")
        ax.set_title("routing per recursion step (validation)")
        ax.grid(alpha=0.3)
        _legend(ax)
    if sources:
        _sources_panel(axes[1 + bool(routing)][0], train, val, sources, colours)
    if down:
        ax = axes[-1][0]
        # the average underneath, wide and pale, so that a task on the same values stays visible on top of it
        ax.plot([r["step"] for r in down], [r["downstream_avg"] for r in down], "-", linewidth=6, color="0.75",
                zorder=1, label="average")
        tasks = sorted({t for r in down for t in downstream_tasks(r)})
        for i, task in enumerate(tasks):
            pts = [(r["step"], r[f"downstream_{task}"]) for r in down if task in downstream_tasks(r)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", marker=MARKERS[i % len(MARKERS)],
                    color=colours[i % 10], linewidth=1.2, markersize=6, zorder=3, label=task)
        levels: dict[float, list[str]] = {}
        for task in tasks:
            if task in CHANCE:
                levels.setdefault(CHANCE[task], []).append(task)
        for level, names in sorted(levels.items()):
            ax.axhline(level, linestyle=":", color="0.4", linewidth=1, zorder=2,
                       label=f"chance: {', '.join(names)} ({level:.2f})")
        chance = chance_level(down)
        if chance is not None:
            ax.axhline(chance, linestyle="--", color="gray", zorder=2, label=f"average at chance ({chance:.3f})")
        ax.set_ylim(bottom=-0.03)   # a task at 0 (LAMBADA early on) stays above the axis
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (primary metric)")
        ax.set_title("downstream accuracy")
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.tight_layout()
    return fig


def _sources_panel(ax, train: list[dict], val: list[dict], sources: list[str], colours) -> None:
    share_ax = ax.twinx()
    for i, name in enumerate(sources):
        colour = colours[i % 10]
        pts = [(r["step"], r[f"val_loss/{name}"]) for r in val if f"val_loss/{name}" in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colour, label=f"{name}: validation loss")
        share = [(r["step"], r[f"tokens/{name}"] / r["tokens"]) for r in train
                 if f"tokens/{name}" in r and r.get("tokens")]
        share_ax.plot([p[0] for p in share], [p[1] for p in share], "--", color=colour, alpha=0.8,
                      label=f"{name}: share of tokens so far")
    share_ax.set_ylim(0, 1)
    share_ax.set_ylabel("share of tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("data mixture: per source")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = share_ax.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.08, 1.0),
              borderaxespad=0.0)


def plot(run_dir: Path, out: Path) -> Path:
    fig = figure(load_records(run_dir / "metrics.jsonl"), run_dir.name)
    import matplotlib.pyplot as plt  # after figure() chose the Agg backend
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, png.getvalue())  # a viewer open on curves.png never reads half a picture
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.tools.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder holding metrics.jsonl (runs/NAME)")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").exists():
        print(f"error: {args.run_dir / 'metrics.jsonl'}: not found; give a run folder (runs/NAME)", file=sys.stderr)
        return 2
    with cli_errors():  # a damaged metrics.jsonl is one line naming the file and line
        print(plot(args.run_dir, args.out or args.run_dir / "curves.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
