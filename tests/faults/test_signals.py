"""Signals at every moment of start-up, in one process and in two (gloo ranks, started as torchrun starts them).

A warning (SIGUSR1) at any start-up phase, from the first line of ``main()`` (before any handler exists) to
``startup.done``, is kept: at the first step boundary every rank saves step 1 and exits 75, saying so in one line;
that checkpoint holds, tensor for tensor and bit for bit, what the uninterrupted run's step-1 checkpoint holds (so
a rerun continues as that run does: exact resume is tests/faults/test_checkpoints.py's), and for the earliest phase
a rerun is made and finishes with losses equal, bit for bit, to the uninterrupted run's. The ranks start as
slurm/launch.sh starts them, with USR1 and USR2 blocked. SIGTERM during start-up ends the process (there is nothing
to save yet), and so does a rank whose peer died while both were starting, when the launcher sends it SIGTERM."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.training.preempt import REQUEUE_EXIT_CODE, WARNINGS
from tests.distributed.harness import ROOT, _free_port, spawn_ranks
from tests.faults.runs import RUN, args, losses
from tests.pretrain.fixtures import make_shards

PHASES = ["startup.main", "startup.config", "startup.distributed", "startup.engine", "startup.resume",
          "startup.done"]
# Whatever the environment running the tests holds: no Slurm job times (pretrain/training/preempt.py's too-short rule)
# and no launcher's warning file.
NOT_IN_A_JOB = {"SLURM_JOB_START_TIME": "", "SLURM_JOB_END_TIME": "", "MOR_WARNING_FILE": ""}


def overrides(data: Path, tmp: Path, *extra: str) -> list[str]:
    return args(data, tmp / "runs", "run", "train.steps=3", "checkpoint.every=0", *extra)


@contextlib.contextmanager
def warnings_blocked():
    """Children inherit this mask through exec, as the ranks inherit `env --block-signal` in slurm/launch.sh."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, WARNINGS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def train(tmp: Path, data: Path, world: int, env: dict | None = None, tag: str = "run", *extra: str) -> list[int]:
    with warnings_blocked():
        return spawn_ranks(world, ["-m", "pretrain.train", RUN, *overrides(data, tmp, *extra)], tmp,
                           env={**NOT_IN_A_JOB, **(env or {})}, check=False, prefix=f"{tag}-")


def logs(tmp: Path, tag: str) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp.glob(f"{tag}-*.log")))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("signals_data") / "data")


