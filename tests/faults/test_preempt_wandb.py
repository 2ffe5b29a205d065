"""A SIGTERM that also kills wandb's service still saves. Slurm's scancel, requeue, preemption and time limit send
SIGTERM to every process of the job step, wandb's service (``wandb-core``, a child of rank 0) among them; the next
``wandb.log`` then raised ConnectionResetError before the save could run (exit 1, every step since the last
checkpoint lost). Here, with wandb offline, the service and the trainer get SIGTERM together: wandb is detached
in one line, the step is saved, the exit is 75, and metrics.jsonl has every step. The same under a real Slurm
job: tests/slurm/test_launch.py (scancel)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pretrain.training.preempt import REQUEUE_EXIT_CODE
from pretrain.training.runlock import LOCK
from tests.distributed.harness import ROOT
from tests.faults.runs import RUN, args, losses
from tests.faults.test_launcher_death import children, wait_until
from tests.faults.test_signals import NOT_IN_A_JOB
from tests.pretrain.fixtures import make_shards


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sigterm_to_the_trainer_and_wandbs_service_saves_and_exits_75(tmp_path):
    data = make_shards(tmp_path / "data")
    run = tmp_path / "runs" / "run"
    env = {**os.environ, **NOT_IN_A_JOB, "MOR_FAULT_STEP_SECONDS": "0.5", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)   # one process of its own (this one's world holds MASTER_PORT)
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", RUN,
                                 *args(data, tmp_path / "runs", "run", "train.steps=400", "checkpoint.every=0",
                                       "logging.wandb=offline")],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: proc.poll() is not None or (run / "metrics.jsonl").exists() and len(losses(run)) >= 2,
                   600, "two steps")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        service = [p for p in children(proc.pid) if "wandb-core" in command(p)]
        assert len(service) == 1, [command(p) for p in children(proc.pid)]
        os.kill(service[0], signal.SIGTERM)   # as Slurm does: every process of the step, at once
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "run.log").read_text()
    assert code == REQUEUE_EXIT_CODE, text[-3000:]
    lines = text.splitlines()
    said = [ln for ln in lines if ln.startswith("preempted: saved step ")]
    assert len(said) == 1 and "(SIGTERM)" in said[0], text[-3000:]
    step = int(said[0].split()[3].rstrip(";"))
    assert len([ln for ln in lines if ln.startswith("wandb:")]) == 1, text[-3000:]   # its death, in one line
    assert "Traceback" not in text and "socket.send" not in text, text[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    assert sorted(losses(run)) == list(range(1, step + 1))   # metrics.jsonl went on after wandb died
    assert not (run / LOCK).exists()
