"""Validation reports both routings: a tiny run's validation records carry the loss under training routing
(``val_loss``) and under a deployed model's causal routing (``val_loss_causal``), plus what the inference rule does
per recursion step, and each number equals an independent computation over the same batches
(tests/pretrain/validation_reference.py: plain forward passes, fractions counted from the model's trace).

The validation split has 10 sequences read in micro-batches of 4 (4 + 4 + 2) and its last sequence ends in
padding, so a mean over batches instead of over real tokens, or over positions, would show."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conf import load_config
from data_prep.shards import Manifest
from pretrain.config import RunConfig
from pretrain.data.loader import IGNORE_INDEX
from pretrain.data.splits import split_loader
from pretrain.training.trainer import Trainer
from tests.pretrain.fixtures import make_shards
from tests.pretrain.validation_reference import reference_metrics

NR = 3          # the tiny presets' recursions
PAD = 5         # padding tokens ending the validation split


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = make_shards(tmp_path_factory.mktemp("shards") / "data", val=10)
    m = Manifest.load(folder)
    m.splits["val"][-1]["pad_tokens"] = PAD
    m.save(folder)
    return folder


def _run(tmp: Path, data: Path, model: str) -> tuple[Trainer, list[dict], list[str]]:
    """Two training steps with validation after the second (the Validation callback); the trainer stays open."""
    cfg = load_config("conf/run/tiny_cpu.yaml", [
        f"model={model}", "model.vocab_size=128", "model.max_seq_len=64", f"data.path={data}", f"out_dir={tmp}",
        "name=val", "train.steps=2", "train.eval_every=2", "train.eval_batches=8", "train.log_every=1",
        "checkpoint.every=0", "checkpoint.resume=none", "logging.wandb=disabled", "parallel.micro_batch_size=4",
        "data.num_workers=0"], schema=RunConfig)
    lines: list[str] = []
    trainer = Trainer(cfg, log=lines.append)
    assert trainer.fit() == 0
    records = [json.loads(x) for x in (tmp / "val/metrics.jsonl").read_text().splitlines()]
    return trainer, [r for r in records if "val_loss" in r], lines


def _reference(trainer: Trainer) -> dict[str, float]:
    batches = list(split_loader(trainer.cfg, "val", dp_rank=0, dp_size=1))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert int((batches[-1][1] == IGNORE_INDEX).sum()) == PAD
    return reference_metrics(trainer.model, batches)


def _check_against(rec: dict, ref: dict) -> None:
    """Losses to 1e-6 relative (one process, the same forward passes summed in another order); fractions to
    1e-6 absolute: one token routed differently moves one by at least 1/(10·32)."""
    for key, want in ref.items():
        tol = dict(rel=1e-6) if key.startswith("val_loss") else dict(abs=1e-6)
        assert rec[key] == pytest.approx(want, **tol), (key, rec[key], want)


@pytest.mark.slow
def test_expert_choice_validation_reports_both_routings_and_the_rule_per_step(tmp_path, data):
    trainer, records, lines = _run(tmp_path, data, "tiny_mor_ec")
    try:
        (rec,) = records
        steps = {f"val_r{r}_{name}" for r in range(1, NR + 1)
                 for name in ("rule_continue", "sampling_acc", "causal_kept")}
        assert set(rec) == {"step", "val_loss", "val_ppl", "val_loss_causal", "val_ppl_causal"} | steps
        ref = _reference(trainer)
        assert set(ref) == {"val_loss", "val_loss_causal"} | steps
        _check_against(rec, ref)
        # the two routings are different computations: top-k over the sequence reads the future
        assert abs(rec["val_loss_causal"] - rec["val_loss"]) > 1e-5
        # step 1: every token is a candidate and top-k keeps them all, so agreeing with top-k is sending on, and
        # the causal pass runs exactly the tokens the rule sends on (the same hidden states reach the router)
        assert rec["val_r1_sampling_acc"] == rec["val_r1_rule_continue"] == rec["val_r1_causal_kept"]
        # hierarchical: a token that stops never runs again
        assert rec["val_r1_causal_kept"] >= rec["val_r2_causal_kept"] >= rec["val_r3_causal_kept"]
        (line,) = [x for x in lines if "val loss" in x]
        assert f"val loss {rec['val_loss']:.4f}" in line and "[training routing]" in line
        assert f"val loss causal {rec['val_loss_causal']:.4f}" in line and "[causal routing, as deployed]" in line
        # the one-number call (the demo's) is still the training-routing loss
        assert trainer.evaluate(lambda *a: None) == rec["val_loss"]
    finally:
        trainer.close()


@pytest.mark.slow
def test_token_choice_routes_causally_already_so_both_losses_are_one_number(tmp_path, data):
    trainer, records, _ = _run(tmp_path, data, "tiny_mor_tc")
    try:
        (rec,) = records
        assert rec["val_loss_causal"] == rec["val_loss"]
        ref = _reference(trainer)
        assert ref["val_loss_causal"] == pytest.approx(ref["val_loss"], rel=1e-6)   # so skipping the pass is right
        assert set(rec) == ({"step", "val_loss", "val_ppl", "val_loss_causal", "val_ppl_causal"}
                            | {f"val_r{r}_causal_kept" for r in range(1, NR + 1)})   # no top-k to agree with
        _check_against(rec, ref)
    finally:
        trainer.close()
