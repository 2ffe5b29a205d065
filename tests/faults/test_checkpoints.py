"""Damaged checkpoints: every file of the newest one corrupted in place (same size), truncated or emptied, a
garbage ``latest``, a deleted newest folder or record, a file that shows up late, a kill at every moment of a save,
all checkpoints bad; and checkpoints that are not damaged but differ from the run: a file that passes its check yet
does not load, a precision change (two ranks: tests/faults/test_resume_batch.py).

Each recoverable case resumes from the newest good checkpoint, says in one line which file failed and why, sets
the bad folder aside (renamed, with its files untouched) and finishes with losses equal, step for step and bit for
bit, to an uninterrupted run's. Only a failed integrity check sets a checkpoint aside. Runs are in-process
``pretrain.train`` calls (the real entry point), except where a process must die."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.distributed.harness import spawn_ranks
from tests.faults.runs import RUN, STEPS, args, losses, run_main
from tests.pretrain.fixtures import make_shards

NEWEST = "step-000006"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("ckpt_data") / "data")


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run: losses of steps 1..STEPS."""
    out = tmp_path_factory.mktemp("straight")
    code, _, _ = run_main(args(data, out, "straight"))
    assert code == 0
    return losses(out / "straight")


@pytest.fixture(scope="module")
def base(data, tmp_path_factory) -> Path:
    """A run stopped (preempted) at step 6 of STEPS: checkpoints 2, 4 and 6, metrics of steps 1..6."""
    out = tmp_path_factory.mktemp("base")
    os.environ["MOR_FAULT_SIGNAL_AT_STEP"] = "5"
    try:
        code, _, _ = run_main(args(data, out, "run"))
    finally:
        del os.environ["MOR_FAULT_SIGNAL_AT_STEP"]
    assert code == 75
    ckpts = out / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-000002", "step-000004", NEWEST]
    return out / "run"


def copy_run(base: Path, tmp: Path) -> Path:
    shutil.copytree(base, tmp / "run")
    return tmp / "run"


def corrupt_in_place(path: Path) -> None:
    """4 KiB of other bytes in the middle of the file; its size does not change."""
    data = bytearray(path.read_bytes())
    mid, n = len(data) // 2, min(4096, len(data))
    start = max(0, min(mid, len(data) - n))
    data[start:start + n] = bytes((b ^ 0x5A) for b in data[start:start + n])
    path.write_bytes(bytes(data))


def resume(run: Path, data: Path, *extra: str) -> tuple[int, str]:
    code, out, err = run_main(args(data, run.parent, "run", *extra))
    return code, out + err


def assert_fell_back(run: Path, text: str, straight: dict, bad_file: str, reason: str) -> None:
    lines = [ln for ln in text.splitlines() if "set aside" in ln]
    assert len(lines) == 1, text
    assert f"{NEWEST}/{bad_file}" in lines[0] and reason in lines[0] and "falling back to step-000004" in lines[0]
    assert "resumed from" in text and "step-000004 at step 4" in text
    ckpts = run / "checkpoints"
    assert (ckpts / f"{NEWEST}.rejected" / bad_file).exists()      # set aside with the bad file in it, not deleted
    assert (ckpts / "step-000004").is_dir()                          # the checkpoint resumed from is still there
    assert (ckpts / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert losses(run) == straight                                   # every step once, bit for bit


@pytest.mark.parametrize("bad_file,reason", [
    ("engine/mp_rank_00_model_states.pt", "sha256 differs"),
    ("trainer.pt", "sha256 differs"),
    ("trainer-rank-0.pt", "sha256 differs"),
    ("checkpoint.json", "unreadable"),
])
def test_same_size_corruption_of_any_file_falls_back_to_the_previous_checkpoint(base, data, straight, tmp_path,
                                                                              bad_file, reason):
    run = copy_run(base, tmp_path)
    corrupt_in_place(run / "checkpoints" / NEWEST / bad_file)
    code, text = resume(run, data)
    assert code == 0, text
    assert_fell_back(run, text, straight, bad_file, reason)


@pytest.mark.parametrize("bad_file,how,reason", [
    ("engine/mp_rank_00_model_states.pt", "truncate", "bytes, the record says"),
    ("trainer.pt", "empty", "0 bytes, the record says"),
    ("trainer-rank-0.pt", "empty", "0 bytes, the record says"),
    ("trainer-rank-0.pt", "delete", "missing"),
])
def test_truncated_empty_or_missing_files_fall_back(base, data, straight, tmp_path, bad_file, how, reason):
    run = copy_run(base, tmp_path)
    path = run / "checkpoints" / NEWEST / bad_file
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2] if how == "truncate" else b"")
    code, text = resume(run, data)
    assert code == 0, text
    if how == "delete":   # nothing left to set aside but the folder: the file name is the reason
        assert (run / "checkpoints" / f"{NEWEST}.rejected").is_dir() and f"{bad_file}: missing" in text
        assert losses(run) == straight
    else:
        assert_fell_back(run, text, straight, bad_file, reason)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage\x80", b"../../etc\n", b""])
