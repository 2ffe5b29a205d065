"""A run of several corpora killed in its second corpus: the first folder stays complete and is kept, and the
command that the loader prints for the unfinished folder (the same run, ending with that corpus) finishes it
exactly as an uninterrupted run would have; another --dedup on the unfinished folder is refused."""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys

from data_prep.shards import Manifest
from tests.data_prep.conftest import ROOT, run_cli, shard_bytes
from tests.data_prep_mix.conftest import texts, write_lines

ARGS = ["--seq-len", 32, "--val-fraction", 0.2, "--samples-per-shard", 4, "--dedup", "exact", "--workers", 2]


def test_killed_in_the_second_corpus_then_finished(tmp_path, mix_model, cli):
    small, big = texts(2, start=30, chars=300), texts(6, start=50, chars=1500)
    write_lines(tmp_path / "raw" / "small.jsonl", small)
    write_lines(tmp_path / "raw" / "big.jsonl", big[:3] + [small[0]] + big[3:])     # one duplicate across corpora
    corpora = ["--corpus", f"small={tmp_path / 'raw' / 'small.jsonl'}",
               "--corpus", f"big={tmp_path / 'raw' / 'big.jsonl'}"]
    ref = run_cli(*corpora, "--tokenizer", mix_model, "--out", tmp_path / "ref", *ARGS)
    assert ref.returncode == 0, ref.stderr
    n_small = len(shard_bytes(tmp_path / "ref" / "small"))
    n_big = len(shard_bytes(tmp_path / "ref" / "big"))
    assert n_big > n_small + 10 and Manifest.load(tmp_path / "ref" / "big").counts["duplicates_dropped_across"] == 1

    out = tmp_path / "out"        # the kill counts shards per corpus: past the small one's, inside the big one's
    killed = run_cli(*corpora, "--tokenizer", mix_model, "--out", out, *ARGS,
                     env={"DATA_PREP_KILL_AT": f"shard:{n_small + 5}"})
    assert killed.returncode == -signal.SIGKILL
    assert Manifest.load(out / "small").complete and not Manifest.load(out / "big").complete
    small_manifest = (out / "small" / "manifest.json").read_bytes()

    rc, _, err = cli(*corpora, "--tokenizer", mix_model, "--out", out, *ARGS[:-4], "--workers", 1)   # no --dedup
    assert rc == 2 and err.count("\n") == 1 and "other settings" in err and "dedup" in err, err

    from pretrain.data.loader import load_manifest
    try:
        load_manifest(out / "big")
        raise AssertionError("an unfinished data set was accepted")
    except ValueError as e:
        command = str(e).split("finish it with: ")[1]
    assert command.startswith("python data_prep/tokenize.py --corpus small=") and "--dedup exact" in command
    words = shlex.split(command)
    done = subprocess.run([sys.executable, *words[1:], "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "small: already complete" in done.stdout and "(resumed)" in done.stdout
    assert (out / "small" / "manifest.json").read_bytes() == small_manifest
    for name in ("small", "big"):
        assert shard_bytes(out / name) == shard_bytes(tmp_path / "ref" / name)
        assert (out / name / "manifest.json").read_bytes() == (tmp_path / "ref" / name / "manifest.json").read_bytes()
        assert not (out / name / "progress.journal").exists()
