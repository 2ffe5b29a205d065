"""Submitting jobs to the local Slurm cluster and watching them: what the tests in tests/slurm share."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A CPU allocation instead of the scripts' GPU nodes: sbatch options on the command line win over #SBATCH lines.
CPU_ALLOC = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
# Well over twice the scripts' 5-minute warning lead (Slurm sends it up to a minute early): no warning comes
# during the few minutes these jobs take.
NO_WARNING = "--time=15"


def tiny(data: Path, out: Path, steps: int, every: int, name: str | None = None) -> list[str]:
    return ["model=tiny_mor_ec", "model.vocab_size=128", f"data.path={data}", "data.num_workers=0",
            f"out_dir={out}", *([f"name={name}"] if name else []), f"train.steps={steps}", "train.log_every=1",
            "train.eval_every=0", "train.precision=fp32", "train.compile=false", "parallel.micro_batch_size=2",
            "parallel.global_batch_size=null", "parallel.zero_stage=1", f"checkpoint.every={every}",
            "logging.wandb=disabled"]


# Every job submitted through sbatch() (tests/slurm/conftest.py cancels what a test leaves behind).
submitted: list[int] = []


def sbatch(args: list[str], env: dict | None = None) -> int:
    # The job runs this interpreter (sbatch passes the environment on), whatever environment runs the tests.
    env = {**os.environ, "MOR_PYTHON": sys.executable, **(env or {})}
    res = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False, env=env)
    assert res.returncode == 0, res.stderr
    submitted.append(int(res.stdout.strip().split(";")[0]))
    return submitted[-1]


def job_info(job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(cond, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def finished(job: int) -> dict[str, str] | None:
    info = job_info(job)
    return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def restarted(job: int) -> dict[str, str] | None:
    info = job_info(job)
    return info if int(info.get("Restarts") or 0) > 0 else None


def gone(job: int | str) -> bool:
    """Whether every process of the job has ended (a cancelled job reads CANCELLED while they still run)."""
    res = subprocess.run(["squeue", "-h", "-j", str(job)], capture_output=True, text=True, timeout=30, check=False)
    return res.returncode == 0 and not res.stdout.strip() or "Invalid job id" in res.stderr


def sacct_exit_codes(job: int) -> dict[str, str]:
    """JobID -> ExitCode of the job and its ended steps, from the accounting database (which may lag)."""
    def read():
        out = subprocess.run(["sacct", "-j", str(job), "-n", "-P", "-o", "JobID,State,ExitCode"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
        rows = [line.split("|") for line in out.splitlines() if line.count("|") == 2]
        codes = {jid: code for jid, state, code in rows if state not in ("RUNNING", "PENDING")}
        return codes if f"{job}.0" in codes else None
    return wait_for(read, 60, f"sacct to record job {job}'s steps", every=2)