def test_a_garbage_latest_pointer_is_passed_over(base, data, straight, tmp_path, content):
    run = copy_run(base, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(content)
    code, text = resume(run, data)
    assert code == 0, text
    assert f"{NEWEST} at step 6" in text and "set aside" not in text
    if content:
        assert sum("latest" in ln and "passing over it" in ln for ln in text.splitlines()) == 1, text
    assert losses(run) == straight


def test_a_deleted_newest_folder_resumes_from_the_one_before(base, data, straight, tmp_path):
    run = copy_run(base, tmp_path)
    shutil.rmtree(run / "checkpoints" / NEWEST)
    code, text = resume(run, data)
    assert code == 0, text
    assert sum(f"names {NEWEST}, which is missing" in ln for ln in text.splitlines()) == 1, text
    assert "step-000004 at step 4" in text and losses(run) == straight


def _as_saved_before_records(folder: Path) -> None:
    """What a checkpoint saved before records existed holds: no record, and a trainer.pt without the keys that
    came in with records (pretrain/training/trainer.py state())."""
    (folder / "checkpoint.json").unlink()
    state = torch.load(folder / "trainer.pt", weights_only=False)
    for key in ("skipped", "consecutive_skips", "guard_step", "world_size"):
        del state[key]
    torch.save(state, folder / "trainer.pt")


def test_a_checkpoint_saved_before_records_existed_is_checked_by_its_zip_crcs(base, data, straight, tmp_path):
    """Checkpoints saved before records existed still load, with one line saying how little was checked; a corrupt
    one is still caught."""
    good = copy_run(base, tmp_path / "good")
    for folder in (good / "checkpoints").glob("step-*"):
        _as_saved_before_records(folder)
    code, text = resume(good, data)
    assert code == 0 and f"{NEWEST} at step 6" in text, text
    assert sum("checked only by the CRC-32" in ln for ln in text.splitlines()) == 1, text
    assert losses(good) == straight
    bad = copy_run(base, tmp_path / "bad")
    for folder in (bad / "checkpoints").glob("step-*"):
        _as_saved_before_records(folder)
    corrupt_in_place(bad / "checkpoints" / NEWEST / "engine" / "mp_rank_00_model_states.pt")
    code, text = resume(bad, data)
    assert code == 0, text
    assert_fell_back(bad, text, straight, "engine/mp_rank_00_model_states.pt", "CRC-32")


def test_a_checkpoint_whose_record_was_deleted_is_set_aside(base, data, straight, tmp_path):
    """This code writes a record into every checkpoint: a folder whose trainer.pt is of this version but whose record
    is gone is damaged, reported and set aside like any other, and the run falls back."""
    run = copy_run(base, tmp_path)
    (run / "checkpoints" / NEWEST / "checkpoint.json").unlink()
    code, text = resume(run, data)
    assert code == 0, text
    lines = [ln for ln in text.splitlines() if "set aside" in ln]
    assert len(lines) == 1 and f"{NEWEST}/checkpoint.json: missing" in lines[0], text
    assert "falling back to step-000004" in lines[0] and (run / "checkpoints" / f"{NEWEST}.rejected").is_dir()
    assert "step-000004 at step 4" in text and losses(run) == straight


def test_a_file_missing_at_the_first_look_is_looked_for_again(base, tmp_path, monkeypatch):
    """A shared file system may show another node's file late: a missing file is looked for again after a pause, and
    a checkpoint whose file is there at the second look passes; one still missing fails."""
    from pretrain.checkpoint import verify as ckpt
    folder = copy_run(base, tmp_path) / "checkpoints" / NEWEST
    away = tmp_path / "away.pt"
    (folder / "trainer-rank-0.pt").rename(away)
    monkeypatch.setattr(ckpt, "SECOND_LOOK_S", 3.0)
    back = threading.Timer(1.0, lambda: away.rename(folder / "trainer-rank-0.pt"))
    started = time.monotonic()
    back.start()
    try:
        assert ckpt.verify(folder) is None
    finally:
        back.join()
    assert time.monotonic() - started >= 3.0       # it waited for the second look: the first one found nothing
    monkeypatch.setattr(ckpt, "SECOND_LOOK_S", 0.1)
    (folder / "trainer-rank-0.pt").unlink()
    assert ckpt.verify(folder) == "trainer-rank-0.pt: missing (also on a second look after 0.1 s)"


def _rerecord(folder: Path, name: str) -> None:
    """The record made to vouch for ``name`` as it now is (size and sha256): the file passes the integrity check."""
    record = json.loads((folder / "checkpoint.json").read_text())
    blob = (folder / name).read_bytes()
    record["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (folder / "checkpoint.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _snapshot(run: Path) -> dict:
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad_file,content", [("trainer-rank-0.pt", b"\x00not a torch file\n"),
                                              ("engine/mp_rank_00_model_states.pt", None)])
