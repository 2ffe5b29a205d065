"""An unfinished data set: every consumer (pretrain.data.loader.load_manifest, TokenLoader) stops with one line naming the
folder and the command that finishes it; that command, pasted into a shell, finishes it. A split without samples
is one line too."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.finish import finish_command
from data_prep.shards import Manifest
from pretrain.data.loader import TokenLoader, load_manifest
from tests.data_prep.conftest import ROOT, corpus_records, run_cli, shard_bytes, write_jsonl

ARGS = ["--seq-len", 64, "--val-fraction", 0.25, "--samples-per-shard", 8]


def _unfinished_line(folder: Path) -> str:
    with pytest.raises(ValueError) as e:
        load_manifest(folder)
    line = str(e.value)
    assert "\n" not in line
    return line


def test_the_printed_command_finishes_the_data_set(tmp_path, tiny_model, monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    recs = corpus_records(4, start=60)
    write_jsonl(inputs / "a.jsonl.gz", recs[:2])
    write_jsonl(inputs / "b.jsonl", recs[2:])
    ref = tmp_path / "ref"
    assert run_cli(inputs, "--out", ref, "--tokenizer", tiny_model, *ARGS).returncode == 0
    out = tmp_path / "out"
    killed = run_cli(inputs, "--out", out, "--tokenizer", tiny_model, *ARGS, env={"DATA_PREP_KILL_AT": "shard:10"})
    assert killed.returncode < 0

    monkeypatch.chdir(ROOT)                                  # where the README's commands run
    line = _unfinished_line(out)
    assert line.startswith(f"{out}: the tokenization is unfinished (")
    assert "shard(s) so far); finish it with: python data_prep/tokenize.py " in line
    command = line.split("finish it with: ", 1)[1]
    assert command == (f"python data_prep/tokenize.py {inputs} --tokenizer {tiny_model} --out {out} "
                       "--seq-len 64 --val-fraction 0.25 --samples-per-shard 8")   # the folder, not its 2 files
    with pytest.raises(ValueError) as e:                     # every consumer says the same
        TokenLoader(out, micro_batch_size=2)
    assert str(e.value) == line

    env = {k: v for k, v in os.environ.items() if k != "DATA_PREP_KILL_AT"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # `python` is this one
    res = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr and "(resumed)" in res.stdout
    assert load_manifest(out).complete
    assert shard_bytes(out) == shard_bytes(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()

    monkeypatch.chdir(tmp_path)                              # elsewhere the script is named by its full path
    assert finish_command(out, Manifest.load(ref)).startswith(f"python {ROOT / 'data_prep' / 'tokenize.py'} ")


def _manifest(inputs: list[Path], **settings) -> Manifest:
    base = {"seq_len": 2048, "val_fraction": 0.01, "doc_per": "auto", "text_field": "text", "bos": False,
            "last": "pad", "samples_per_shard": 26214}
    return Manifest(seq_len=settings.get("seq_len", 2048), dtype="uint16", vocab_size=500,
                    tokenizer={"path": "/models/tok.model"}, settings=base | settings,
                    inputs=[{"path": str(p), "bytes": 1, "sha256": "x"} for p in inputs])


def test_the_command_names_the_settings_that_are_not_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    folder = tmp_path / "raw"
    (folder / "sub").mkdir(parents=True)
    files = [folder / "a.txt", folder / "sub" / "b.jsonl.gz"]
    for f in files:
        f.write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "progress.journal").write_text('{"pipeline": "mor-tokenize/2"}\n')
    head = f"python data_prep/tokenize.py {folder} --tokenizer /models/tok.model --out {out}"
    assert finish_command(out, _manifest(files)) == head                        # all defaults: no options
    m = _manifest(files, seq_len=64, val_fraction=0.25, doc_per="line", text_field="body text", bos=True,
                  last="drop", samples_per_shard=8)
    assert finish_command(out, m) == (f"{head} --seq-len 64 --val-fraction 0.25 --doc-per line "
                                      "--text-field 'body text' --last drop --bos --samples-per-shard 8")
    # 26214 samples per shard is what the default 128 MB gives at seq_len 2048, 7710 at 8192
    assert finish_command(out, _manifest(files, seq_len=8192, samples_per_shard=7710)).endswith("--seq-len 8192")
    (folder / "other.txt").write_bytes(b"y")                 # the folder now holds another input: name the files
    assert finish_command(out, _manifest(files)).startswith(
        f"python data_prep/tokenize.py {files[0]} {files[1]} --tokenizer")
    (out / "progress.journal").write_text('{"pipeline": "mor-tokenize/2"}\n'
                                          '{"inputs": {"0": {"bad_records_skipped": 2}}}\n')
    assert finish_command(out, _manifest(files)).endswith(f"--out {out} --skip-bad-records")
    (out / "progress.journal").unlink()                      # nothing to resume from: make it again
    assert finish_command(out, _manifest(files)).endswith(f"--out {out} --overwrite")


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_without_samples_is_one_line(tmp_path, tiny_model, split):
    path = tmp_path / "one.jsonl"
    write_jsonl(path, corpus_records(1))
    out = tmp_path / "out"
    fraction = 0 if split == "val" else 1
    assert run_cli(path, "--out", out, "--tokenizer", tiny_model, "--seq-len", 64,
                   "--val-fraction", fraction).returncode == 0
    other = "train" if split == "val" else "val"
    assert load_manifest(out, (other,)).samples(other) > 0
    with pytest.raises(ValueError) as e:
        load_manifest(out, ("train", "val"))
    line = str(e.value)
    assert line.startswith(f"{out}: split {split!r} has no samples (0 documents, 0 tokens")
    assert line.endswith("rerun data_prep/tokenize.py with more text" + (" or a larger --val-fraction"
                                                                       if split == "val" else ""))
    with pytest.raises(ValueError) as e:
        TokenLoader(out, split, micro_batch_size=2, epochs=1)
    assert str(e.value) == line
