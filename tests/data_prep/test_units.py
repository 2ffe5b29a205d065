"""One-document-per-line inputs are cut into byte units that the workers parse: the cut is at line ends, the shards
do not depend on the unit size, and line numbers, warnings and counts still describe the whole file."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from data_prep import pack, sources, units
from data_prep.inputs import find_inputs
from data_prep.shards import Manifest
from tests.data_prep.conftest import write_jsonl


def _run(tmp_path, name, inputs, tiny_model, workers=2, **kw):
    out = tmp_path / name
    logs: list[str] = []
    opt = pack.Options(inputs=[str(p) for p in inputs], out=str(out), tokenizer=tiny_model, seq_len=64,
                       val_fraction=0.25, samples_per_shard=8, workers=workers, progress=False, log=logs.append, **kw)
    pack.run(opt)
    shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    return shards, Manifest.load(out), logs


@pytest.mark.parametrize("gz", [False, True])
def test_units_end_at_line_ends_and_cover_the_file(tmp_path, monkeypatch, gz):
    lines = [("x" * (i % 37)) + f" line {i}" for i in range(400)] + ["no newline at the end"]
    data = "\n".join(lines).encode()
    path = tmp_path / ("in.txt.gz" if gz else "in.txt")
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    monkeypatch.setattr(units, "UNIT_BYTES", 1000)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 777)          # blocks that do not line up with units
    f = find_inputs([str(path)])[0]
    cut = list(units.cut(sources.Reader(doc_per="line"), f))
    assert {c[0] for c in cut} == {"unit"} and b"".join(c[1] for c in cut) == data
    assert len(cut) > 5
    before = 0
    for _, u, line0, _ in cut[:-1]:
        assert u.endswith(b"\n") and len(u) >= 1000 and b"\n" not in u[999:-1]     # the first line end after 1000
        assert line0 == before
        before += u.count(b"\n")
    assert cut[-1][2] == before and not cut[-1][1].endswith(b"\n")


def test_shards_do_not_depend_on_unit_size(tmp_path, monkeypatch, tiny_model, docs):
    recs = [{"text": t} for t in docs] + [{"text": f"short record {i} " * (i % 5 + 1)} for i in range(300)]
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl.gz", recs[:150])
    write_jsonl(folder / "b.jsonl", recs[150:])
    ref, m_ref, _ = _run(tmp_path, "big", [folder], tiny_model, workers=1)
    monkeypatch.setattr(units, "UNIT_BYTES", 3000)
    small, m_small, _ = _run(tmp_path, "small", [folder], tiny_model, workers=2)
    assert small == ref and len(ref) > 10
    assert m_small.counts == m_ref.counts and m_small.counts["documents"] == len(recs)
    assert m_small.settings["unit_bytes"] == 3000 != m_ref.settings["unit_bytes"]


def test_line_numbers_warnings_and_counts_across_units(tmp_path, monkeypatch, tiny_model):
    rows = [json.dumps({"text": f"record number {i} with some words"}) for i in range(200)]
    rows[57] = json.dumps({"text": "bad \udcff surrogate"})            # replaced, counted
    rows[120] = json.dumps({"text": "nul \u0000 here"})
    rows[150] = "{not json"
    rows[181] = json.dumps({"body": "no text field"})
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(units, "UNIT_BYTES", 500)
    with pytest.raises(sources.UserError, match=rf"{path}:151: bad JSON"):
        _run(tmp_path, "strict", [path], tiny_model)
    _, m, logs = _run(tmp_path, "lenient", [path], tiny_model, skip_bad_records=True)
    text = "\n".join(logs)
    assert f"{path}:151: bad JSON" in text and f"{path}:182: no field 'text'" in text
    assert f"{path}: 3 invalid UTF-8 sequence(s) replaced with U+FFFD (first at line 58)" in text  # 3 bytes
    assert f"{path}: 1 NUL character(s) removed (first at line 121)" in text
    c = m.counts
    assert (c["documents"], c["bad_records_skipped"], c["invalid_utf8_replaced"], c["nul_removed"]) == (198, 2, 3, 1)


def test_bad_record_warnings_are_capped_per_input(tmp_path, monkeypatch, tiny_model):
    rows = [json.dumps({"text": f"doc {i}"}) if i % 3 else "[1, 2]" for i in range(300)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(units, "UNIT_BYTES", 300)
    _, m, logs = _run(tmp_path, "out", [path], tiny_model, skip_bad_records=True)
    shown = Counter("record skipped" in line for line in logs)
    assert shown[True] == sources.MAX_WARNINGS_PER_KIND
    assert sum("more bad records skipped" in line for line in logs) == 1
    assert m.counts["bad_records_skipped"] == 100


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_a_very_long_line_hands_the_rest_to_the_main_process(tmp_path, monkeypatch, tiny_model, docs, kind):
    """From a line longer than LONG_LINE_BYTES on, the file is read in the main process (bounded memory); the
    shards, counts and line numbers are those of reading it all as units."""
    lines = [f"short line {i} " * (i % 4 + 1) for i in range(120)]
    lines[40] = " ".join(docs)                                  # ~300k characters on one line
    lines[90] = "bad \udcff here"
    path = tmp_path / f"in.{kind}"
    if kind == "txt":
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n")
    else:
        path.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    kw = {"doc_per": "line"} if kind == "txt" else {}
    ref, m_ref, logs_ref = _run(tmp_path, "ref", [path], tiny_model, **kw)
    monkeypatch.setattr(units, "UNIT_BYTES", 1500)
    monkeypatch.setattr(units, "LONG_LINE_BYTES", 20000)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)
    f = find_inputs([str(path)])[0]
    parts = list(units.cut(sources.Reader(doc_per="line"), f))
    assert [p[0] for p in parts[-2:]] == ["unit", "rest"] and parts[-1][2] == 40    # 40 lines before the long one
    got, m, logs = _run(tmp_path, "got", [path], tiny_model, **kw)
    assert got == ref
    assert {k: v for k, v in m.counts.items()} == m_ref.counts and m.counts["long_documents_split"] == 1
    assert [x for x in logs if "U+FFFD" in x] == [x for x in logs_ref if "U+FFFD" in x] and "line 91" in logs[0]
