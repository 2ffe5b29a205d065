"""slurm/mor_*.sh through a real Slurm controller: a 2-rank gloo run of a tiny model with the 1.7B script's
headers (named after its model override), a job requeued by `scontrol requeue`, one that reaches its time limit
and one whose time limit is shorter than its warning's lead time, each resuming from its checkpoint with every
step in its metrics exactly once; ranks start with the warning signals blocked."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from pretrain.train import run_name_override
from tests.slurm.jobs import (CPU_ALLOC, NO_WARNING, ROOT, finished, gone, job_info, restarted, sacct_exit_codes,
                              sbatch, steps_logged, tiny, wait_for)


def test_sbatch_mor_1b7_with_a_tiny_override_runs_two_ranks_under_its_own_name(slurm, data, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch([*CPU_ALLOC, NO_WARNING, f"--output={log}", f"--error={log}", "slurm/mor_1b7.sh",
                  *tiny(data, tmp_path / "runs", steps=12, every=6)])
    info = wait_for(lambda: finished(job), 600, "the job to finish", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "2 rank(s)" in text and "run 1b7_mor_ec" in text and "trainer exited with status 0" in text
    # model=tiny_mor_ec without name=: never the 1.7B run's own folder, and said once
    assert text.count("run name: 1b7_mor_ec-tiny_mor_ec (set name=... to choose another)") == 1, text
    assert not (tmp_path / "runs" / "1b7_mor_ec").exists()
    run = tmp_path / "runs" / "1b7_mor_ec-tiny_mor_ec"
    assert steps_logged(run) == list(range(1, 13))
    assert (run / "checkpoints" / "step-000012" / "trainer.pt").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000012"


def test_scontrol_requeue_resumes_without_repeating_or_missing_steps(slurm, data, tmp_path):
    log, run = tmp_path / "job.out", tmp_path / "runs" / "requeue"
    job = sbatch([*CPU_ALLOC, NO_WARNING, f"--output={log}", f"--error={log}", "--open-mode=append",
                  "slurm/mor_1b7.sh", *tiny(data, tmp_path / "runs", steps=40, every=5, name="requeue")],
                 env={"MOR_FAULT_STEP_SECONDS": "0.25"})
    wait_for(lambda: len(steps_logged(run)) >= 12, 400, "step 12 of the first start")
    res = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    info = wait_for(lambda: finished(job), 600, "the requeued job to finish", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, text)
    assert "resumed from" in text
    assert steps_logged(run) == list(range(1, 41)), text


def test_scancel_with_wandb_offline_saves_exits_75_and_a_resubmission_logs_the_uninterrupted_losses(
        slurm, data, tmp_path):
    """scancel sends SIGTERM to the batch shell and every process of the step, wandb's service among them: the
    ranks still save the step they were at and exit 75. The resubmitted job (past a lock left as a SIGKILLed rank 0
    of the cancelled job would leave it) resumes and logs the losses of an uninterrupted run bit for bit."""
    from pretrain.training.runlock import LOCK
    from tests.distributed.harness import spawn_ranks
    from tests.faults.runs import losses
    steps, log, run = 10, tmp_path / "job.out", tmp_path / "runs" / "cancel"
    args = [*tiny(data, tmp_path / "runs", steps=steps, every=0, name="cancel"), "logging.wandb=offline"]
    exact = {"MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AVX2"}   # as spawn_ranks' ranks have
    submit = [*CPU_ALLOC, NO_WARNING, f"--output={log}", f"--error={log}", "--open-mode=append", "slurm/mor_1b7.sh",
              *args]
    job = sbatch(submit, env={"MOR_FAULT_STEP_SECONDS": "0.5", **exact})
    wait_for(lambda: len(steps_logged(run)) >= 3 or finished(job), 600, "step 3")
    res = subprocess.run(["scancel", str(job)], capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    wait_for(lambda: gone(job), 300, "the cancelled job's processes to end", every=1)
    info, text = job_info(job), log.read_text()
    assert info["JobState"] == "CANCELLED" and sacct_exit_codes(job)[f"{job}.0"] == "75:0", (info, text)
    said = [ln for ln in text.splitlines() if ln.startswith("preempted: saved step ")]
    assert len(said) == 1 and "(SIGTERM)" in said[0], text
    step = int(said[0].split()[3].rstrip(";"))
    assert 3 <= step < steps and (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"
    assert "launch: trainer exited with status 75 after SIGTERM" in text and "Traceback" not in text, text
    assert len([ln for ln in text.splitlines() if ln.startswith("wandb:")]) <= 1, text
    assert not (run / LOCK).exists()
    (run / LOCK).write_text(json.dumps({"host": "node-of-the-cancelled-job", "pid": 1, "pid_start": None,
                                        "slurm_job": str(job), "slurm_restart": 0, "since": "then"}) + "\n")
    log.write_text("")
    again = sbatch(submit, env=exact)
    ref = tmp_path / "reference"   # meanwhile: the same run uninterrupted, as two local processes
    ref.mkdir()
    assert spawn_ranks(2, ["-m", "pretrain.train", "1b7_mor_ec", *tiny(data, ref, steps=steps, every=0,
                                                                       name="cancel")],
                       ref, env=exact, timeout=600, check=False) == [0, 0]
    info = wait_for(lambda: finished(again), 600, "the resubmitted job to finish", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert f"resumed from {run / 'checkpoints' / f'step-{step:06d}'}" in text, text
    takeover = [ln for ln in text.splitlines() if ln.startswith("run lock: taking over")]
    assert len(takeover) == 1 and f"Slurm job {job} is " in takeover[0], text
    assert losses(run) == losses(ref / "cancel")   # every step once, each loss equal to the last bit


def test_time_limit_signal_saves_requeues_and_finishes(slurm, data, tmp_path):
    """--time=2 with --signal=USR1@20 (to the ranks, not the batch shell): Slurm warns 20 to 80 s before the end,
    40 to 100 s after the start; the ranks save together and exit 75, the launcher requeues the job, which
    resumes until all steps are done. The steps of the first start (3 s each, 114 s in all) cannot all run before
    the warning; after the requeue they run at full speed, so the job ends without waiting for another one."""
    log, run = tmp_path / "job.out", tmp_path / "runs" / "timelimit"
    steps = 38
    job = sbatch([*CPU_ALLOC, "--time=2", "--signal=USR1@20", f"--output={log}", f"--error={log}",
                  "--open-mode=append", "slurm/mor_1b7.sh",
                  *tiny(data, tmp_path / "runs", steps=steps, every=0, name="timelimit")],
                 env={"MOR_FAULT_STEP_SECONDS": "3", "MOR_FAULT_SLOW_STARTS": "1"})
    info = wait_for(lambda: finished(job), 900, "the job to finish through its requeues", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, text)
    assert "the trainer saved a checkpoint and asked for a requeue" in text and "resumed from" in text
    assert "time limit too short" not in text
    assert steps_logged(run) == list(range(1, steps + 1)), text


def test_a_time_limit_within_the_warning_lead_saves_once_and_does_not_requeue(slurm, data, tmp_path):
    """--time=2 under the script's --signal=B:USR1@300: Slurm warns the batch shell at once, the launcher hands
    the warning to the ranks (starting or running), they save, one line says why, and the job stops: no
    requeue loop. The steps (3 s each) cannot all fit in the limit."""
    log, run = tmp_path / "job.out", tmp_path / "runs" / "short"
    job = sbatch([*CPU_ALLOC, "--time=2", f"--output={log}", f"--error={log}", "--open-mode=append",
                  "slurm/mor_1b7.sh", *tiny(data, tmp_path / "runs", steps=40, every=0, name="short")],
                 env={"MOR_FAULT_STEP_SECONDS": "3"})
    # ended, or requeued: either answers the question
    info = wait_for(lambda: finished(job) or restarted(job), 600, "the job to end", every=2)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, text)
    assert "launch: got USR1" in text and "trainer exited with status 2" in text, text
    lines = [ln for ln in text.splitlines() if "time limit too short for its warning" in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--time" in lines[0], text
    saved = (run / "checkpoints" / "latest").read_text().strip()
    logged = steps_logged(run)
    assert logged == list(range(1, len(logged) + 1)) and saved == f"step-{logged[-1]:06d}" and len(logged) < 40


def test_ranks_start_with_the_warning_signals_blocked(slurm, tmp_path):
    """What srun starts (MOR_PYTHON stands in for Python) has USR1 and USR2 blocked, so a warning that comes
    before the trainer's handler stays pending instead of killing the rank; SIGTERM is not blocked."""
    probe, log = tmp_path / "probe.sh", tmp_path / "job.out"
    probe.write_text("#!/bin/sh\nexec grep '^SigBlk' /proc/self/status\n")
    probe.chmod(0o755)
    job = sbatch([*CPU_ALLOC, NO_WARNING, f"--output={log}", f"--error={log}", "slurm/mor_1b7.sh"],
                 env={"MOR_PYTHON": str(probe)})
    info = wait_for(lambda: finished(job), 600, "the job to finish", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    masks = [int(m, 16) for m in re.findall(r"^SigBlk:\s*([0-9a-f]+)$", text, re.M)]
    assert len(masks) == 2, text   # one per rank
    bit = lambda sig: 1 << (sig - 1)  # noqa: E731
    for mask in masks:
        assert mask & bit(signal.SIGUSR1) and mask & bit(signal.SIGUSR2) and not mask & bit(signal.SIGTERM), text


@pytest.mark.parametrize("overrides,name", [
    (["model=tiny_mor_ec"], "name=1b7_mor_ec-tiny_mor_ec"),
    ([f"model={ROOT}/conf/model/tiny_mor_tc.yaml", "train.steps=5"], "name=1b7_mor_ec-tiny_mor_tc"),
    (["model=tiny_mor_ec", "name=mine"], None),          # the user named it
    (["model=1b7_mor_ec"], None),                         # the run file's own model
    (["model.n_layers=10"], None),                        # a change of the model, not another one
    (["model={num_recursions: 4}"], None),                # merged into the run file's model
], ids=["preset", "path", "named", "same-model", "dotted", "mapping"])
def test_a_model_override_names_the_run_after_it_unless_named(overrides, name):
    assert run_name_override(str(ROOT / "conf/run/1b7_mor_ec.yaml"), overrides) == name


@pytest.mark.parametrize("script", ["mor_135m.sh", "mor_360m.sh", "mor_730m.sh", "mor_1b7.sh"])
def test_scripts_explain_themselves_and_refuse_to_run_outside_slurm(script):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    help_ = subprocess.run(["bash", f"slurm/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=30, check=False, env=env)
    scale = script[len("mor_"):-len(".sh")]
    out = help_.stdout
    assert help_.returncode == 0 and "sbatch" in out and "requeue" in out, help_.stderr
    # its own header, resources and run files, then a pointer to the launcher (not the launcher's own text)
    assert out.startswith("MoR ") and "The launcher behind" not in out, out
    nodes = re.search(r"^#SBATCH --nodes=(\d+)$", (ROOT / "slurm" / script).read_text(), re.M).group(1)
    assert f"  --nodes={nodes}\n" in out and "  --signal=B:USR1@300\n" in out, out
    runs = sorted(p.stem for p in (ROOT / "conf" / "run").glob(f"{scale}_*.yaml"))
    assert f"MOR_RUN (run file from conf/run/): {' '.join(runs)} (default {scale}_mor_ec)" in out, out
    assert "bash slurm/launch.sh --help" in out
    res = subprocess.run(["bash", f"slurm/{script}", "train.steps=1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, check=False, env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not inside a Slurm job" in res.stderr
    header = (ROOT / "slurm" / script).read_text()
    for option in ("--nodes=", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=", "--time=",
                   "--signal=B:USR1@", "--requeue", "--output="):
        assert f"#SBATCH {option}" in header
