"""Driving the real entry point in-process for fault tests: arguments of a tiny run, its exit code and output,
and the losses it logged."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

RUN = "conf/run/tiny_cpu.yaml"
STEPS = 8


def args(data: Path, out_dir: Path, name: str, *extra: str) -> list[str]:
    return [f"data.path={data}", f"out_dir={out_dir}", f"name={name}", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=3", "logging.wandb=disabled",
            "model.max_seq_len=64", "data.num_workers=0", "parallel.micro_batch_size=4", *extra]


def run_main(argv: list[str], config: str = RUN) -> tuple[int, str, str]:
    """``python -m pretrain.train CONFIG ARGV`` in this process: (exit code, stdout, stderr)."""
    from pretrain.train import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([config, *argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl; each step must appear exactly once."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "event" not in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice in {run_dir}"
            out[rec["step"]] = rec["loss"]
    return out
