"""A sweep's jobs and results (for pretrain/sweep/plan.py): the submitit executor, waiting with a progress line, job
outcomes, and the results table.

The table is rebuilt from each point's metrics.jsonl (so ``--collect`` works long after the jobs). It is written
as ``results.csv`` (for tools) and ``results.md`` (for people), each atomically (conf/files.py): a reader never
sees half a table, and re-collecting simply replaces it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from conf.errors import ConfigError
from conf.files import atomic_write_text
from pretrain.sweep.spec import Point, SweepConfig
from pretrain.training.metrics import read_metrics

COLUMNS = ("point", "overrides", "state", "job_id", "step", "loss", "val_loss", "downstream_avg", "tokens_per_s",
           "run_dir")
TOKS_WINDOW = 3  # training records averaged for tokens/s: the last few, after start-up noise is gone


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Final step, train loss, last val_loss, last downstream_avg (the in-loop downstream evaluation's average
    accuracy) and recent mean tokens/s of a run; empty values when absent.

    A resumed run logs the steps after its checkpoint again, so "final" means the last record of the largest step.
    """
    out: dict[str, Any] = {"step": None, "loss": None, "val_loss": None, "downstream_avg": None,
                           "tokens_per_s": None}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return out
    train: list[dict] = []
    for rec in read_metrics(path):  # a run killed mid-write has a torn last line: skipped there
        if "event" in rec:
            continue
        if "val_loss" in rec:
            out["val_loss"] = rec["val_loss"]
        elif "downstream_avg" in rec:
            out["downstream_avg"] = rec["downstream_avg"]
        elif "loss" in rec and "step" in rec:
            train.append(rec)
    if train:
        last = max(train, key=lambda r: r["step"])  # max() keeps the first of equals; want the last logged
        last = [r for r in train if r["step"] == last["step"]][-1]
        out["step"], out["loss"] = last["step"], last["loss"]
        toks = [r["tokens_per_s"] for r in train[-TOKS_WINDOW:] if r.get("tokens_per_s") is not None]
        out["tokens_per_s"] = sum(toks) / len(toks) if toks else None
    return out


def job_state(job: Any) -> str:
    """A finished job's outcome from its per-task result files, else the scheduler's state (RUNNING, ...).

    Only tasks that left a result file are asked for their exception: submitit waits up to 15 s per task for a
    file that a cancelled or requeued task never writes.
    """
    if job is None:
        return "UNKNOWN"
    if not job.done():
        return str(job.state)
    tasks = [job.task(i) for i in range(job.num_tasks)]
    with_result = [t for t in tasks if t.paths.result_pickle.exists()]
    if any(t.exception() is not None for t in with_result):
        return "FAILED"
    if with_result and len(with_result) == len(tasks):
        return "COMPLETED"
    state = str(job.state).split()[0]  # "CANCELLED by 0" -> CANCELLED
    return state if state not in ("", "UNKNOWN", "FINISHED", "COMPLETED") else "NO RESULT"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def build_rows(points: list[Point], states: dict[str, str], job_ids: dict[str, str]) -> list[dict[str, str]]:
    rows = []
    for p in points:
        m = run_summary(p.run_dir)
        rows.append({"point": p.name, "overrides": " ".join(p.own_overrides), "state": states.get(p.name, ""),
                     "job_id": job_ids.get(p.name, ""), "step": _fmt(m["step"]), "loss": _fmt(m["loss"]),
                     "val_loss": _fmt(m["val_loss"]), "downstream_avg": _fmt(m["downstream_avg"]),
                     "tokens_per_s": _fmt(m["tokens_per_s"], 0),
                     "run_dir": str(p.run_dir)})
    return rows


