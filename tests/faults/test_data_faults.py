"""The trainer on real tokenizer output that is unfinished, smaller than its readers, or padded at the end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep import tokenizer as T
from pretrain.data.loader import TokenLoader, label_count
from tests.data_prep.conftest import corpus_records, run_cli, write_jsonl
from tests.distributed.harness import spawn_ranks
from tests.faults.runs import args, run_main

SEQ, VOCAB = 64, 512
SHARD = ["--seq-len", SEQ, "--val-fraction", 0.2, "--samples-per-shard", 10_000]   # one shard per split


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of two files of one address each, a small BPE model trained on them)."""
    root = tmp_path_factory.mktemp("data_faults")
    folder = root / "in"
    folder.mkdir()
    recs = corpus_records(2, start=100)
    write_jsonl(folder / "a.jsonl", recs[:1])
    write_jsonl(folder / "b.jsonl.gz", recs[1:])
    model = root / "tok.model"
    T.train([r["text"] for r in recs], str(model), vocab_size=VOCAB, sentences=20000, seed=0, threads=1,
            log=lambda m: None)
    return folder, model


@pytest.fixture(scope="module")
def shards(inputs, tmp_path_factory) -> Path:
    folder, model = inputs
    out = tmp_path_factory.mktemp("shards") / "data"
    res = run_cli(folder, "--out", out, "--tokenizer", model, *SHARD)
    assert res.returncode == 0, res.stderr
    return out


def tiny(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return args(data, out, name, f"model.vocab_size={VOCAB}", f"model.max_seq_len={SEQ}", *extra)


def test_an_unfinished_data_set_is_one_line_with_the_command_that_finishes_it(inputs, tmp_path):
    folder, model = inputs
    out = tmp_path / "data"
    killed = run_cli(folder, "--out", out, "--tokenizer", model, "--seq-len", SEQ, "--samples-per-shard", 20,
                     env={"DATA_PREP_KILL_AT": "shard:2"})
    assert killed.returncode < 0
    code, stdout, stderr = run_main(tiny(out, tmp_path, "early"))
    assert code == 2 and "Traceback" not in stdout + stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "data.path:" in errors[0] and "unfinished" in errors[0], stderr
    assert f"finish it with: python data_prep/tokenize.py {folder} --tokenizer {model} --out {out}" in errors[0]
    assert not (tmp_path / "early").exists()                  # nothing started, nothing written


def test_two_ranks_train_on_a_data_set_of_one_shard(shards, tmp_path):
    assert len(json.loads((shards / "manifest.json").read_text())["splits"]["train"]) == 1
    spawn_ranks(2, ["-m", "pretrain.train", "conf/run/tiny_cpu.yaml", *tiny(shards, tmp_path, "dp2",
                                                                            "parallel.zero_stage=1")], tmp_path)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "dp2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_padding_counts_in_no_token_total(shards, tmp_path):
    """One epoch and a half of a split whose last sample is padded: the run's token count is the number of real
    labels it was given, and the padded sample was among them."""
    samples = sum(e["samples"] for e in json.loads((shards / "manifest.json").read_text())["splits"]["train"])
    batch = 32
    steps = samples * 3 // (2 * batch)
    code, out, err = run_main(tiny(shards, tmp_path, "pad", f"train.steps={steps}", "checkpoint.every=0",
                                   f"parallel.micro_batch_size={batch}", "parallel.global_batch_size=null"))
    assert code == 0, out + err
    records = [json.loads(ln) for ln in (tmp_path / "pad" / "metrics.jsonl").read_text().splitlines()]
    loader = iter(TokenLoader(shards, micro_batch_size=batch, seed=0, shuffle=True))
    real = [int(label_count(next(loader)[1])) for _ in range(steps)]
    assert min(real) < batch * SEQ                            # the padded sample came by
    assert records[-1]["tokens"] == sum(real)
    assert [r["tokens"] for r in records] == [sum(real[:i + 1]) for i in range(steps)]
