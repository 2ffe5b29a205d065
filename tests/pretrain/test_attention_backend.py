"""``attention_backend=auto``: flash-attn on CUDA when it is importable, SDPA otherwise, decided once at start-up
for the whole model and logged."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import model.attention as attention
from conf.errors import ConfigError
from model.layers import Attention, use_attention_backend
from model.mor import MoRModel
from tests.distributed.harness import ROOT
from tests.model.helpers import tiny
from tests.pretrain.fixtures import make_shards


def _backends(m: torch.nn.Module) -> set[str]:
    return {a.backend for a in m.modules() if isinstance(a, Attention)}


def test_auto_on_cpu_is_sdpa_for_every_layer():
    m = MoRModel(tiny(routing="expert_choice", sharing="middle_cycle", attention_backend="auto"))
    assert _backends(m) == {"auto"}
    assert use_attention_backend(m, torch.device("cpu")) == "sdpa"
    assert _backends(m) == {"sdpa"}


def test_auto_takes_flash_on_cuda_when_importable(monkeypatch):
    """What cannot run here (CUDA, flash-attn) is stood in for: ``mock_flash_attn_func`` and a CUDA flag."""
    def mock_flash_attn_func(*args, **kwargs):
        raise AssertionError("not called: only the choice is tested here")

    monkeypatch.setattr(attention, "_flash_attn_func", mock_flash_attn_func)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.resolve_backend("auto", torch.device("cuda")) == "flash"
    assert attention.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert attention.resolve_backend("sdpa", torch.device("cuda")) == "sdpa"
    monkeypatch.setattr(attention, "_flash_attn_func", None)
    assert attention.resolve_backend("auto", torch.device("cuda")) == "sdpa"


def test_flash_without_flash_attn_is_a_config_error(monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn_func", None)
    with pytest.raises(ConfigError, match="model.attention_backend"):
        attention.resolve_backend("flash", torch.device("cpu"))


@pytest.mark.slow
def test_trainer_logs_the_choice_once(tmp_path):
    data = make_shards(tmp_path / "data")
    out = subprocess.run([sys.executable, "-m", "pretrain.train", "tiny_cpu", "model.vocab_size=128",
                          "model.max_seq_len=64", f"data.path={data}", f"out_dir={tmp_path}", "train.steps=1",
                          "train.eval_every=0", "checkpoint.every=0", "logging.wandb=disabled",
                          "parallel.micro_batch_size=2"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("attention:")]
    assert lines == ["attention: sdpa (model.attention_backend=auto)"], out.stdout


@pytest.mark.gpu
def test_auto_on_cuda_is_flash_iff_importable():
    m = MoRModel(tiny(routing="token_choice", sharing="middle_cycle", attention_backend="auto")).cuda()
    want = "flash" if attention.flash_available() else "sdpa"
    assert use_attention_backend(m, torch.device("cuda")) == want
    assert _backends(m) == {want}
    x = torch.randint(0, m.cfg.vocab_size, (2, 33), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x[:, :-1], x[:, 1:])
    assert torch.isfinite(out.loss)
