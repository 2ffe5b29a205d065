"""Draw a run's curves from its metrics.jsonl: ``python -m pretrain.tools.plot RUN_DIR [--out FILE.png]``.

Top: training loss and, where evaluated, validation loss under training routing (top-k over the sequence,
``val_loss``) and under inference routing (each token decides alone, ``val_loss_causal``) against step. Bottom:
each recursion step's kept fraction (expert-choice: its capacity; token-choice: the share of tokens still
running) and mean gate.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from conf import cli_errors
from conf.files import atomic_write_bytes
from pretrain.training.metrics import read_metrics


def load_records(path: Path) -> list[dict]:
    """The records of metrics.jsonl (a torn last line skipped), keeping the last one of each (step, kind) so a
    resumed run plots once."""
    seen: dict[tuple[int, str], dict] = {}
    for rec in read_metrics(path):
        kind = "val" if "val_loss" in rec else ("event" if "event" in rec else "train")
        seen[(rec.get("step", 0), kind)] = rec
    return [seen[k] for k in sorted(seen)]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = load_records(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r and "event" not in r]
    val = [r for r in records if "val_loss" in r]
    router_keys = sorted({k for r in train for k in r if k.endswith(("kept_frac", "gate_mean"))})
    fig, axes = plt.subplots(2 if router_keys else 1, 1, figsize=(8, 7 if router_keys else 4), squeeze=False)
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
    ax.set_title(run_dir.name)
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
    fig.tight_layout()
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
