"""A disk that fills during a save, on a real small file system (a tmpfs; mounting needs root, as CI runs): one
line naming the folder, what the checkpoint needs and what is free, exit 74 on every rank, the staging folder
removed, the earlier checkpoint intact, no traceback and no flood (wandb offline, writing to the same disk).

Two ranks under ZeRO-0, where only rank 0 writes inside DeepSpeed's save: rank 0 stops itself at the start of the
second save (MOR_FAULT_POINT=save.begin, SIGSTOP), the test fills the disk, and rank 0 goes on into a write that
fails while rank 1 waits in DeepSpeed's closing barrier. Then a restart on a disk with less room than a checkpoint
takes resumes, trains, and refuses the save before writing anything."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint.verify import verify
from pretrain.training.runlock import LOCK
from pretrain.checkpoint.save import DISK_FULL_EXIT_CODE
from tests.distributed.harness import ROOT, _free_port
from tests.faults.runs import RUN, args, losses
from tests.faults.test_launcher_death import wait_until
from tests.faults.test_signals import NOT_IN_A_JOB
from tests.pretrain.fixtures import make_shards


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                         text=True, timeout=60, check=False)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60, check=False)


def start(tmp: Path, data: Path, out: Path, tag: str, env: dict) -> list[subprocess.Popen]:
    """Two ranks as torchrun starts them, wandb offline."""
    port, procs = str(_free_port()), []
    for rank in range(2):
        full = {**os.environ, **NOT_IN_A_JOB, **env, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
        with open(tmp / f"{tag}-{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "pretrain.train", RUN,
                                           *args(data, out, "run", "train.steps=6", "logging.wandb=offline")],
                                          cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[int]:
    try:
        return [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def fill(disk: Path, leave: int) -> None:
    """Make ``disk`` have ``leave`` bytes free, by growing or shrinking one filler file."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    have = filler.stat().st_size if filler.exists() else 0
    size = max(have + st.f_bavail * st.f_frsize - leave, 0)
    with open(filler, "ab") as f:   # written, not truncated up: tmpfs allocates what is written
        if size < have:
            f.truncate(size)
        while f.tell() < size:
            f.write(b"\0" * min(1 << 20, size - f.tell()))


def check_output(tmp: Path, tag: str) -> str:
    """Rank 0's one error line; nothing like a traceback or a flood on either rank."""
    texts = [(tmp / f"{tag}-{rank}.log").read_text() for rank in range(2)]
    for text in texts:
        assert "Traceback" not in text and len(text.splitlines()) < 60, text[-3000:]
        assert len([ln for ln in text.splitlines() if ln.startswith("wandb:")]) <= 1, text[-3000:]
    errors = [ln for ln in texts[0].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and not any(ln.startswith("error:") for ln in texts[1].splitlines()), texts
    return errors[0]


def test_a_disk_that_fills_during_a_save_stops_every_rank_in_one_line(tmp_path, small_disk):
    data = make_shards(tmp_path / "data")
    run = small_disk / "run"
    ckpts = run / "checkpoints"
    procs = start(tmp_path, data, small_disk, "fill", {"MOR_FAULT_POINT": "save.begin", "MOR_FAULT_POINT_RANK": "0",
                                                       "MOR_FAULT_POINT_SIGNAL": "STOP", "MOR_FAULT_POINT_COUNT": "2"})
    try:
        wait_until(lambda: stopped(procs[0].pid) or procs[0].poll() is not None, 600, "rank 0 at its second save")
        assert procs[0].poll() is None, (tmp_path / "fill-0.log").read_text()[-3000:]
        fill(small_disk, leave=64 << 10)
        procs[0].send_signal(signal.SIGCONT)
    finally:
        codes = finish(procs)
    assert codes == [DISK_FULL_EXIT_CODE] * 2, [(tmp_path / f"fill-{r}.log").read_text()[-3000:] for r in range(2)]
    line = check_output(tmp_path, "fill")
    assert line.startswith(f"error: no space left on the device of {ckpts} for checkpoint step-000004: it needs "
                           "about 2.") and "newest: step-000002" in line, line
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002"]   # no staging folder left
    assert (ckpts / "latest").read_text().strip() == "step-000002" and verify(ckpts / "step-000002") is None
    assert not (run / LOCK).exists()

    # A restart with less room than a checkpoint takes: it resumes, trains, and stops before writing anything.
    fill(small_disk, leave=1000 << 10)
    codes = finish(start(tmp_path, data, small_disk, "again", {}))
    assert codes == [DISK_FULL_EXIT_CODE] * 2, [(tmp_path / f"again-{r}.log").read_text()[-3000:] for r in range(2)]
    line = check_output(tmp_path, "again")
    assert "resumed from" in (tmp_path / "again-0.log").read_text()
    assert "it needs about 2." in line and "(as the newest one), " in line and " KiB is free" in line, line
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002"]
    assert sorted(losses(run)) == [1, 2, 3, 4]
