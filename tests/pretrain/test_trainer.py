"""The training loop: exact resume after SIGKILL, collective save on preemption, non-finite losses, MFU,
config checks on resume. Runs are real `python -m pretrain.train` processes (gloo, fp32, tiny model)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conf import config_to_dict, load_config
from model.config import ConfigError
from model.flops import training_flops
from pretrain.config import RunConfig
from pretrain.metrics import mfu
from pretrain.preempt import REQUEUE_EXIT_CODE
from pretrain.trainer import NONFINITE_EXIT_CODE, Trainer, config_mismatch
from tests.distributed.harness import spawn_ranks
from tests.pretrain.fixtures import make_shards

RUN = "conf/run/tiny_cpu.yaml"
STEPS = 8


def overrides(tmp: Path, *extra: str) -> list[str]:
    return [f"data.path={tmp / 'data'}", f"out_dir={tmp / 'runs'}", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_every=0", "checkpoint.every=2", "logging.wandb=disabled", "model.max_seq_len=64",
            "data.num_workers=0", "parallel.micro_batch_size=4", *extra]


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step winning (a resumed run logs repeated steps again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "event" not in rec:
            out[rec["step"]] = rec["loss"]
    return out


def train(tmp: Path, world: int, args: list[str], env: dict | None = None, check: bool = True, tag: str = "run"):
    return spawn_ranks(world, ["-m", "pretrain.train", RUN, *args], tmp, env=env, check=check, prefix=f"{tag}-")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_shards(root / "data")
    return root / "data"


def _tmp_with_data(tmp_path: Path, data: Path) -> Path:
    (tmp_path / "data").symlink_to(data)
    return tmp_path


@pytest.mark.parametrize("world,layout", [(1, []), (2, ["parallel.zero_stage=2"]), (2, ["parallel.tensor_parallel=2"])],
                         ids=["1proc", "dp2-zero2", "tp2"])
def test_sigkill_then_resume_gives_the_same_losses_bit_for_bit(tmp_path, data, world, layout):
    tmp = _tmp_with_data(tmp_path, data)
    straight = overrides(tmp, "name=straight", *layout)
    train(tmp, world, straight, tag="straight")
    resumed = overrides(tmp, "name=resumed", *layout)
    codes = train(tmp, world, resumed, env={"MOR_FAULT_KILL_AT_STEP": "5"}, check=False, tag="killed")
    assert all(c == -signal.SIGKILL for c in codes), codes
    assert (tmp / "runs/resumed/checkpoints/latest").read_text().strip() == "step-000004"
    train(tmp, world, resumed, tag="resume")
    a, b = step_losses(tmp / "runs/straight"), step_losses(tmp / "runs/resumed")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a == b  # exact float equality, every step


def test_sigusr1_on_one_rank_saves_the_same_step_everywhere_and_asks_for_requeue(tmp_path, data):
    tmp = _tmp_with_data(tmp_path, data)
    args = overrides(tmp, "name=preempted", "checkpoint.every=0")
    codes = train(tmp, 2, args, env={"MOR_FAULT_SIGNAL_AT_STEP": "3", "MOR_FAULT_SIGNAL_RANK": "1"}, check=False,
                  tag="signal")
    assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    ckpt = tmp / "runs/preempted/checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-000004"
    assert {p.name for p in (ckpt / "step-000004").glob("trainer*.pt")} == {
        "trainer.pt", "trainer-rank-0.pt", "trainer-rank-1.pt"}
    train(tmp, 2, args, tag="after")
    assert sorted(step_losses(tmp / "runs/preempted")) == list(range(1, STEPS + 1))


def test_resume_with_a_different_model_is_one_clear_error(tmp_path, data):
    tmp = _tmp_with_data(tmp_path, data)
    train(tmp, 1, overrides(tmp, "name=mm"), tag="first")
    codes = train(tmp, 1, overrides(tmp, "name=mm", "model.router.alpha=0.2", "optim.weight_decay=0.0"),
                  check=False, tag="changed")
    assert codes == [2]
    err = [ln for ln in (tmp / "changed-0.log").read_text().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "model.router.alpha" in err[0] and "optim.weight_decay" in err[0]


def test_config_mismatch_ignores_keys_that_may_change():
    a = config_to_dict(load_config(RUN, [], schema=RunConfig))
    b = config_to_dict(load_config(RUN, ["train.steps=999", "checkpoint.every=7", "optim.lr=1e-4",
                                         "model.num_recursions=4", "model.n_layers=10"], schema=RunConfig))
    assert config_mismatch(a, b) == ["model.n_layers", "model.name", "model.num_recursions"] or \
        config_mismatch(a, b) == ["model.n_layers", "model.num_recursions"]


# ---- in-process: non-finite handling ---------------------------------------------------------------------------
def _trainer(tmp: Path, *extra: str) -> Trainer:
    cfg = load_config(RUN, overrides(tmp, "name=inproc", "checkpoint.resume=none", *extra), schema=RunConfig)
    return Trainer(cfg, log=lambda *a: None)


def test_nan_loss_is_skipped_without_moving_the_weights(tmp_path, data):
    t = _tmp_with_data(tmp_path, data)
    trainer = _trainer(t)
    try:
        trainer.train_step()
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        rec = trainer.train_step(inject_nan=True)
        assert not rec["finite"]
        assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        rec = trainer.train_step()
        assert rec["finite"] and not all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    finally:
        trainer.close()


def test_nan_loss_stops_the_run_when_configured(tmp_path, data):
    t = _tmp_with_data(tmp_path, data)
    trainer = _trainer(t, "on_nonfinite=stop", "checkpoint.every=0")
    try:
        assert trainer.fit(nan_at_step=2) == NONFINITE_EXIT_CODE
        events = [json.loads(ln) for ln in (t / "runs/inproc/metrics.jsonl").read_text().splitlines()]
        assert events[-1]["event"] == "nonfinite_stop" and events[-1]["step"] == 2
        assert not (t / "runs/inproc/checkpoints").exists()  # nothing after the last good checkpoint is saved
    finally:
        trainer.close()


def test_mfu_is_tokens_per_second_times_flops_per_token_over_peak():
    cfg = load_config("360m_mor_ec")
    f = training_flops(cfg, 2048).training_per_token
    assert mfu(100_000, f, 989e12, 1) == pytest.approx(100_000 * f / 989e12)
    assert mfu(800_000, f, 989e12, 8) == pytest.approx(mfu(100_000, f, 989e12, 1))
    assert mfu(1.0, f, None, 1) is None


def test_missing_data_is_a_config_error(tmp_path):
    cfg = load_config(RUN, [f"data.path={tmp_path / 'nothing'}"], schema=RunConfig)
    with pytest.raises(ConfigError, match="data.path: .*no manifest"):
        Trainer(cfg)
