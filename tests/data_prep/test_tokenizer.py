"""Tokenizer training is deterministic, model settings are read from the file, and cutting text at safe spaces
before encoding gives exactly the ids of encoding it whole."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from data_prep import sources
from data_prep import tokenizer as T
from data_prep.sources import UserError
from tests.data_prep.conftest import corpus_records


def test_training_is_deterministic_and_reused(tmp_path, tiny_model):
    texts = [r["text"] for r in corpus_records(16)]
    again = tmp_path / "again.model"
    assert T.train(texts, str(again), vocab_size=500, sentences=20000, seed=0, threads=2, log=lambda m: None)
    assert again.read_bytes() == open(tiny_model, "rb").read()
    # same settings and inputs: reused, not retrained
    assert not T.train(texts, str(again), vocab_size=500, sentences=20000, seed=0, threads=2, log=lambda m: None)
    # other settings on an existing file: refused without overwrite
    with pytest.raises(UserError, match="--overwrite"):
        T.train(texts, str(again), vocab_size=520, sentences=20000, seed=0, threads=2, log=lambda m: None)


def test_model_ids_and_spec(tiny_model):
    sp, info, proto = T.load(tiny_model)
    assert (info.unk_id, info.bos_id, info.eos_id, info.pad_id) == (0, 1, 2, -1)
    assert info.vocab_size == 500 and info.model_type == "bpe"
    assert info.add_dummy_prefix and info.lossless_segments
    assert info.sha256 == hashlib.sha256(proto).hexdigest()
    text = "Tabs\tand  two spaces, é, ☃ and a NUL-free\nnew line."
    assert sp.decode(sp.encode(text)) == text            # identity normalisation + byte fallback


def test_not_a_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        T.load(str(bad))


def test_vocab_too_large_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="vocab"):
        T.train(["a tiny text"], str(tmp_path / "x.model"), vocab_size=5000, threads=1, log=lambda m: None)


def test_segments_encode_like_the_whole(tiny_model, docs):
    sp, info, proto = T.load(tiny_model)
    T.init_worker(proto, info.manifest_entry(), "uint16", False, in_worker=False)
    tricky = ("word " * 700 + "x  y   z \t tab\nline " * 300 + "e\u0301 combining " * 200
              + "nospace" * 500 + " end" + " " * 5)
    texts = docs[:4] + [tricky, "", " ", "a"]
    flat, lens = T.encode_texts(texts)
    assert len(lens) == len(texts)
    whole = [sp.encode(t) for t in texts]
    assert lens.tolist() == [len(w) for w in whole]
    assert flat.tolist() == [i for w in whole for i in w]
    parts = sources.segment(docs[0], 1024, drop_space=True)
    assert len(parts) > 10 and max(map(len, parts)) <= 1024


def test_encode_batch_adds_bos_and_eos(tiny_model):
    sp, info, proto = T.load(tiny_model)
    T.init_worker(proto, info.manifest_entry(), "uint16", True, in_worker=False)
    tokens, lens = T.encode_batch((["first doc", "second part", "tail"], bytes([1, 1, 0]), bytes([1, 0, 1])))
    a, b, c = (sp.encode(t) for t in ("first doc", "second part", "tail"))
    assert lens.tolist() == [len(a) + 2, len(b) + 1, len(c) + 1]
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [1, *a, 2, 1, *b, *c, 2]
