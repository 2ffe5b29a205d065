"""The padding of each split's last sample is recorded where a reader finds it (``pad_tokens`` in the entry of the
split's last shard) and reaches training as ignored labels: every token after a split's first is a label exactly
once, and padding never is."""
from __future__ import annotations

import pytest

from data_prep.shards import Manifest
from pretrain.data.loader import IGNORE_INDEX, TokenLoader, label_count
from tests.data_prep.conftest import read_samples, run_cli

SEQ = 64


@pytest.mark.parametrize("last", ["pad", "drop"])
def test_padding_is_recorded_and_ignored(tmp_path, tiny_model, jsonl_input, last):
    out = tmp_path / "out"
    res = run_cli(jsonl_input, "--out", out, "--tokenizer", tiny_model, "--seq-len", SEQ, "--val-fraction", 0.25,
                  "--samples-per-shard", 8, "--last", last)
    assert res.returncode == 0, res.stderr
    m = Manifest.load(out)
    total_pad = 0
    for split in ("train", "val"):
        entries, stream = m.splits[split], m.counts[f"tokens_{split}"]
        n = m.samples(split)
        pad = n * SEQ + 1 - stream if last == "pad" else 0         # the overlap rule, computed by hand
        assert pad > 0 or last == "drop"
        assert entries[-1]["pad_tokens"] == pad and all("pad_tokens" not in e for e in entries[:-1])
        assert m.padding(split) == [0] * (len(entries) - 1) + [pad]
        total_pad += pad
        tail = read_samples(out, split)[-1]
        assert (tail[SEQ + 1 - pad:] == m.settings["pad_fill_id"]).all()
        counted = ignored = 0
        for _, labels in TokenLoader(out, split, micro_batch_size=4, shuffle=False, epochs=1):
            counted += int(label_count(labels))
            ignored += int((labels == IGNORE_INDEX).sum())
        assert ignored == pad
        # every token of the stream after the first is a label once (with drop: only those in whole samples)
        assert counted == (stream - 1 if last == "pad" else n * SEQ)
    assert m.counts["pad_tokens"] == total_pad
