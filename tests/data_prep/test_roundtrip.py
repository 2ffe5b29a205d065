"""Text → shards → webdataset → decode gives the text back, for every input type and document mode; shards are
byte-identical for 1 and 2 workers; the manifest's counts and checksums are right."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from data_prep import pack, sources
from data_prep.shards import Manifest, sha256_file
from tests.data_prep.conftest import decode_docs, read_samples, run_cli, shard_bytes, stream_of, write_jsonl


def _run(inputs, out, model, **kw) -> dict:
    kw.setdefault("workers", 1)
    opt = pack.Options(inputs=[str(i) for i in inputs], out=str(out), tokenizer=model, progress=False,
                       log=lambda m: None, **kw)
    return pack.run(opt)


def _expected(texts, val_fraction):
    r = sources.Reader(val_fraction=val_fraction)
    return {s: [t for t in texts if r.split_of(t) == i] for i, s in enumerate(("train", "val"))}


def test_jsonl_gz_round_trip_with_bos(tmp_path, jsonl_input, docs, tiny_model, sp):
    out = tmp_path / "out"
    res = run_cli(jsonl_input.parent, "--out", out, "--tokenizer", tiny_model, "--seq-len", 256,
                  "--val-fraction", 0.3, "--bos", "--samples-per-shard", 50, "--workers", 2)
    assert res.returncode == 0, res.stderr
    assert "done: 8 documents" in res.stdout
    exp = _expected(docs, 0.3)
    assert exp["train"] and exp["val"]                   # both splits hold documents
    for split in ("train", "val"):
        assert decode_docs(out, split, sp) == exp[split]
        stream = stream_of(out, split)
        starts = np.concatenate([[0], np.nonzero(stream == sp.eos_id())[0][:-1] + 1])
        assert (stream[starts] == sp.bos_id()).all() and (stream == sp.bos_id()).sum() == len(exp[split])
    m = Manifest.load(out)
    assert len(m.splits["train"]) > 1 and m.complete and m.dtype == "uint16"


def test_manifest_counts_and_checksums(tmp_path, jsonl_input, docs, tiny_model):
    out = tmp_path / "out"
    _run([jsonl_input], out, tiny_model, seq_len=128, val_fraction=0.3, samples_per_shard=64)
    m = Manifest.load(out)
    assert m.complete and m.seq_len == 128
    for split in ("train", "val"):
        for e in m.splits[split]:
            p = out / e["name"]
            assert sha256_file(p) == e["sha256"] and p.stat().st_size == e["bytes"]
            assert len(read_samples(out, split)) == m.samples(split)
            assert e["tokens"] == e["samples"] * 129
        assert m.counts[f"samples_{split}"] == m.samples(split)
        n = m.counts[f"tokens_{split}"]
        assert m.samples(split) == -(-(n - 1) // 128)  # every token after the first is a label once
    assert m.inputs == [{"path": str(jsonl_input.resolve()), "bytes": jsonl_input.stat().st_size,
                         "sha256": hashlib.sha256(jsonl_input.read_bytes()).hexdigest()}]
    tok = m.tokenizer
    assert tok["sha256"] == hashlib.sha256(open(tiny_model, "rb").read()).hexdigest()
    assert (tok["bos_id"], tok["eos_id"], tok["pad_id"], tok["unk_id"]) == (1, 2, -1, 0)
    c = m.counts
    exp = _expected(docs, 0.3)
    assert c["documents"] == 8 and c["documents_val"] == len(exp["val"]) and c["input_files"] == 1
    assert c["text_chars"] == sum(map(len, docs))
    assert c["pad_tokens"] == sum((128 + 1 - (c[f"tokens_{s}"] - 128 * (c[f"samples_{s}"] - 1)))
                                  for s in ("train", "val"))
    assert m.settings["pad_fill_id"] == 2 and m.settings["last"] == "pad"


def test_one_and_two_workers_give_identical_shards(tmp_path, jsonl_input, tiny_model):
    kw = dict(seq_len=128, val_fraction=0.2, samples_per_shard=40)
    one, two = tmp_path / "one_worker", tmp_path / "two_workers"
    _run([jsonl_input], one, tiny_model, workers=1, **kw)
    _run([jsonl_input], two, tiny_model, workers=2, **kw)
    a, b = shard_bytes(one), shard_bytes(two)
    assert len(a) > 5 and a == b
    # the manifests differ only where they name their own folder (the tmp path may hold "w1": pytest-xdist's gw1)
    assert (one / "manifest.json").read_bytes().replace(str(one).encode(), b"") == \
        (two / "manifest.json").read_bytes().replace(str(two).encode(), b"")


def test_txt_file_and_line_modes(tmp_path, docs, tiny_model, sp):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0] + "\n")
    (folder / "sub" / "b.txt.gz").write_bytes(gzip.compress((docs[1] + "\r\n" + docs[2]).encode(), mtime=0))
    (folder / "ignored.csv").write_text("x")
    _run([folder], tmp_path / "file", tiny_model, seq_len=256, val_fraction=0.0)
    assert decode_docs(tmp_path / "file", "train", sp) == [docs[0] + "\n", docs[1] + "\r\n" + docs[2]]
    m = _run([str(folder / "**" / "*.txt*")], tmp_path / "line", tiny_model, seq_len=256, val_fraction=0.0,
             doc_per="line")["manifest"]
    assert decode_docs(tmp_path / "line", "train", sp) == [docs[0], docs[1], docs[2]]
    assert [Path(i["path"]).name for i in m.inputs] == ["a.txt", "b.txt.gz"]


def test_parquet_and_jsonl_file_mode(tmp_path, docs, tiny_model, sp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": docs[:3], "n": [1, 2, 3]}), tmp_path / "d.parquet", row_group_size=2)
    _run([tmp_path / "d.parquet"], tmp_path / "pq", tiny_model, seq_len=256, val_fraction=0.0, text_field="body")
    assert decode_docs(tmp_path / "pq", "train", sp) == docs[:3]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs[:3]])
    _run([tmp_path / "d.jsonl"], tmp_path / "jf", tiny_model, seq_len=256, val_fraction=0.0, doc_per="file")
    assert decode_docs(tmp_path / "jf", "train", sp) == ["\n".join(docs[:3])]


def test_giant_single_line_is_cut_into_pieces_without_changing_ids(tmp_path, docs, tiny_model, sp):
    text = " ".join(docs)                                # ~330k characters on one line, > PIECE_CHARS
    assert len(text) > sources.PIECE_CHARS
    (tmp_path / "big.txt").write_text(text)
    m = _run([tmp_path / "big.txt"], tmp_path / "out", tiny_model, seq_len=512, val_fraction=0.0,
             doc_per="line", workers=2)["manifest"]
    assert m.counts["long_documents_split"] == 1 and m.counts["pieces"] == 2
    stream = stream_of(tmp_path / "out", "train")
    assert stream.tolist() == sp.encode(text) + [sp.eos_id()]


def test_last_window_drop_and_pad(tmp_path, jsonl_input, tiny_model):
    pad = _run([jsonl_input], tmp_path / "pad", tiny_model, seq_len=512, val_fraction=0.0)["manifest"]
    drop = _run([jsonl_input], tmp_path / "drop", tiny_model, seq_len=512, val_fraction=0.0,
                last="drop")["manifest"]
    n = pad.counts["tokens_train"]
    assert drop.samples("train") == (n - 1) // 512 == pad.samples("train") - 1
    assert drop.counts["dropped_tokens"] == (n - 1) % 512 and pad.counts["pad_tokens"] == 512 - (n - 1) % 512
    last = read_samples(tmp_path / "pad", "train")[-1]
    assert (last[-pad.counts["pad_tokens"]:] == 2).all()


def test_split_does_not_depend_on_order(tmp_path, docs, tiny_model, sp):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, names in ((a, ("1", "2")), (b, ("2", "1"))):
        folder.mkdir()
        write_jsonl(folder / f"{names[0]}.jsonl", [{"text": t} for t in docs[:4]])
        write_jsonl(folder / f"{names[1]}.jsonl", [{"text": t} for t in docs[4:]])
    for folder in (a, b):
        _run([folder], folder / "out", tiny_model, seq_len=256, val_fraction=0.4)
    for split in ("train", "val"):
        assert sorted(decode_docs(a / "out", split, sp)) == sorted(decode_docs(b / "out", split, sp))


def test_output_folder_inside_the_input_folder_is_not_read(tmp_path, docs, tiny_model, sp):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs[:2]])
    out = tmp_path / "out"
    out.mkdir()
    write_jsonl(out / "stray.jsonl", [{"text": "not an input"}])
    m = _run([tmp_path], out, tiny_model, seq_len=256, val_fraction=0.0)["manifest"]
    assert [Path(i["path"]).name for i in m.inputs] == ["a.jsonl"]
    assert decode_docs(out, "train", sp) == docs[:2]
