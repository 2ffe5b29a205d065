"""conf.run_file, the one resolver of run names (pretrain.train, pretrain.sweep, pretrain.tools.demo)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conf import RUN_DIR, ConfigError, run_file

ROOT = Path(__file__).resolve().parents[2]


def test_a_name_is_a_run_file_and_a_path_is_itself(tmp_path):
    assert run_file("tiny_cpu") == RUN_DIR / "tiny_cpu.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\n")
    assert run_file(own) == own and run_file(str(own)) == own


def test_an_unknown_run_is_one_line_listing_the_known_ones(monkeypatch):
    monkeypatch.chdir(ROOT)  # the folder is named relative to the working directory
    known = ", ".join(sorted(p.stem for p in RUN_DIR.glob("*.yaml")))
    with pytest.raises(ConfigError) as info:
        run_file("tiny_cpux")
    assert str(info.value) == (f"unknown run 'tiny_cpux'; known runs: {known} "
                               "(run files live in conf/run/; or give a path)")
    with pytest.raises(ConfigError, match=r"^no/such\.yaml: run file not found$"):
        run_file("no/such.yaml")


@pytest.mark.slow
def test_train_reports_an_unknown_run_in_one_line():
    out = subprocess.run([sys.executable, "-m", "pretrain.train", "tiny_cpux"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown run 'tiny_cpux'; known runs: ") and out.stderr.count("\n") == 1, \
        out.stderr
