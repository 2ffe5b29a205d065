"""Nothing is lost: a killed or interrupted run leaves only complete shards, and rerunning it gives exactly the
shards of an uninterrupted run; complete outputs are never overwritten without --overwrite."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.shards import Manifest
from tests.data_prep.conftest import ROOT, SCRIPT, run_cli, shard_bytes

ARGS = ["--seq-len", 64, "--val-fraction", 0.25, "--samples-per-shard", 8]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """An uninterrupted run's shards (two inputs, so a resume can start inside the second)."""
    from tests.data_prep.conftest import corpus_records, write_jsonl
    folder = tmp_path_factory.mktemp("resume_in")
    recs = corpus_records(6, start=60)
    write_jsonl(folder / "a.jsonl.gz", recs[:3])
    write_jsonl(folder / "b.jsonl", recs[3:])
    out = tmp_path_factory.mktemp("resume_ref") / "out"
    res = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, "--workers", 2)
    assert res.returncode == 0, res.stderr
    shards = shard_bytes(out)
    assert len(shards) > 100
    return folder, shards, Manifest.load(out), (out / "manifest.json").read_bytes()


def _no_temp_files(out: Path) -> None:
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("point", ["shard:40", "prejournal:40", "shard:150"])
def test_kill_then_resume_gives_identical_shards(tmp_path, tiny_model, reference, point):
    folder, ref, ref_manifest, ref_bytes = reference
    out = tmp_path / "out"
    killed = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, "--workers", 2,
                     env={"DATA_PREP_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL
    assert (out / "progress.journal").exists() and not Manifest.load(out).complete
    partial = shard_bytes(out)
    assert 40 <= len(partial) < len(ref) and all(ref[k] == v for k, v in partial.items())
    res = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, "--workers", 1)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr and "(resumed)" in res.stdout
    assert shard_bytes(out) == ref
    m = Manifest.load(out)
    assert m.complete and m.splits == ref_manifest.splits and m.counts == ref_manifest.counts
    assert (out / "manifest.json").read_bytes() == ref_bytes
    assert not (out / "progress.journal").exists()
    _no_temp_files(out)


def test_resume_starts_in_a_later_input(tmp_path, tiny_model, reference):
    """With small batches, journal lines carry the other split's state while it holds no pending samples, so a
    resume need not read from the first input again."""
    folder, ref, _, _ = reference
    code = ("import sys; import data_prep.stream as s, data_prep.units as u; s.BATCH_CHARS = u.UNIT_BYTES = 20000; "
            "from data_prep.tokenize import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {k: v for k, v in os.environ.items() if k != "DATA_PREP_KILL_AT"}

    def run(out: Path, **extra) -> subprocess.CompletedProcess:
        args = [str(folder), "--out", str(out), "--tokenizer", tiny_model, *map(str, ARGS), "--no-progress"]
        return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                              env=env | extra)

    # the manifest records unit_bytes, which this test changes: compare it with an uninterrupted run's alike
    assert run(tmp_path / "whole").returncode == 0
    out = tmp_path / "out"
    assert run(out, DATA_PREP_KILL_AT="shard:150").returncode == -signal.SIGKILL
    res = run(out)
    assert res.returncode == 0, res.stderr
    assert "reading again from input 2 of 2" in res.stderr
    assert shard_bytes(out) == ref
    assert (out / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()


def test_external_sigkill_then_resume(tmp_path, tiny_model, reference):
    folder, ref, _, ref_bytes = reference
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(folder), "--out", str(out), "--tokenizer", tiny_model,
                             *map(str, ARGS), "--workers", "2", "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={k: v for k, v in os.environ.items() if k != "DATA_PREP_KILL_AT"})
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 20 and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert len(list(out.glob("*.tar"))) >= 20
    res = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, "--workers", 2)
    assert res.returncode == 0, res.stderr
    assert shard_bytes(out) == ref
    assert (out / "manifest.json").read_bytes() == ref_bytes
    _no_temp_files(out)


