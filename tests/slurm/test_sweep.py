"""pretrain.sweep end to end with real submitit: the plan (names, grid × points), one-line errors, a 2-point sweep
of 2-rank gloo runs through submitit's local executor and through the one-node Slurm cluster, and a time-limit
warning (USR2) that submitit turns into a requeue which resumes from the trainer's checkpoint."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.parallel.layout import RENDEZVOUS_PORT_BASE, RENDEZVOUS_PORTS
from pretrain.sweep.spec import expand, load_sweep
from tests.pretrain.fixtures import make_shards

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
# A 2-rank data-parallel run of the tiny MoR that takes seconds on one CPU core per rank.
TINY = {"model.vocab_size": 128, "model.max_seq_len": 64, "data.num_workers": 0, "train.precision": "fp32",
        "parallel.micro_batch_size": 2, "parallel.zero_stage": 1, "train.steps": STEPS, "train.log_every": 1,
        "train.eval_every": 3, "train.eval_batches": 2, "checkpoint.every": 3, "logging.wandb": "disabled"}
CPU = {"tasks_per_node": 2, "gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 10}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("sweep_data") / "shards", vocab=128, seq_len=32, train=512, val=16)


@pytest.fixture
def slurm_root(slurm):
    """The Slurm cluster of conftest.py (skip, or fail under MOR_REQUIRE_SLURM=1), submitted to as root."""
    if os.geteuid() != 0:
        reason = "the local Slurm cluster takes jobs from root only (slurm/local_cluster.sh)"
        if os.environ.get("MOR_REQUIRE_SLURM") == "1":
            pytest.fail(f"MOR_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def write_sweep(path: Path, data: Path, out: Path, **extra) -> Path:
    # JSON is YAML: the file is exactly what a user could write.
    body = {"run": "tiny_cpu", "out_dir": str(out), "overrides": {**TINY, "data.path": str(data)},
            "grid": {"optim.lr": [1.0e-3, 3.0e-3]}, "slurm": CPU, **extra}
    path.write_text(json.dumps(body, indent=1))
    return path


def sweep(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOR_FAULT_")} | (env or {})
    try:
        return subprocess.run([sys.executable, "-m", "pretrain.sweep", *args], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        out = Path(json.loads(Path(args[0]).read_text())["out_dir"])
        raise AssertionError(f"pretrain.sweep {' '.join(args)} did not end in {timeout:.0f} s\n{logs_of(out)}") \
            from None


def logs_of(out: Path, lines: int = 20) -> str:
    """The end of every log of a sweep's jobs (submitit's per-task files), for the message of a failed wait."""
    parts = [f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
             for p in sorted((out / "submitit").glob("*_log.*"))]
    queue = subprocess.run(["squeue", "-a"], capture_output=True, text=True, timeout=30, check=False).stdout
    return "\n".join([*parts, "--- squeue", queue])


def table(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_grid_times_points_gives_named_points_with_their_overrides(tmp_path):
    f = tmp_path / "lr_rec.yaml"
    f.write_text("run: tiny_cpu\nout_dir: o\noverrides: {train: {steps: 5}}\n"
                 "points:\n  - {model.num_recursions: 2}\n  - {model.num_recursions: 3, schedule.kind: cosine}\n"
                 "grid:\n  optim.lr: [1e-3, 3.0e-3]\n  parallel.micro_batch_size: [2, 4]\n")
    cfg = load_sweep(str(f))
    points = expand(cfg)
    assert cfg.name == "lr_rec" and cfg.out_dir == str(Path("o").absolute())
    assert [p.name for p in points][:4] == ["lr_rec-0-num_recursions2_lr0.001_micro_batch_size2",
                                            "lr_rec-1-num_recursions2_lr0.001_micro_batch_size4",
                                            "lr_rec-2-num_recursions2_lr0.003_micro_batch_size2",
                                            "lr_rec-3-num_recursions2_lr0.003_micro_batch_size4"]
    assert len(points) == 8 and len({p.name for p in points}) == 8
    p = points[7]
    assert p.name.startswith("lr_rec-7-num_recursions3_kindcosine_lr0.003_micro_b")  # slug capped at 48 chars
    assert p.own_overrides == ["model.num_recursions=3", "schedule.kind=cosine", "optim.lr=0.003",
                               "parallel.micro_batch_size=4"]
    assert p.overrides == [f"name={p.name}", f"out_dir={cfg.out_dir}", "train.steps=5", *p.own_overrides]
    assert p.run_dir == Path(cfg.out_dir) / p.name
    assert all(c.isalnum() or c in "._+-" for c in p.name)


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path, data):
    out = tmp_path / "out"
    res = sweep(str(write_sweep(tmp_path / "plan.yaml", data, out)), "--dry-run", "--executor", "local")
    assert res.returncode == 0, res.stderr
    assert "plan-0-lr0.001: optim.lr=0.001" in res.stdout and "plan-1-lr0.003: optim.lr=0.003" in res.stdout
    assert "executor local" in res.stdout and "1 node(s) × 2 task(s)" in res.stdout
    assert "would submit 2 job(s)" in res.stdout
    assert not out.exists()  # no submitit folder, no job record, no runs


def test_missing_data_is_a_warning_in_a_dry_run_and_an_error_for_a_submission(tmp_path):
    plan = write_sweep(tmp_path / "nodata.yaml", tmp_path / "not_made_yet", tmp_path / "out")
    dry = sweep(str(plan), "--dry-run", "--executor", "local")
    assert dry.returncode == 0 and "would submit 2 job(s)" in dry.stdout
    assert dry.stderr.count("warning: ") == 2 and "no manifest here" in dry.stderr
    real = sweep(str(plan), "--executor", "local")
    assert real.returncode == 2 and real.stderr.count("\n") == 1 and "data.path:" in real.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body,where,key", [
    ("gird:\n  optim.lr: [1]\n", ":3:", "gird: unknown key (did you mean 'grid'?)"),
    ("slurm:\n  tasks_per_node: two\n", ":4:", "slurm.tasks_per_node: expected int, got str 'two'"),
    ("grid: {optim.lr: 0.1}\n", ":3:", "grid.optim.lr: expected a non-empty list"),
    ("overrides: {name: x}\n", ":3:", "overrides.name: set by the sweep"),
    ("overrides: {data.path: DATA}\ngrid: {optim.lr: [1.0e-3, -1.0]}\n", ": point bad-1-lr-1.0:",
     "optim.lr: must be > 0"),
], ids=["unknown-key", "bad-type", "grid-not-a-list", "reserved-key", "bad-point"])
def test_a_bad_sweep_file_is_one_line_naming_the_file_and_key(tmp_path, data, body, where, key):
    f = tmp_path / "bad.yaml"
    f.write_text(f"run: tiny_cpu\nout_dir: {tmp_path / 'out'}\n" + body.replace("DATA", str(data)))
    res = sweep(str(f), "--executor", "local")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"error: {f}") and where in lines[0] and key in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing was submitted


def check_table(out: Path, state: str = "COMPLETED") -> list[dict[str, str]]:
    rows = table(out)
    assert [r["overrides"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.003"], rows
    for r in rows:
        assert r["state"] == state and int(r["step"]) == STEPS, rows
        assert float(r["loss"]) > 0 and float(r["val_loss"]) > 0 and float(r["tokens_per_s"]) > 0, rows
        assert "downstream_avg" in r, rows  # the column is there (empty unless the run evaluated downstream)
        assert steps_logged(Path(r["run_dir"])) == list(range(1, STEPS + 1))
    md = (out / "results.md").read_text()
    assert all(f"| {r['point']} |" in md for r in rows)
    return rows


def test_the_table_has_the_last_downstream_average_and_is_empty_without_one(tmp_path):
    """Downstream records (in-loop evaluation) fill downstream_avg with the last one's average; neither they nor
    the validation records count as training records."""
    from pretrain.sweep.results import COLUMNS, build_rows, run_summary, write_tables
    from pretrain.sweep.spec import Point
    runs = {"down": tmp_path / "down", "plain": tmp_path / "plain"}
    for name, run_dir in runs.items():
        run_dir.mkdir()
        recs = [{"step": s, "loss": 3.0 / s, "tokens_per_s": 100.0} for s in (1, 2, 3, 4)]
        recs += [{"step": 2, "val_loss": 2.5}, {"step": 4, "val_loss": 2.0}]
        if name == "down":
            recs += [{"step": s, "downstream_avg": avg, "downstream_piqa": avg, "downstream_piqa_acc": avg,
                      "downstream_items": 50} for s, avg in ((2, 0.5), (4, 0.625))]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = run_summary(runs["down"])
    assert summary == {"step": 4, "loss": 0.75, "val_loss": 2.0, "downstream_avg": 0.625, "tokens_per_s": 100.0}
    assert run_summary(runs["plain"])["downstream_avg"] is None
    rows = build_rows([Point(n, [], [], d) for n, d in runs.items()], {}, {})
    csv_path, md_path = write_tables(tmp_path / "out", rows)
    assert [r["downstream_avg"] for r in table(tmp_path / "out")] == ["0.6250", ""]
    md = md_path.read_text().splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |" and "downstream_avg" in COLUMNS
    assert md[2].split(" | ")[COLUMNS.index("downstream_avg")] == "0.6250", md


def test_local_executor_runs_two_points_of_two_ranks_and_tabulates(tmp_path, data):
    out = tmp_path / "out"
    f = write_sweep(tmp_path / "loc.yaml", data, out)
    t0 = time.time()
    res = sweep(str(f), "--executor", "local", "--poll", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    rows = check_table(out)
    assert "points done: 100%" in res.stderr and "| loc-1-lr0.003 |" in res.stdout
    # both ranks of each point ran (submitit's local executor starts tasks_per_node processes)
    assert len(list((out / "submitit").glob("*_1_log.out"))) == 2
    # --collect rebuilds the same table from the metrics and the recorded job ids, without submitting
    (out / "results.csv").unlink()
    res = sweep(str(f), "--collect")
    assert res.returncode == 0, res.stderr
    assert table(out) == rows
    print(f"local sweep: {time.time() - t0:.1f} s")


def test_slurm_array_runs_two_points_of_two_ranks_on_two_nodes(slurm_root, tmp_path, data):
    """Each point's job asks for 2 nodes × 1 task (CI's cluster has two; with one, Slurm refuses the array)."""
    out = tmp_path / "out"
    two_nodes = {**CPU, "nodes": 2, "tasks_per_node": 1}
    res = sweep(str(write_sweep(tmp_path / "slu.yaml", data, out, slurm=two_nodes)), "--executor", "slurm",
                "--poll", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "each job: 2 node(s) × 1 task(s)" in res.stdout, res.stdout
    rows = check_table(out)
    array_id = rows[0]["job_id"].split("_")[0]
    assert [r["job_id"] for r in rows] == [f"{array_id}_0", f"{array_id}_1"]  # one array, one element per point
    script = (out / "submitit" / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script, script
    assert "#SBATCH --array=0-1%2" in script
    assert "gpus" not in script and sys.executable in script  # no GPU request; this venv's python
    assert "srun --unbuffered" in script and "--wait=300" in script  # the other ranks follow one that exited
    for row in rows:   # rank 0's log: the rendezvous on the first node, a rank on each
        rank0 = (out / "submitit" / f"{row['job_id']}_0_log.out").read_text()
        assert "layout: 2 rank(s) on 2 node(s) (node1: rank 0, node2: rank 1)" in rank0, rank0
        # the launcher's port rule (pretrain/parallel/layout.py), below the ephemeral ports other sockets take
        port = int(re.search(r"rendezvous node1:(\d+)", rank0).group(1))
        assert RENDEZVOUS_PORT_BASE <= port < RENDEZVOUS_PORT_BASE + RENDEZVOUS_PORTS, rank0


def test_slurm_time_limit_warning_is_saved_requeued_and_resumed(slurm_root, tmp_path, data):
    """USR2 (what --signal=USR2@signal_delay_s sends before the limit): the ranks save together, rank 0 hands
    over to submitit, which checkpoints the call and requeues the element; the rerun resumes and finishes."""
    out, steps = tmp_path / "out", 20
    f = write_sweep(tmp_path / "req.yaml", data, out, grid={},
                    overrides={**TINY, "data.path": str(data), "train.steps": steps, "checkpoint.every": 0,
                               "train.eval_every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.sweep", str(f), "--executor", "slurm", "--poll", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MOR_FAULT_STEP_SECONDS": "0.3"})
    try:
        run_dir, deadline = out / "req-0", time.time() + 120
        while len(steps_logged(run_dir)) < 5:
            assert time.time() < deadline and proc.poll() is None, f"the point never reached step 5\n{logs_of(out)}"
            time.sleep(0.5)
        job_id = json.loads((out / "jobs.json").read_text())["jobs"]["req-0"]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        text, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text
    (row,) = table(out)
    assert row["state"] == "COMPLETED" and int(row["step"]) == steps, text
    assert steps_logged(run_dir) == list(range(1, steps + 1))  # every step exactly once across the two starts
    log = (out / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "preempted: saved step" in log and "Requeued job" in log and "resumed from" in log, log
    info = subprocess.run(["scontrol", "show", "job", job_id], check=False, capture_output=True, text=True).stdout
    assert "Restarts=1" in info, info


def test_slurm_scancel_saves_and_stays_cancelled(slurm_root, tmp_path, data):
    """scancel sends SIGTERM: the ranks save and exit 75, nothing requeues it, and the table says CANCELLED."""
    out, steps = tmp_path / "out", 200
    f = write_sweep(tmp_path / "can.yaml", data, out, grid={},
                    overrides={**TINY, "data.path": str(data), "train.steps": steps, "checkpoint.every": 0,
                               "train.eval_every": 0})
    res = sweep(str(f), "--executor", "slurm", "--no-wait", env={"MOR_FAULT_STEP_SECONDS": "0.3"})
    assert res.returncode == 0, res.stderr
    job_id = json.loads((out / "jobs.json").read_text())["jobs"]["can-0"]
    run_dir, deadline = out / "can-0", time.time() + 120
    while len(steps_logged(run_dir)) < 3:
        assert time.time() < deadline, f"the point never reached step 3\n{logs_of(out)}"
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    # sacct says CANCELLED at once, while the ranks are still saving: wait until squeue no longer lists the job
    # (not even as COMPLETING) before reading what they left behind.
    deadline = time.time() + 60
    while subprocess.run(["squeue", "-h", "-j", job_id], check=False, capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, "the cancelled job never ended"
        time.sleep(1)
    res = sweep(str(f), "--collect")
    assert res.returncode == 1 and "| CANCELLED |" in res.stdout, res.stdout + res.stderr
    (row,) = table(out)
    assert row["state"] == "CANCELLED" and 3 <= int(row["step"]) < steps, row
    assert any((run_dir / "checkpoints").glob("step-*/trainer.pt"))  # saved on the way out
    log = (out / "submitit" / f"{job_id}_0_log.out").read_text()
    assert "preempted: saved step" in log and "Requeued" not in log, log
    info = subprocess.run(["scontrol", "show", "job", job_id], check=False, capture_output=True, text=True).stdout
    assert "Restarts=0" in info and "JobState=CANCELLED" in info, info