def write_tables(out_dir: Path, rows: list[dict[str, str]]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(r[c].replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return csv_path, md_path


def make_executor(cfg: SweepConfig, kind: str) -> submitit.AutoExecutor:
    """Generic submitit parameters, plus slurm_* ones that the local executor ignores. gpus_per_node 0 sends no GPU
    option at all, so a CPU sweep's sbatch script is a plain CPU job on any site."""
    s = cfg.slurm
    wait_s = os.environ.get("MOR_RANK_EXIT_WAIT", "300")
    if not wait_s.isdigit():
        raise ConfigError(f"MOR_RANK_EXIT_WAIT={wait_s!r}: give the seconds the other ranks get once one has exited, "
                          "as a whole number (default 300)")
    ex = submitit.AutoExecutor(folder=Path(cfg.out_dir) / "submitit", cluster=None if kind == "auto" else kind,
                               slurm_max_num_timeout=s.max_num_timeout)
    ex.update_parameters(name=cfg.name, nodes=s.nodes, tasks_per_node=s.tasks_per_node, cpus_per_task=s.cpus_per_task,
                         timeout_min=s.timeout_min, gpus_per_node=s.gpus_per_node or None, mem_gb=s.mem_gb,
                         slurm_partition=s.partition, slurm_signal_delay_s=s.signal_delay_s,
                         slurm_array_parallelism=s.array_parallelism, slurm_additional_parameters=s.extra or None,
                         # as slurm/launch.sh: once one rank has exited (a crash, a rendezvous that failed), the
                         # others get MOR_RANK_EXIT_WAIT seconds, not the job's whole time limit, to follow.
                         slurm_srun_args=[f"--wait={wait_s}"])
    return ex


def executor_kind(cfg: SweepConfig, override: str | None, where: str) -> str:
    kind = override or cfg.executor
    kind = submitit.AutoExecutor.which() if kind == "auto" else kind
    if kind == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(f"{where}: executor: slurm, but no Slurm here (no sbatch on PATH); use --executor local")
    if kind == "local" and cfg.slurm.nodes > 1:
        raise ConfigError(f"{where}: slurm.nodes: the local executor runs on one node; set nodes: 1")
    return kind


def save_jobs(out_dir: Path, kind: str, tasks: int, jobs: dict[str, Any]) -> None:
    """Record the job ids, so that --collect can ask their result files and the scheduler about them later."""
    record = {"executor": kind, "tasks": tasks, "jobs": {n: str(j.job_id) for n, j in jobs.items()}}
    atomic_write_text(out_dir / "jobs.json", json.dumps(record, indent=1) + "\n")


def load_jobs(out_dir: Path) -> dict[str, Any]:
    """Job handles from jobs.json; empty when this sweep was never submitted from this out_dir."""
    path = out_dir / "jobs.json"
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    cls = submitit.SlurmJob if record["executor"] == "slurm" else submitit.LocalJob
    return {name: cls(folder=out_dir / "submitit", job_id=jid, tasks=list(range(record["tasks"])))
            for name, jid in record["jobs"].items()}


def wait(jobs: dict[str, Any], poll_s: float) -> None:
    """Poll until every job is done, with one progress line (redrawn only when a count changes)."""
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="points done", unit="point", file=sys.stderr)
    last_sacct, status = 0.0, ""
    while True:
        if time.time() - last_sacct >= max(poll_s, 5.0):
            # submitit's own sacct refresh slows down to once per 10 min on long sweeps; one call covers all jobs.
            slurm_jobs = [j for j in jobs.values() if isinstance(j, submitit.SlurmJob)]
            if slurm_jobs:
                slurm_jobs[0].watcher.update()
            last_sacct = time.time()
        done = [n for n, j in jobs.items() if j.done()]
        failed = sum(job_state(jobs[n]) != "COMPLETED" for n in done)
        # Pending array elements read UNKNOWN in submitit (sacct lists them as one "ID_[0-3]" line): "waiting".
        running = sum(str(j.state).startswith("RUNNING") for n, j in jobs.items() if n not in done)
        now = f"running {running}, waiting {len(jobs) - len(done) - running}, failed {failed}"
        if now != status or len(done) != bar.n:
            bar.update(len(done) - bar.n)
            bar.set_postfix_str(now)
            status = now
        if len(done) == len(jobs):
            bar.close()
            return
        time.sleep(poll_s)


def collect(out_dir: Path, points: list[Point], jobs: dict[str, Any]) -> int:
    """Write the table (job states where jobs are known) and print it; 0 when no known job failed."""
    states = {p.name: job_state(jobs[p.name]) for p in points if p.name in jobs}
    rows = build_rows(points, states, {n: str(j.job_id) for n, j in jobs.items()})
    csv_path, md_path = write_tables(out_dir, rows)
    print(md_path.read_text(), end="")
    print(f"results: {csv_path} and {md_path}")
    return 0 if all(r["state"] in ("COMPLETED", "") for r in rows) else 1
