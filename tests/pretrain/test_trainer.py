"""The training loop: exact resume after SIGKILL, collective save on preemption, non-finite losses, MFU,
config checks on resume. Runs are real `python -m pretrain.train` processes (gloo, fp32, tiny model)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from conf import config_to_dict, load_config
from conf.errors import ConfigError
from model.config import ModelConfig
from model.flops import training_flops
from pretrain.config import RunConfig
from pretrain.training.metrics import mfu
from pretrain.training.preempt import REQUEUE_EXIT_CODE
from pretrain.checkpoint.resume import config_mismatch
from pretrain.training.trainer import NONFINITE_EXIT_CODE, Trainer
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    """In this process, through the entry point's main() (a spawned process would show nothing more)."""
    from tests.faults.runs import run_main
    tmp = _tmp_with_data(tmp_path, data)
    assert run_main(overrides(tmp, "name=mm"), RUN)[0] == 0
    code, out, err = run_main(overrides(tmp, "name=mm", "model.router.alpha=0.2", "optim.weight_decay=0.0"), RUN)
    assert code == 2, out + err
    lines = [ln for ln in (out + err).splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "model.router.alpha" in lines[0] and "optim.weight_decay" in lines[0]
    # A changed shape: the configs are compared before any weight is loaded, so no page of size mismatches.
    code, out, err = run_main(overrides(tmp, "name=mm", "model.d_model=96"), RUN)
    text = out + err
    assert code == 2, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "model.d_model" in lines[0] and "size mismatch" not in text and "Traceback" not in text


def test_config_mismatch_ignores_keys_that_may_change():
    a = config_to_dict(load_config(RUN, [], schema=RunConfig))
    b = config_to_dict(load_config(RUN, ["train.steps=999", "checkpoint.every=7", "optim.lr=1e-4",
                                         "model.num_recursions=4", "model.n_layers=10"], schema=RunConfig))
    assert config_mismatch(a, b) == ["model.n_layers", "model.name", "model.num_recursions"] or \
        config_mismatch(a, b) == ["model.n_layers", "model.num_recursions"]


@pytest.mark.slow
def test_training_on_a_terminal_shows_a_progress_bar_with_rate_and_eta(tmp_path, data):
    """stderr on a terminal: a tqdm bar over the steps; the log lines still come, as lines."""
    import os
    import pty
    import subprocess
    import sys

    tmp = _tmp_with_data(tmp_path, data)
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # a terminal 160 columns wide
    # Not this test process's own rendezvous variables (set by its one-process world): a fresh single process.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.train", RUN, *overrides(tmp, "name=bar")],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:          # the other end closed: the process is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    out, _ = proc.communicate(timeout=300)
    os.close(master)
    bar = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, bar
    assert "train: 100%" in bar and f"{STEPS}/{STEPS}" in bar and ("step/s" in bar or "s/step" in bar), bar
    assert "<" in bar and ", " in bar and "tok/s]" in bar, bar        # ETA; loss and tokens/s in the postfix
    log_lines = [ln for ln in bar.replace("\r", "\n").splitlines() if ln.startswith("step ") and "gnorm" in ln]
    assert len(log_lines) == STEPS and "gnorm" not in out.decode()    # the log lines are written above the bar


def test_a_file_gets_log_lines_and_no_bar(tmp_path, data):
    """Output that is no terminal (here main()'s, captured in this process): lines, no bar."""
    from tests.faults.runs import run_main
    tmp = _tmp_with_data(tmp_path, data)
    code, out, err = run_main(overrides(tmp, "name=nobar"), RUN)
    text = out + err
    assert code == 0, text
    assert "step/s" not in text and "s/step" not in text and "\r" not in text
    assert sum(ln.startswith("step ") and "tok/s" in ln for ln in text.splitlines()) == STEPS


@pytest.mark.slow
def test_resume_restores_the_rng_states_saved_in_the_checkpoint(tmp_path, data):
    """Nothing in training draws from the global RNGs today, so compare the restored states with the saved ones
    directly (after drawing from every RNG, so that they differ from any freshly seeded state)."""
    import random

    import numpy as np

    t = _tmp_with_data(tmp_path, data)
    trainer = _trainer(t, "checkpoint.resume=auto")
    try:
        torch.rand(7), np.random.rand(3), random.random()
        assert trainer.fit() == 0
    finally:
        trainer.close()
    saved = torch.load(t / "runs/inproc/checkpoints/step-000008/trainer-rank-0.pt", weights_only=False)["rng"]
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    fresh = torch.get_rng_state()
    assert not torch.equal(saved["torch"], fresh)
    resumed = _trainer(t, "checkpoint.resume=auto")
    try:
        assert resumed.step == STEPS
        assert torch.equal(torch.get_rng_state(), saved["torch"])
        state = np.random.get_state()
        assert state[0] == saved["numpy"][0] and np.array_equal(state[1], saved["numpy"][1]) \
            and state[2:] == saved["numpy"][2:]
        assert random.getstate() == saved["python"]
    finally:
        resumed.close()


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
        assert events[-1]["event"] == "nonfinite_stop" and events[-1]["step"] == 3   # the third step
        assert not (t / "runs/inproc/checkpoints").exists()  # nothing after the last good checkpoint is saved
    finally:
        trainer.close()


def test_mfu_is_tokens_per_second_times_flops_per_token_over_peak():
    cfg = load_config("360m_mor_ec", schema=ModelConfig)
    f = training_flops(cfg, 2048).training_per_token
    assert mfu(100_000, f, 989e12, 1) == pytest.approx(100_000 * f / 989e12)
    assert mfu(800_000, f, 989e12, 8) == pytest.approx(mfu(100_000, f, 989e12, 1))
    assert mfu(1.0, f, None, 1) is None


def test_missing_data_is_a_config_error(tmp_path):
    cfg = load_config(RUN, [f"data.path={tmp_path / 'nothing'}"], schema=RunConfig)
    with pytest.raises(ConfigError, match="data.path: .*no manifest"):
        Trainer(cfg)