def test_a_checkpoint_that_passes_its_check_but_does_not_load_is_never_set_aside(base, data, tmp_path, bad_file,
                                                                                content):
    """A file that matches its record yet does not load (as another program version, or a config difference the
    check cannot see, would give) is a mismatch with this run, not damage: one line naming the file and the
    exception, exit 2, and nothing renamed or changed, so the next resume finds the same checkpoints."""
    run = copy_run(base, tmp_path)
    folder = run / "checkpoints" / NEWEST
    if content is None:
        torch.save({"not": "DeepSpeed's module state"}, folder / bad_file)
    else:
        (folder / bad_file).write_bytes(content)
    _rerecord(folder, bad_file)
    before = _snapshot(run)
    code, out, err = run_main(args(data, run.parent, "run"))
    assert code == 2 and "Traceback" not in out + err, out + err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    where = bad_file.split("/")[0] + ("/" if "/" in bad_file else "")
    assert len(errors) == 1 and "passed its integrity check" in errors[0] and where in errors[0], err
    assert "Error" in errors[0] and "set aside" not in out + err
    assert _snapshot(run) == before


def test_a_precision_change_on_resume_carries_the_fp32_state_over(base, data, straight, tmp_path):
    """fp32 → bf16 → fp32 across two resumes: the fp32 master weights, Adam moments and step go through
    pretrain/checkpoint/reshard.py into the other engine. DeepSpeed's own save of the converted bf16 engine holds
    exactly the fp32 checkpoint's state, and the losses follow the fp32 run's within bf16 rounding (measured: 2e-4
    relative; with the moments lost, 9e-3 by the second step)."""
    from conf import load_config
    from pretrain.config import RunConfig
    from pretrain.checkpoint.consolidate import read_run
    from pretrain.checkpoint.reshard import read_training_state
    from pretrain.training.trainer import Trainer
    ckpts = copy_run(base, tmp_path) / "checkpoints"
    said: list[str] = []
    cfg = load_config(RUN, args(data, tmp_path, "prec", f"checkpoint.resume={ckpts / 'step-000004'}",
                                "train.precision=bf16"), schema=RunConfig)
    os.environ["MOR_FAULT_SIGNAL_AT_STEP"] = "5"
    try:
        trainer = Trainer(cfg, log=said.append)
        try:
            trainer.save()                                   # DeepSpeed's bf16 files, straight after the conversion
            assert trainer.fit() == 75                       # steps 5 and 6 in bf16, saved at 6
        finally:
            trainer.close()
    finally:
        del os.environ["MOR_FAULT_SIGNAL_AT_STEP"]
    assert sum("fp32; converted for TP=1 PP=1 DP=1 ZeRO-0, bf16" in ln for ln in said) == 1, said
    prec = tmp_path / "prec" / "checkpoints"
    want = read_training_state(ckpts / "step-000004", read_run(ckpts / "step-000004")[0])
    got = read_training_state(prec / "step-000004", read_run(prec / "step-000004")[0])
    assert got.step == want.step == 4 and sorted(got.params) == sorted(want.params)
    for name, kinds in want.params.items():
        for key, value in kinds.items():
            assert torch.equal(got.params[name][key], value), (name, key)
    code, out, err = run_main(args(data, tmp_path, "prec", "train.precision=fp32"))    # bf16 step 6 → fp32
    assert code == 0, out + err
    assert "bf16; converted for TP=1 PP=1 DP=1 ZeRO-0, fp32" in out and "set aside" not in out + err
    got = losses(tmp_path / "prec")
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(straight[step], rel=2e-3, abs=0), (step, got, straight)
    assert not list(ckpts.parent.rglob("*.rejected")) and not list(prec.glob("*.rejected"))


