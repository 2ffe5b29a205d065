"""Several corpora in one run: a data set per corpus in OUT/NAME/, each a valid data set on its own, all made with
one tokenizer trained once on a weighted sample of every corpus; the weights decide the sample, and the same
weights reuse the model."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from data_prep import sample
from data_prep.shards import Manifest
from tests.data_prep.conftest import decode_docs
from tests.data_prep_mix.conftest import texts, write_lines

ARGS = ["--seq-len", 64, "--val-fraction", 0.5, "--samples-per-shard", 16, "--workers", 1]


@pytest.fixture
def two(tmp_path):
    """Corpus "early": one file; corpus "late": a folder of two files."""
    early, late = texts(4), texts(6, start=100)
    write_lines(tmp_path / "raw" / "early.jsonl", early)
    write_lines(tmp_path / "raw" / "late" / "a.jsonl", late[:3])
    write_lines(tmp_path / "raw" / "late" / "b.jsonl", late[3:])
    return tmp_path, early, late


def test_two_corpora_two_data_sets_one_trained_tokenizer(two, cli):
    import sentencepiece as spm

    from pretrain.data.loader import load_manifest
    tmp, early, late = two
    model, out = tmp / "tok.model", tmp / "data"
    corpora = ["--corpus", f"early={tmp / 'raw' / 'early.jsonl'}", "--corpus", f"late={tmp / 'raw' / 'late'}"]
    rc, stdout, err = cli(*corpora, "--train-tokenizer", model, "--vocab-size", 400, "--out", out, *ARGS)
    assert rc == 0, err
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for name, docs, n_files in (("early", early, 1), ("late", late, 2)):
        m = load_manifest(out / name, splits=("train", "val"))
        assert m == Manifest.load(out / name) and m.complete
        assert m.tokenizer["sha256"] == sha and m.tokenizer["trained"]["vocab_size"] == 400
        assert m.counts["input_files"] == n_files and m.counts["documents"] == len(docs)
        assert "dedup" not in m.settings and "duplicates_dropped" not in m.counts
        got = decode_docs(out / name, "train", sp) + decode_docs(out / name, "val", sp)
        assert sorted(got) == sorted(docs)
        assert f"{name}: {len(docs)} documents" in stdout and f"manifest: {out / name / 'manifest.json'}" in stdout
    assert f"done: 2 corpora, {len(early) + len(late)} documents" in stdout and sha[:16] in stdout
    assert sorted(p.name for p in out.iterdir()) == ["early", "late"]
    # the same command again: the tokenizer is reused, both folders are complete and kept
    rc, stdout, err = cli(*corpora, "--train-tokenizer", model, "--vocab-size", 400, "--out", out, *ARGS)
    assert rc == 0 and "reusing it" in err and err.count("already complete") == 2
    assert "early: already complete" in stdout and hashlib.sha256(model.read_bytes()).hexdigest() == sha


def test_a_corpus_alone_gives_the_same_data_set(two, cli, mix_model):
    """A corpus folder is exactly what a run on that corpus alone writes."""
    tmp, _, _ = two
    rc, _, err = cli("--corpus", f"late={tmp / 'raw' / 'late'}", "--corpus", f"early={tmp / 'raw' / 'early.jsonl'}",
                     "--tokenizer", mix_model, "--out", tmp / "mix", *ARGS)
    assert rc == 0, err
    rc, _, err = cli(tmp / "raw" / "late", "--tokenizer", mix_model, "--out", tmp / "alone", *ARGS)
    assert rc == 0, err
    for p in sorted((tmp / "alone").iterdir()):
        assert p.read_bytes() == (tmp / "mix" / "late" / p.name).read_bytes(), p.name


def _train(cli, tmp, model, *weights) -> dict:
    rc, _, err = cli("--corpus", f"early={tmp / 'raw' / 'early.jsonl'}", "--corpus", f"late={tmp / 'raw' / 'late'}",
                     *[w for x in weights for w in ("--weight", x)], "--train-tokenizer", model, "--vocab-size", 400,
                     "--tokenizer-threads", 1)
    assert rc == 0, err
    return json.loads((tmp / f"{model}.json").read_text()) | {"err": err, "bytes": (tmp / model).read_bytes()}


def test_weights_set_the_sample_and_the_same_weights_reuse_the_model(two, cli):
    tmp, _, _ = two
    even = _train(cli, tmp, tmp / "even.model")
    assert "a sample of" in even["err"]
    n_early, n_late = (even["sample"][c]["sentences"] for c in ("early", "late"))
    size = n_early + n_late
    assert [even["sample"][c]["drawn"] for c in ("early", "late")] == sample.shares(size, [1, 1])
    late3 = _train(cli, tmp, tmp / "late3.model", "late=3")
    assert [late3["sample"][c]["drawn"] for c in ("early", "late")] == sample.shares(size, [1, 3])
    assert late3["key"] != even["key"] and late3["bytes"] != even["bytes"]
    assert [c["weight"] for c in late3["key"]["corpora"]] == [1.0, 3.0]
    # a weight of 1 given is the default: the same sample, so the model is reused
    again = _train(cli, tmp, tmp / "even.model", "early=1")
    assert "reusing it" in again["err"] and again["bytes"] == even["bytes"]
    # the same weights trained afresh: the same model, byte for byte
    fresh = _train(cli, tmp, tmp / "fresh.model", "late=3")
    assert fresh["bytes"] == late3["bytes"]


def test_sample_shares_repeats_and_draws():
    corpora = [("big", 1.0, lambda warn: [f"big {i}" for i in range(100)]),
               ("small", 1.0, lambda warn: [f"small {i}\nsmall {i}b" for i in range(5)])]
    made_of: dict = {}
    got = list(sample.weighted(corpora, 1000, 7, made_of, lambda m: None))
    assert made_of == {"big": {"sentences": 100, "drawn": 55}, "small": {"sentences": 10, "drawn": 55}}
    small = [s for s in got if s.startswith("small")]
    assert len(got) == 110 and len(small) == 55
    assert sorted(set(small.count(s) for s in set(small))) == [5, 6]        # 5 whole passes, 5 drawn once more
    # a smaller N: shares of N; the draw is fixed by the seed, and another seed draws others
    assert list(sample.weighted(corpora, 40, 7, {}, lambda m: None)) == \
        list(sample.weighted(corpora, 40, 7, {}, lambda m: None))
    big7 = [s for s in sample.weighted(corpora, 40, 7, {}, lambda m: None) if s.startswith("big")]
    big8 = [s for s in sample.weighted(corpora, 40, 8, {}, lambda m: None) if s.startswith("big")]
    assert len(big7) == len(big8) == 20 and big7 != big8
    assert sample.shares(10, [1, 1, 1]) == [4, 3, 3] and sample.shares(7, [2, 5]) == [2, 5]
    d = sample.draw(1000, 100, 0, 0)
    assert len(np.unique(d)) == 100 and (np.diff(d) > 0).all() and d.max() < 1000
