"""Validation under pipeline parallelism counts a short last micro-batch: with 10 validation sequences in
micro-batches of 4 (4 + 4 + 2), the loss is the mean over the tokens of all three batches, the short one weighing
what it holds. Checked against two runs with the same weights (same layout and seed) on the first 8 sequences and
on the last 2 alone."""
from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.shards import Manifest, read_shard, shard_name, write_shard
from tests.distributed.harness import spawn_ranks
from tests.pretrain.fixtures import make_shards


def _val_loss(run_dir) -> float:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in records if "val_loss" in r)


def _with_val(src, dst, rows: slice):
    """A copy of the data folder whose validation split is ``rows`` of the original one."""
    m = Manifest.load(src)
    (seqs,) = [read_shard(src / e["name"], np.dtype(m.dtype)) for e in m.splits["val"]]
    dst.mkdir()
    for e in m.splits["train"]:
        (dst / e["name"]).write_bytes((src / e["name"]).read_bytes())
    m.splits["val"] = [write_shard(dst / shard_name("val", 0), "val", 0, [np.asarray(s) for s in seqs[rows]])]
    m.save(dst)
    return dst


def test_pipeline_validation_loss_counts_the_short_last_batch(tmp_path):
    data = make_shards(tmp_path / "data", vocab=128, seq_len=32, train=64, val=10, per_shard=16)
    head, tail = _with_val(data, tmp_path / "head", slice(0, 8)), _with_val(data, tmp_path / "tail", slice(8, 10))
    losses = {}
    for name, folder in (("all", data), ("head", head), ("tail", tail)):
        spawn_ranks(2, ["-m", "pretrain.train", "tiny_cpu", "model=tiny_vanilla", "model.vocab_size=128",
                        f"data.path={folder}", "data.num_workers=0", "parallel.micro_batch_size=4",
                        "parallel.zero_stage=0", "parallel.pipeline_parallel=2", "train.steps=1", "train.eval_every=1",
                        "train.eval_batches=8", "checkpoint.every=0", "logging.wandb=disabled", f"out_dir={tmp_path}",
                        f"name={name}"], tmp_path, prefix=name)
        losses[name] = _val_loss(tmp_path / name)
    assert losses["tail"] > 0                                # one batch of 2: not left out
    assert losses["all"] == pytest.approx((8 * losses["head"] + 2 * losses["tail"]) / 10, rel=1e-5)
