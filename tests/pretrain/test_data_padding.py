"""The padding of a split's last sample reaches the loss as IGNORE_INDEX labels, and nowhere else: from the
manifest's ``pad_tokens``, or inferred from the counts of a manifest written before that field existed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_prep.shards import Manifest
from pretrain.data.loader import IGNORE_INDEX, TokenLoader, label_count
from tests.pretrain.test_data import SEQ, make_data, row, take

TRAIN = (10, 9, 7)          # the padded sample is sample 6 of shard 2
PAD = 3


def padded(folder: Path, *, field: bool = True, counts: bool = True) -> Path:
    """The fixture data with the split's last sample ending in PAD padding tokens, recorded as the tokenizer
    records it now (``field``) or only through the stream length in the counts (a manifest from before)."""
    make_data(folder, TRAIN)
    m = Manifest.load(folder)
    if field:
        m.splits["train"][-1]["pad_tokens"] = PAD
    if counts:
        m.counts["tokens_train"] = sum(TRAIN) * SEQ + 1 - PAD
    m.save(folder)
    return folder


def labels_by_sample(folder: Path, dp_size: int = 1, **kw) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) of every sample of one epoch over all ranks, by the sample's (shard, index)."""
    got = {}
    for rank in range(dp_size):
        for tokens, labels in take(TokenLoader(folder, micro_batch_size=4, epochs=1, dp_rank=rank, dp_size=dp_size,
                                               **kw)):
            for t, lab in zip(tokens, labels):
                got[int(t[0]), int(t[1])] = (t, lab)
    return got


def check(got, pad: int) -> None:
    assert len(got) == sum(TRAIN)
    for (i, j), (t, lab) in got.items():
        full = torch.from_numpy(row(i, j).astype("int64"))
        assert torch.equal(t, full[:-1])                             # tokens stay as they are
        n = pad if (i, j) == (len(TRAIN) - 1, TRAIN[-1] - 1) else 0
        assert torch.equal(lab[:SEQ - n], full[1:SEQ + 1 - n])
        assert (lab[SEQ - n:] == IGNORE_INDEX).all() and (lab[:SEQ - n] != IGNORE_INDEX).all()


@pytest.mark.parametrize("field,counts", [(True, True), (True, False), (False, True)],
                         ids=["field", "field-only", "inferred-from-counts"])
def test_padding_labels_are_ignored(tmp_path: Path, field: bool, counts: bool):
    folder = padded(tmp_path, field=field, counts=counts)
    assert Manifest.load(folder).padding("train") == [0, 0, PAD]
    check(labels_by_sample(folder, dp_size=2, shuffle=True, seed=4, num_workers=2), PAD)


def test_without_field_or_counts_nothing_is_ignored(tmp_path: Path):
    folder = padded(tmp_path, field=False, counts=False)
    check(labels_by_sample(folder, shuffle=False), 0)


def test_padding_in_a_split_read_as_parts(tmp_path: Path):
    """One shard over 2 ranks x 2 workers: the padded sample is in the shard's last part."""
    folder = make_data(tmp_path, (9,))
    m = Manifest.load(folder)
    m.splits["train"][0]["pad_tokens"] = SEQ - 1                     # one real label left in the last sample
    m.save(folder)
    n_labels, ignored = 0, 0
    for rank in range(2):
        for _, labels in take(TokenLoader(folder, micro_batch_size=2, epochs=1, dp_rank=rank, dp_size=2,
                                          num_workers=2)):
            n_labels += int(label_count(labels))
            ignored += int((labels == IGNORE_INDEX).sum())
    assert (n_labels, ignored) == (9 * SEQ - (SEQ - 1), SEQ - 1)


def test_impossible_padding_is_one_line(tmp_path: Path):
    folder = make_data(tmp_path, TRAIN)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["splits"]["train"][-1]["pad_tokens"] = SEQ + 1
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"^{folder}/manifest.json: split 'train', shard train-000002.tar: "
                                         rf"{SEQ + 1} padding tokens do not fit in one sample"):
        TokenLoader(folder, micro_batch_size=4)
