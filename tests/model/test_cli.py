"""Entry points: pretrain.tools.inspect prints one JSON object; every entry point explains itself; bad config is
one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_inspect_prints_counts_and_flops_for_360m_mor():
    res = run("-m", "pretrain.tools.inspect", "360m_mor_ec", "--seq-len", "2048")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["unique_params"] == 165_177_600 and info["vanilla_equal_depth"]["params"] == 361_821_120
    assert info["layers_per_recursion"] == 10 and info["sharing"] == "middle_cycle"
    assert info["tokens_per_step"] == [2048, 1365, 682]
    assert info["layer_plan"].startswith("0 | 1 2 3") and info["layer_plan"].endswith("| 11")
    assert 0.6 < info["flops_ratio_vs_vanilla"] < 0.8


def test_inspect_bad_override_is_one_line_without_traceback():
    res = run("-m", "pretrain.tools.inspect", "360m_mor_ec", "n_kv_heads=4")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert lines == ["error: override 'n_kv_heads=4': n_kv_heads: n_heads=15 is not divisible by n_kv_heads=4"]


@pytest.mark.parametrize("module", ["pretrain.tools.inspect", "pretrain.train", "pretrain.sweep", "pretrain.tools.demo",
                                    "pretrain.tools.bench", "pretrain.tools.model_bench", "pretrain.tools.data_bench",
                                    "pretrain.tools.loss_memory",
                                    "pretrain.tools.plot", "pretrain.study", "pretrain.fewshot",
                                    "pretrain.export", "pretrain.import_hf", "pretrain.plan_layout"])
def test_entry_points_have_help(module):
    res = run("-m", module, "--help")
    assert res.returncode == 0 and "usage:" in res.stdout and len(res.stdout.splitlines()) > 4
