"""Draw a run's curves from its metrics.jsonl: ``python -m pretrain.tools.plot RUN_DIR [--out FILE.png]``.

Top: training loss and, where evaluated, validation loss under training routing (top-k over the sequence,
``val_loss``) and under inference routing (each token decides alone, ``val_loss_causal``) against step. Below it:
each recursion step's kept fraction (expert-choice: its capacity; token-choice: the share of tokens still
running) and mean gate. Last, where the run evaluated downstream in the loop: the average of the tasks' primary
metrics (``downstream_avg``, bold) and each task's primary (``downstream_<task>``), with a dashed line at the
average's chance level when every task has a fixed number of choices (ARC mixes 3-, 4- and 5-choice questions and
LAMBADA has none, so with either there is no exact chance level and no line).
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


def figure(records: list[dict], title: str = ""):
    """The figure of load_records' records: loss; router statistics and downstream accuracy where logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if record_kind(r) == "train" and "loss" in r]
    val = [r for r in records if record_kind(r) == "val"]
    down = [r for r in records if record_kind(r) == "downstream"]
    router_keys = sorted({k for r in train for k in r if k.endswith(("kept_frac", "gate_mean"))})
    panels = 1 + bool(router_keys) + bool(down)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4 if panels == 1 else 3.5 * panels), squeeze=False)
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
    ax.legend()
    if router_keys:
        ax = axes[1][0]
        for k in router_keys:
            pts = [(r["step"], r[k]) for r in train if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if k.endswith("gate_mean") else "-", label=k)
        ax.set_xlabel("step")
        ax.set_ylabel("router")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    if down:
        ax = axes[-1][0]
        ax.plot([r["step"] for r in down], [r["downstream_avg"] for r in down], "o-", linewidth=2.5, color="black",
                label="average")
        for task in sorted({t for r in down for t in downstream_tasks(r)}):
            pts = [(r["step"], r[f"downstream_{task}"]) for r in down if task in downstream_tasks(r)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", linewidth=1, alpha=0.8, label=task)
        chance = chance_level(down)
        if chance is not None:
            ax.axhline(chance, linestyle="--", color="gray", label=f"average at chance ({chance:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (primary metric)")
        ax.set_title("downstream accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


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
