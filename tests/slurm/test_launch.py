"""slurm/mor_*.sh through a real Slurm controller: a 2-rank gloo run of a tiny model with the 1.7B script's
headers, then a job requeued by `scontrol requeue` and one that reaches its time limit, each resuming from its
checkpoint with every step in its metrics exactly once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.pretrain.fixtures import make_shards

ROOT = Path(__file__).resolve().parents[2]
# A CPU allocation instead of the scripts' GPU nodes: sbatch options on the command line win over #SBATCH lines.
CPU_ALLOC = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]


def tiny(data: Path, out: Path, name: str, steps: int, every: int) -> list[str]:
    return ["model=tiny_mor_ec", "model.vocab_size=128", f"data.path={data}", "data.num_workers=0",
            f"out_dir={out}", f"name={name}", f"train.steps={steps}", "train.log_every=1", "train.eval_every=0",
            "train.precision=fp32", "train.compile=false", "parallel.micro_batch_size=2",
            "parallel.global_batch_size=null", "parallel.zero_stage=1", f"checkpoint.every={every}",
            "logging.wandb=disabled"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("slurm_data") / "shards", vocab=128, seq_len=32, train=512, val=16)


def sbatch(args: list[str], env: dict | None = None) -> int:
    res = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip().split(";")[0])


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


def test_sbatch_mor_1b7_with_a_tiny_override_runs_two_ranks(slurm, data, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch([*CPU_ALLOC, "--time=5", f"--output={log}", f"--error={log}", "--wait", "slurm/mor_1b7.sh",
                  *tiny(data, tmp_path / "runs", "sbatch", steps=12, every=6)])
    text = log.read_text()
    assert job_info(job)["JobState"] == "COMPLETED", text
    assert "2 rank(s)" in text and "run 1b7_mor_ec" in text and "trainer exited with status 0" in text
    run = tmp_path / "runs" / "sbatch"
    assert steps_logged(run) == list(range(1, 13))
    assert (run / "checkpoints" / "step-000012" / "trainer.pt").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000012"


def test_scontrol_requeue_resumes_without_repeating_or_missing_steps(slurm, data, tmp_path):
    log, run = tmp_path / "job.out", tmp_path / "runs" / "requeue"
    job = sbatch([*CPU_ALLOC, "--time=10", f"--output={log}", f"--error={log}", "--open-mode=append",
                  "slurm/mor_1b7.sh", *tiny(data, tmp_path / "runs", "requeue", steps=40, every=5)],
                 env={"MOR_FAULT_STEP_SECONDS": "0.25"})
    wait_for(lambda: len(steps_logged(run)) >= 12, 180, "step 12 of the first start")
    res = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    info = wait_for(lambda: finished(job), 300, "the requeued job to finish", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, text)
    assert "resumed from" in text
    assert steps_logged(run) == list(range(1, 41)), text


def test_time_limit_signal_saves_requeues_and_finishes(slurm, data, tmp_path):
    """--time=1 with --signal=USR1@40: the ranks get USR1 about half a minute in, save together and exit 75; the
    launcher requeues the job, which resumes — as many times as it takes — until all 70 steps are done."""
    log, run = tmp_path / "job.out", tmp_path / "runs" / "timelimit"
    job = sbatch([*CPU_ALLOC, "--time=1", "--signal=USR1@40", f"--output={log}", f"--error={log}",
                  "--open-mode=append", "slurm/mor_1b7.sh",
                  *tiny(data, tmp_path / "runs", "timelimit", steps=70, every=0)],
                 env={"MOR_FAULT_STEP_SECONDS": "0.5"})
    info = wait_for(lambda: finished(job), 420, "the job to finish through its requeues", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, text)
    assert "the trainer saved a checkpoint and asked for a requeue" in text and "resumed from" in text
    assert steps_logged(run) == list(range(1, 71)), text


@pytest.mark.parametrize("script", ["mor_135m.sh", "mor_360m.sh", "mor_730m.sh", "mor_1b7.sh"])
def test_scripts_explain_themselves_and_refuse_to_run_outside_slurm(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    help_ = subprocess.run(["bash", f"slurm/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=30, check=False, env=env)
    assert help_.returncode == 0 and "sbatch" in help_.stdout and "requeue" in help_.stdout
    res = subprocess.run(["bash", f"slurm/{script}", "train.steps=1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, check=False, env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not inside a Slurm job" in res.stderr
    header = (ROOT / "slurm" / script).read_text()
    for option in ("--nodes=", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=", "--time=",
                   "--signal=USR1@", "--requeue", "--output="):
        assert f"#SBATCH {option}" in header
