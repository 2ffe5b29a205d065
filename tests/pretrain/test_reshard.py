"""Resuming under another parallel layout (pretrain/checkpoint/reshard.py): a checkpoint saved under one layout
continues under another — weights, Adam moments and step re-sharded, the data position carried over (with a fixed
number of readers the data order does not depend on the number of data-parallel ranks) — and the losses after the
switch equal, within fp32 tolerance, those of the run that went on under the original layout; runs on different
layouts with the same seed agree from the first step. Real `python -m pretrain.train` processes (gloo, fp32, tiny
model).

Tolerance 1e-5 relative over the 5 steps after the switch: the layouts sum in other orders (TP's split matmuls,
the pipeline's replicas), ~1e-7 per step here. Moments that were lost (started from zero) move the losses by
~1e-2 within two steps, and a wrong step count (Adam's bias correction) by ~1e-3: both far outside it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.pretrain.fixtures import make_shards, with_tokenizer
from tests.pretrain.test_trainer import step_losses, train

STEPS, SWITCH, VOCAB = 10, 5, 384


def _args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [f"data.path={tmp / 'data'}", f"out_dir={tmp / 'runs'}", f"name={name}", f"train.steps={STEPS}",
            "train.log_every=1", "train.eval_every=0", f"checkpoint.every={SWITCH}", "logging.wandb=disabled",
            "model.max_seq_len=64", f"model.vocab_size={VOCAB}", "data.num_workers=0", "parallel.micro_batch_size=4", "optim.lr=3e-3",
            # 2 readers and a global batch of 8: the same samples per step under 1 process (2 micro-batches
            # accumulated) and 2 data-parallel ranks (pretrain/data/loader.py)
            "data.readers=2", "parallel.global_batch_size=8", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The data, and the run that goes on under one process (ZeRO-0) from start to end."""
    tmp = tmp_path_factory.mktemp("reshard")
    with_tokenizer(make_shards(tmp / "data", vocab=VOCAB), VOCAB)   # a real tokenizer: the runs are exported too
    train(tmp, 1, _args(tmp, "one", "parallel.zero_stage=0"), tag="one")
    return tmp


@pytest.fixture(scope="module")
def tp2pp2(runs) -> Path:
    """The same run under TP=2 × PP=2 with ZeRO-1, start to end."""
    layout = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.zero_stage=1"]
    train(runs, 4, _args(runs, "tp2pp2", *layout), tag="tp2pp2")
    return runs / "runs" / "tp2pp2"


@pytest.fixture(scope="module")
def dp2(runs) -> Path:
    """The same run's first 2 steps under DP=2 with ZeRO-3 (a checkpoint at the end)."""
    train(runs, 2, _args(runs, "dp2", "parallel.zero_stage=3", "train.steps=2", "checkpoint.every=0"), tag="dp2")
    return runs / "runs" / "dp2"


def _switch(tmp: Path, saved: str, world: int, layout: list[str], name: str) -> None:
    at = tmp / "runs" / saved / "checkpoints" / f"step-{SWITCH:06d}"
    train(tmp, world, _args(tmp, name, f"checkpoint.resume={at}", *layout), tag=name)
    want, got = step_losses(tmp / "runs" / saved), step_losses(tmp / "runs" / name)
    assert sorted(got) == list(range(SWITCH + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=0), (step, got, want)
    log = (tmp / f"{name}-0.log").read_text()
    assert "re-sharded for" in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                                     "parallel.zero_stage=2"],
                                    ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"],
                                    ["parallel.zero_stage=2"], ["parallel.zero_stage=3"]],
                         ids=["to-tp2-sp-zero2", "to-pp2-zero1", "to-dp2-zero2", "to-dp2-zero3"])
def test_one_process_resumes_under_two(runs, layout):
    _switch(runs, "one", 2, layout, "to-" + "-".join(w.split(".")[1].replace("=", "") for w in layout))


@pytest.mark.slow
def test_two_data_parallel_ranks_start_as_one_process_and_zero3_moves_both_ways(runs, dp2):
    one, two = step_losses(runs / "runs" / "one"), step_losses(dp2)
    assert sorted(two) == [1, 2]
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=0), (step, one, two)
    # ZeRO-3's partitions, read: its step-2 checkpoint continued by one process is the one-process run
    at = runs / "runs" / "dp2" / "checkpoints" / "step-000002"
    train(runs, 1, _args(runs, "dp2-to-one", f"checkpoint.resume={at}", "parallel.zero_stage=0", "train.steps=4"),
          tag="dp2-to-one")
    back = step_losses(runs / "runs" / "dp2-to-one")
    assert sorted(back) == [3, 4]
    for step in back:
        assert back[step] == pytest.approx(one[step], rel=1e-5, abs=0), (step, one, back)


@pytest.mark.slow
def test_tp2_pp2_resumes_under_one_process(runs, tp2pp2):
    # the same seed starts both layouts from the same weights (model/init.py), so with the same data the two
    # runs agree from the first step on
    one, four = step_losses(runs / "runs" / "one"), step_losses(tp2pp2)
    assert sorted(one) == sorted(four) == list(range(1, STEPS + 1))
    for step in one:
        assert four[step] == pytest.approx(one[step], rel=1e-5, abs=0), (step, one, four)
    _switch(runs, "tp2pp2", 1, ["parallel.zero_stage=0"], "back-to-one")


@pytest.mark.slow
def test_readers_that_the_new_layout_cannot_share_are_one_line(runs):
    at = runs / "runs" / "one" / "checkpoints" / f"step-{SWITCH:06d}"
    args = _args(runs, "three-workers", f"checkpoint.resume={at}", "data.readers=0", "data.num_workers=3")
    codes = train(runs, 1, args, check=False, tag="three-workers")
    log = (runs / "three-workers-0.log").read_text()
    assert codes == [2], log[-2000:]
    err = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "its data position is in 2 readers" in err[0] and "Traceback" not in log


@pytest.mark.slow
def test_checkpoints_of_every_layout_export_to_hugging_face(runs, tp2pp2, dp2, tmp_path):
    """One process, TP=2 × PP=2 (ZeRO-1) and DP=2 ZeRO-3 checkpoints, exported (pretrain/export.py) and loaded with
    transformers' Auto class, give the logits of the checkpoint's own model under causal routing (1e-5, fp32)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from pretrain.export import export_run
    from pretrain.checkpoint.consolidate import load
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    for run in (runs / "runs" / "one", tp2pp2, dp2):
        out = tmp_path / run.name
        export_run(run, out)
        hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            want = load(run).model(tokens, causal_routing=True).logits
            got = hf(tokens).logits
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0), run.name
