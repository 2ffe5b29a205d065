"""slurm/mor_1b7.sh across two nodes of the local cluster (slurm/local_cluster.sh start --nodes 2): ranks numbered
node by node with tensor parallelism inside each node and data parallelism across them, trained as one node of four
ranks trains; a tensor-parallel group across nodes and an unusable world size refused in one line; a node whose
processes are killed (or stop answering) ends the job within the collective timeout, and the run resubmitted on one
node resumes through the smaller data-parallel size with the losses of the uninterrupted run; a rendezvous port
that another socket holds is one line, and the job ends."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.faults.runs import losses
from tests.slurm.conftest import REQUIRED
from tests.slurm.jobs import (CPU_ALLOC, NO_WARNING, finished, gone, job_info, sbatch, steps_logged, tiny,
                              wait_for)

TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
STEPS, EVERY = 6, 2
# As the ranks of tests/distributed/harness.spawn_ranks have them: the reference run is bitwise comparable.
EXACT = {"MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AVX2"}
# Within this the survivors of a dead node must give up; a lost connection makes them fail at once.
TIMEOUT_S = 60


def args(data: Path, out: Path, name: str, timeout: float = TIMEOUT_S) -> list[str]:
    """TP=2 on 4 ranks (DP=2), or on 2 ranks (DP=1) after the layout change; the global batch fixed at 4 sequences,
    so that DP=1 accumulates what DP=2 splits. wandb offline, the default logger: its service dies with a lost
    node's ranks too."""
    return [*tiny(data, out, steps=STEPS, every=EVERY, name=name), "parallel.tensor_parallel=2",
            "parallel.global_batch_size=4", f"parallel.collective_timeout_s={timeout}", "logging.wandb=offline"]


def node_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return dict(ln.split()[:2] for ln in out.splitlines() if len(ln.split()) >= 2)


def usable(states: dict[str, str]) -> list[str]:
    """Nodes that take jobs: idle, in use or finishing one (comp); not down, drained or failing."""
    return [n for n, s in states.items() if s.rstrip("*~#$@^-!%") in ("idle", "mix", "alloc", "comp", "plnd")]