def test_when_no_checkpoint_passes_nothing_is_changed_and_the_run_stops_with_one_line(base, data, tmp_path):
    run = copy_run(base, tmp_path)
    for folder in (run / "checkpoints").glob("step-*"):
        corrupt_in_place(folder / "trainer.pt")
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    metrics = (run / "metrics.jsonl").read_bytes()
    code, out, err = run_main(args(data, run.parent, "run"))
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{NEWEST}/trainer.pt" in errors[0] and "nothing was changed" in errors[0], err
    assert "Traceback" not in out + err
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before
    assert (run / "metrics.jsonl").read_bytes() == metrics        # a restart does not begin the run anew


def test_an_explicit_checkpoint_that_fails_is_an_error_not_a_fallback(base, data, tmp_path):
    run = copy_run(base, tmp_path)
    target = run / "checkpoints" / NEWEST
    corrupt_in_place(target / "trainer-rank-0.pt")
    code, _, err = run_main(args(data, run.parent, "run", f"checkpoint.resume={target}"))
    assert code == 2 and target.is_dir()
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "trainer-rank-0.pt: sha256 differs" in errors[0], err


def train(world: int, argv: list[str], tmp: Path, **kw) -> list[int]:
    return spawn_ranks(world, ["-m", "pretrain.train", "conf/run/tiny_cpu.yaml", *argv], tmp, **kw)


@pytest.fixture(scope="module")
def straight_in_a_process(data, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run as a process of its own (bit-exact comparisons are between processes alike)."""
    out = tmp_path_factory.mktemp("straight_process")
    train(1, args(data, out, "straight"), out)
    return losses(out / "straight")


@pytest.mark.parametrize("point,resumes_at", [("save.staged", 4), ("save.recorded", 4), ("save.renamed", 6),
                                              ("save.pointed", 6)])
def test_a_kill_at_any_moment_of_a_save_leaves_a_run_that_resumes_exactly(data, straight_in_a_process, tmp_path,
                                                                          point, resumes_at):
    """SIGKILL inside the third save (step 6): before its record exists the folder never counts; after, it does."""
    codes = train(1, args(data, tmp_path, "run"), tmp_path, check=False, prefix="killed",
                  env={"MOR_FAULT_POINT": point, "MOR_FAULT_POINT_COUNT": "3"})
    assert codes == [-signal.SIGKILL]
    train(1, args(data, tmp_path, "run"), tmp_path, prefix="resumed")
    text = (tmp_path / "resumed0.log").read_text()
    assert f"step-{resumes_at:06d} at step {resumes_at}" in text, text
    run = tmp_path / "run"
    assert losses(run) == straight_in_a_process
    assert not list((run / "checkpoints").glob(".staging-*"))       # the next save cleared the leftovers


def test_every_file_of_a_saved_checkpoint_is_in_its_record(base):
    for folder in (base / "checkpoints").glob("step-*"):
        record = json.loads((folder / "checkpoint.json").read_text())
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p.name != "checkpoint.json")
        assert sorted(record["files"]) == files and record["step"] == int(folder.name.split("-")[1])
        assert all(set(v) == {"bytes", "sha256"} for v in record["files"].values())


@pytest.mark.parametrize("layout", [["parallel.pipeline_parallel=2", "parallel.zero_stage=1"],
                                    ["parallel.pipeline_parallel=2", "parallel.tensor_parallel=2",
                                     "parallel.zero_stage=0"]], ids=["pp2-zero1", "tp2-pp2"])
def test_a_pipeline_run_resumes_exactly(data, tmp_path, layout):
    """Each stage saves its own module and optimizer state (stage folders: DeepSpeed names files by TP rank only, so
    the stages would otherwise overwrite each other), and each stage loads its own back."""
    world = 2 if "parallel.tensor_parallel=2" not in layout else 4
    train(world, args(data, tmp_path, "straight", *layout), tmp_path, prefix="straight")
    run_args = args(data, tmp_path, "run", *layout)
    codes = train(world, run_args, tmp_path, env={"MOR_FAULT_SIGNAL_AT_STEP": "5"}, check=False, prefix="first")
    assert codes == [75] * world
    newest = tmp_path / "run" / "checkpoints" / NEWEST
    assert sorted(p.name for p in newest.iterdir() if p.is_dir()) == ["stage-0", "stage-1"]
    train(world, run_args, tmp_path, prefix="again")
    assert f"resumed from {newest}" in (tmp_path / "again0.log").read_text()
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