@dataclass
class Straight:
    losses: dict[int, float]
    step1: Path          # its checkpoint of step 1


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run (saving every step), per world size, run once for the module."""
    done: dict[int, Straight] = {}

    def run(world: int) -> Straight:
        if world not in done:
            tmp = tmp_path_factory.mktemp(f"straight{world}")
            assert train(tmp, data, world, None, "run", "checkpoint.every=1") == [0] * world, logs(tmp, "run")
            done[world] = Straight(losses(tmp / "runs" / "run"), tmp / "runs" / "run" / "checkpoints" / "step-000001")
        return done[world]
    return run


def assert_same_state(got, want, where: str) -> None:
    """Equal values at every key and index; tensors bit for bit."""
    if torch.is_tensor(want):
        assert torch.is_tensor(got) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and np.array_equal(got, want), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(got), sorted(want))
        for k in want:
            assert_same_state(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def assert_same_checkpoint(got: Path, want: Path) -> None:
    """Every file of ``want`` is in ``got`` with the same contents — weights, optimizer moments, step, tokens, data
    position, RNG states — except the run config (out_dir and checkpoint.every differ by design)."""
    files = sorted(p.relative_to(want).as_posix() for p in want.rglob("*.pt"))
    assert files and files == sorted(p.relative_to(got).as_posix() for p in got.rglob("*.pt"))
    for name in files:
        a, b = (torch.load(d / name, weights_only=False, map_location="cpu") for d in (got, want))
        if name == "trainer.pt":
            a.pop("config"), b.pop("config")
        elif "rng" in b:   # the global Python and NumPy RNGs are not seeded by a run (nothing draws from them)
            for rng in ("python", "numpy"):
                a["rng"].pop(rng), b["rng"].pop(rng)
        assert_same_state(a, b, name)


@pytest.mark.parametrize("world", [1, 2], ids=["1proc", "2proc"])
@pytest.mark.parametrize("phase", PHASES)
def test_a_warning_at_any_startup_phase_is_kept_saved_and_resumed_exactly(tmp_path, data, straight, phase, world):
    # On two ranks only rank 1 gets it: rank 0 learns it at the step's all-reduce and saves the same step.
    env = {"MOR_FAULT_POINT": phase, "MOR_FAULT_POINT_SIGNAL": "USR1", "MOR_FAULT_POINT_RANK": str(world - 1)}
    codes = train(tmp_path, data, world, env, tag="warned")
    text = logs(tmp_path, "warned")
    assert codes == [REQUEUE_EXIT_CODE] * world, text
    said = [ln for ln in (tmp_path / "warned-0.log").read_text().splitlines() if ln.startswith("preempted")]
    assert len(said) == 1 and said[0].startswith("preempted: saved step 1;"), text
    assert "Traceback" not in text
    ckpt = tmp_path / "runs" / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-000001"
    assert_same_checkpoint(ckpt / "step-000001", straight(world).step1)
    if phase == PHASES[0]:   # and, end to end, the rerun
        assert train(tmp_path, data, world, tag="rerun") == [0] * world, logs(tmp_path, "rerun")
        assert losses(tmp_path / "runs" / "run") == straight(world).losses   # exact float equality, every step


@pytest.mark.parametrize("world", [1, 2], ids=["1proc", "2proc"])
@pytest.mark.parametrize("phase", PHASES)
def test_sigterm_during_startup_ends_the_process_and_a_rerun_is_unaffected(tmp_path, data, straight, phase, world):
    # Every rank, as a launcher that stops a job signals all of its ranks.
    codes = train(tmp_path, data, world, {"MOR_FAULT_POINT": phase, "MOR_FAULT_POINT_SIGNAL": "TERM"}, tag="term")
    assert codes == [-signal.SIGTERM] * world, logs(tmp_path, "term")
    assert not list((tmp_path / "runs").glob("run/checkpoints/step-*"))   # nothing trained, nothing saved
    if phase == PHASES[-1]:   # the most a start leaves behind (run folder, metrics file): a rerun starts cleanly
        assert train(tmp_path, data, world, tag="rerun") == [0] * world, logs(tmp_path, "rerun")
        assert losses(tmp_path / "runs" / "run") == straight(world).losses


def test_a_rank_whose_peer_died_during_startup_ends_on_sigterm(tmp_path, data):
    """Rank 0 is killed before the process group exists, so rank 1 waits for it at the rendezvous; the launcher
    (torchrun, srun) then sends rank 1 SIGTERM. Rank 1 must end by that signal, not wait for a SIGKILL.
    spawn_ranks waits for every rank; this test must signal one while the other has ended, hence Popen here."""
    port = str(_free_port())
    env = {**os.environ, **NOT_IN_A_JOB, "MOR_FAULT_POINT": "startup.config", "MOR_FAULT_POINT_SIGNAL": "KILL",
           "MOR_FAULT_POINT_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    procs = []
    with warnings_blocked():
        for rank in range(2):
            with open(tmp_path / f"peer-{rank}.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "pretrain.train", RUN, *overrides(data, tmp_path)],
                                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    try:
        assert procs[0].wait(timeout=300) == -signal.SIGKILL, logs(tmp_path, "peer")
        procs[1].send_signal(signal.SIGTERM)
        try:
            code = procs[1].wait(timeout=120)   # a bound for a broken build, not a measure: see the assertion
        except subprocess.TimeoutExpired:
            procs[1].kill()
            code = f"still running {120} s after SIGTERM (killed)"
        assert code == -signal.SIGTERM, (code, logs(tmp_path, "peer"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