@pytest.fixture(scope="module")
def two_nodes(slurm):
    states = node_states()
    if len(states) >= 2:   # a node that an earlier test took down comes back by itself (ReturnToService=2)
        try:
            wait_for(lambda: len(usable(node_states())) >= 2, 120, "two usable nodes", every=2)
        except AssertionError:
            pass
        states = node_states()
    if len(usable(states)) < 2:
        reason = (f"the Slurm cluster has {len(usable(states))} usable node(s) ({states}): start it with "
                  "local_cluster.sh start --nodes 2")
        if REQUIRED:
            pytest.fail(f"MOR_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The same run as one node of 4 ranks (forked local processes), uninterrupted: step -> loss. Called after a
    test has submitted its job, so that the two run side by side."""
    from tests.distributed.harness import spawn_ranks
    out = tmp_path_factory.mktemp("reference")
    cache: dict[int, float] = {}

    def get() -> dict[int, float]:
        if not cache:
            spawn_ranks(4, ["-m", "pretrain.train", "1b7_mor_ec", *args(data, out, "ref")], out, timeout=900)
            cache.update(losses(out / "ref"))
        return cache
    return get


def close(got: dict[int, float], ref: dict[int, float], tol: float = 1e-5) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), (got, ref)
    worst = max(abs(got[s] - ref[s]) for s in ref)
    assert worst <= tol, (worst, got, ref)


def submit(alloc: list[str], log: Path, overrides: list[str], env: dict | None = None) -> int:
    return sbatch([*alloc, NO_WARNING, f"--output={log}", f"--error={log}", "--open-mode=append",
                   "slurm/mor_1b7.sh", *overrides], env={**EXACT, **(env or {})})


def processes_of(job: int, node: str) -> list[int]:
    """The job's processes on one node (the ranks and what they started), not Slurm's own step daemon."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in env and f"SLURMD_NODENAME={node}".encode() in env \
                and comm != "slurmstepd":
            found.append(int(pid))
    return found


def test_two_nodes_of_two_ranks_train_as_one_node_of_four(two_nodes, data, reference, tmp_path):
    log, run = tmp_path / "job.out", tmp_path / "runs" / "two"
    job = submit(TWO_NODES, log, args(data, tmp_path / "runs", "two"))
    ref = reference()
    info = wait_for(lambda: finished(job), 600, "the 2-node job to finish", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "node[1-2]", (info, text)
    assert "on 2 node(s), 4 rank(s), rendezvous node1:" in text, text
    # numbered node by node: each node holds one tensor-parallel pair, data parallelism goes across
    assert "layout: 4 rank(s) on 2 node(s) (node1: ranks 0-1, node2: ranks 2-3); TP=2 PP=1 DP=2" in text, text
    close(losses(run), ref)


def test_a_layout_across_nodes_that_cannot_work_is_one_line(two_nodes, data, tmp_path):
    """Two nodes of one rank each: TP=2 would put a tensor-parallel pair on both; PP=4 needs 4 ranks."""
    one_each = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    cases = {  # extra overrides -> what the one line says
        "span": ([], "error: parallel.tensor_parallel=2 would span nodes: ranks 0-1 run on node1, node2"),
        "world": (["parallel.tensor_parallel=1", "parallel.pipeline_parallel=4"],
                  "error: parallel: world size 2 is not divisible by tensor_parallel × pipeline_parallel = 1 × 4"),
    }
    jobs = {name: submit(one_each, tmp_path / f"{name}.out", [*args(data, tmp_path / "runs", name), *extra])
            for name, (extra, _) in cases.items()}
    for name, (_, message) in cases.items():
        info = wait_for(lambda: finished(jobs[name]), 300, f"the {name} job to end", every=2)
        text = (tmp_path / f"{name}.out").read_text()
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, text)
        assert len(errors) == 1 and errors[0].startswith(message) and "Traceback" not in text, text
        assert not (tmp_path / "runs" / name / "checkpoints").exists()


def test_a_taken_rendezvous_port_is_one_line_and_the_job_ends(two_nodes, data, tmp_path):
    """Rank 0 cannot serve the rendezvous (another socket holds MASTER_PORT on its node): it says so in one line
    and exits 2; rank 1, which would wait for it until the collective timeout, is ended by srun --wait."""
    import socket
    one_each = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
    log = tmp_path / "job.out"
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = submit(one_each, log, [*args(data, tmp_path / "runs", "port"), "parallel.tensor_parallel=1"],
                     env={"MOR_MASTER_PORT": str(port), "MOR_RANK_EXIT_WAIT": "5"})
        # 5 s of srun --wait, then Slurm's KillWait (30 s) at most for rank 1 to go: well inside the 600 s timeout
        wait_for(lambda: gone(job), 300, "the job to end", every=1)
    info, text = job_info(job), log.read_text()
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert info["JobState"] == "FAILED", (info, text)
    assert errors == [f"error: rank 0 on node1: the rendezvous port MASTER_PORT={port} is already in use there; "
                      "choose a free one (slurm/launch.sh and pretrain.sweep take MOR_MASTER_PORT) and launch "
                      "again"], text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_node_ends_the_job_and_the_run_resumes_on_one_node(two_nodes, data, reference, tmp_path, how):
    """Every process of the second node dies (SIGKILL) or stops answering (SIGSTOP: a frozen node) after the
    step-2 checkpoint: the first node's ranks fail in their next collective, at once when the connections close,
    after parallel.collective_timeout_s when they just go quiet, and say so in one line each; Slurm ends the rest.
    The run resubmitted on one node (TP=2, DP=1) resumes from its newest checkpoint and logs every step's loss as
    the uninterrupted 4-rank run did."""
    log, run = tmp_path / "job.out", tmp_path / "runs" / "lost"
    timeout = TIMEOUT_S if how == "killed" else 15
    overrides = args(data, tmp_path / "runs", "lost", timeout=timeout)
    job = submit(TWO_NODES, log, overrides, env={"MOR_FAULT_STEP_SECONDS": "2", "MOR_RANK_EXIT_WAIT": "5"})
    wait_for(lambda: len(steps_logged(run)) >= EVERY + 1 or finished(job), 300, "step 3 of the 2-node job")
    victims = processes_of(job, "node2")
    assert len(victims) >= 2, (victims, log.read_text())   # its two ranks at least
    for pid in victims:
        os.kill(pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    # killed: the connections close and the survivors fail at once; stopped: they wait out the timeout, then
    # Slurm ends the stopped ranks MOR_RANK_EXIT_WAIT (5 s) later, sending SIGCONT and SIGTERM first (the cluster's
    # KillWait, 30 s, bounds how long they may take to go)
    wait_for(lambda: gone(job), timeout + (0 if how == "killed" else 5 + 30 + 30), "the job to end", every=1)
    info, text = job_info(job), log.read_text()
    assert info["JobState"] == "FAILED", (info, text)
    said = [ln for ln in text.splitlines() if ln.startswith("error: rank ")]
    assert said and all(" on node1: a collective failed" in ln for ln in said), text
    if how == "stopped":
        assert all(f"Timed out waiting {timeout * 1000}ms" in ln for ln in said), text
    assert "Traceback" not in text and "launch: ranks were lost" in text, text
    assert not any(Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
                   for pid in victims), "a stopped rank outlived its job"
    saved = (run / "checkpoints" / "latest").read_text().strip()
    log.write_text("")
    again = submit(CPU_ALLOC, log, overrides)
    info = wait_for(lambda: finished(again), 600, "the 1-node resubmission to finish", every=2)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", (info, text)
    assert "layout: 2 rank(s) on 1 node(s)" in text and "re-sharded for TP=2 PP=1 DP=1" in text, text
    assert f"resumed from {run / 'checkpoints' / saved}" in text, text
    close(losses(run), reference())
