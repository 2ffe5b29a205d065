"""``--baseline FILE`` of the benchmarks: the yardstick's JSON lines are read as it prints them, the run at the
asked micro-batch is picked, ratios are tokens/s over its tokens/s, and a bad file is one line before any GPU
work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conf.errors import ConfigError
from pretrain.tools.baseline import ratio, read_baseline
from tests.distributed.harness import ROOT

ANCHOR = """\
W1130 12:00:00 some library chatter
{"cfg": "360m", "params_M": 361.8, "B": 16, "T": 2048, "compile": true, "tok_s": 129800, "mfu_vs_989T": 0.3, "mem_GB": 40.1}
{"cfg": "360m", "params_M": 361.8, "B": 32, "T": 2048, "compile": true, "tok_s": 131000, "mfu_vs_989T": 0.31, "mem_GB": 70.2}
"""


def test_picks_the_run_at_the_asked_micro_batch(tmp_path):
    f = tmp_path / "anchor.jsonl"
    f.write_text(ANCHOR)
    assert read_baseline(str(f))["B"] == 16
    assert read_baseline(str(f), 32)["tok_s"] == 131000
    assert ratio(259600, read_baseline(str(f), 16)) == 2.0
    assert ratio(None, read_baseline(str(f))) is None
    with pytest.raises(ConfigError, match="no run at micro-batch 8 .it has 16, 32"):
        read_baseline(str(f), 8)


@pytest.mark.parametrize("text, says", [("{not json\n", "line 1: not a JSON object"),
                                        ('{"cfg": "360m"}\n', "no run with tokens/s")])
def test_a_bad_baseline_file_is_named(tmp_path, text, says):
    f = tmp_path / "anchor.jsonl"
    f.write_text(text)
    with pytest.raises(ConfigError, match=says):
        read_baseline(str(f))


@pytest.mark.slow
@pytest.mark.parametrize("module", ["pretrain.tools.model_bench", "pretrain.tools.bench"])
def test_a_missing_baseline_is_one_line_before_any_gpu_work(tmp_path, module):
    done = subprocess.run([sys.executable, "-m", module, "360m_mor_ec", "--baseline", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot be read" in lines[0], done.stderr