@contextlib.contextmanager
def ctrl_c_not_ignored():
    """Processes started here find SIGINT as a terminal's Ctrl-C does. A shell's background job (as CI may run the
    tests) inherits it ignored, and exec keeps an ignored signal, so the run would go on to the end; a handler is
    reset to the default by exec instead."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def test_ctrl_c_then_resume(tmp_path, tiny_model, reference):
    """SIGINT at the 10th shard (the writer's test hook sends it, so a busy machine cannot let the run finish
    first)."""
    folder, ref, _, ref_bytes = reference
    out = tmp_path / "out"
    with ctrl_c_not_ignored():
        proc = subprocess.Popen([sys.executable, str(SCRIPT), str(folder), "--out", str(out), "--tokenizer",
                                 tiny_model, *map(str, ARGS), "--workers", "2", "--no-progress"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "DATA_PREP_KILL_AT": "shard:10:INT"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "rerun the same command to resume" in err, err[-2000:]
    assert "Traceback" not in err
    assert not Manifest.load(out).complete
    res = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, "--workers", 2)
    assert res.returncode == 0, res.stderr
    assert shard_bytes(out) == ref
    assert (out / "manifest.json").read_bytes() == ref_bytes


def test_damaged_shard_is_made_again(tmp_path, tiny_model, reference):
    folder, ref, _, ref_bytes = reference
    out = tmp_path / "out"
    run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, env={"DATA_PREP_KILL_AT": "shard:60"})
    victim = sorted(out.glob("train-*.tar"))[5]
    victim.write_bytes(victim.read_bytes()[:1000])           # truncated
    res = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS)
    assert res.returncode == 0, res.stderr
    assert f"{victim.name}: missing or does not match" in res.stderr
    assert shard_bytes(out) == ref
    assert (out / "manifest.json").read_bytes() == ref_bytes


def test_resume_with_other_settings_is_refused(tmp_path, tiny_model, reference):
    folder, _, _, _ = reference
    out = tmp_path / "out"
    run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, env={"DATA_PREP_KILL_AT": "shard:5"})
    res = run_cli(folder, "--out", out, "--tokenizer", tiny_model, "--seq-len", 32, "--val-fraction", 0.25,
                  "--samples-per-shard", 8)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "interrupted run with other settings" in res.stderr
    assert "seq_len: 64 there, 32 now" in res.stderr


def test_complete_output_is_not_overwritten(tmp_path, tiny_model, reference):
    folder, ref, _, _ = reference
    out = tmp_path / "out"
    assert run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS).returncode == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    same = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS)
    assert same.returncode == 0 and "already complete" in same.stderr
    other = run_cli(folder, "--out", out, "--tokenizer", tiny_model, "--seq-len", 32)
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "complete dataset made with other settings" in other.stderr and "--overwrite" in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    redo = run_cli(folder, "--out", out, "--tokenizer", tiny_model, "--seq-len", 32, "--overwrite")
    assert redo.returncode == 0, redo.stderr
    assert Manifest.load(out).seq_len == 32 and shard_bytes(out) != ref


def test_output_made_with_another_tokenizer(tmp_path, tiny_model, reference):
    from data_prep import tokenizer as T
    from tests.data_prep.conftest import corpus_records
    folder, _, _, _ = reference
    other = tmp_path / "other.model"
    T.train([r["text"] for r in corpus_records(4)], str(other), vocab_size=400, threads=1, log=lambda m: None)
    out = tmp_path / "out"
    assert run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS).returncode == 0
    for env in ({}, {"DATA_PREP_KILL_AT": "shard:3"}):
        if env:                                            # an interrupted run, too
            run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS, "--overwrite", env=env)
        res = run_cli(folder, "--out", out, "--tokenizer", other, *ARGS)
        assert res.returncode == 2 and res.stderr.count("\n") == 1
        old_sha = json.load(open(tiny_model + ".json"))["sha256"]
        assert old_sha in res.stderr and T.load(str(other))[1].sha256 in res.stderr


def test_second_writer_on_the_same_folder_is_refused(tmp_path, tiny_model, reference):
    import fcntl
    folder, _, _, _ = reference
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)          # as a running tokenize.py holds it
        res = run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "another tokenize.py is writing" in res.stderr
    assert run_cli(folder, "--out", out, "--tokenizer", tiny_model, *ARGS).returncode == 0
