"""``train.compile=true`` through the engine that trains (pretrain/parallel/engine.py), on CPU: the run's model is
compiled in place by DeepSpeed, its training steps are one graph with no graph break, never recompiled, its losses
are the eager run's, and a NaN step is skipped as in an eager run; a layout it cannot compile (ZeRO-3) is one line
before anything is built. tests/model/test_one_graph.py checks the bare model; this checks what ``pretrain.train``
runs.

Stand-in, named: the engine compiles with inductor (``TrainEngine.compile_backend``); here it compiles with aot_eager.
Graph capture, graph breaks and recompilations are dynamo's and AOTAutograd's (forward and backward), the same for
both; only inductor's code generation is left out, which costs minutes of g++ per run on a 2-core machine
(measured on this shared 2-core machine, a 3-step tiny run through pretrain.train: 325 s with inductor and a cold
cache, 38 s with aot_eager, 7 s eager; one graph and no graph break under both backends, losses within 1e-7
relative of the eager ones).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch._dynamo
from torch._dynamo.utils import counters

from pretrain.parallel.engine import TrainEngine
from pretrain.checkpoint import faults
from tests.faults.runs import args, losses, run_main
from tests.pretrain.fixtures import make_shards

NAN_AT = 2   # the trainer's 0-based step (logged as step 3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("compile_data") / "data")


def _train(data: Path, out: Path, name: str, monkeypatch, *extra: str) -> tuple[int, list[int], str]:
    """A 4-step run whose step NAN_AT has a NaN loss: (exit code, dynamo's graph count at the start of each
    step, stderr)."""
    graphs: list[int] = []

    def before_step(step: int, rank: int) -> bool:
        graphs.append(counters["stats"]["unique_graphs"])
        return step == NAN_AT

    monkeypatch.setattr(faults, "before_step", before_step)
    torch._dynamo.reset()
    counters.clear()
    try:
        code, _, err = run_main(args(data, out, name, "train.steps=4", "checkpoint.every=0", *extra))
    finally:
        graphs.append(counters["stats"]["unique_graphs"])
        breaks = sum(counters["graph_break"].values())
        torch._dynamo.reset()
    assert breaks == 0, dict(counters["graph_break"])
    return code, graphs, err


def test_a_compiled_run_is_one_graph_with_the_eager_losses_and_skips_a_nan_step(data, tmp_path, monkeypatch):
    monkeypatch.setattr(TrainEngine, "compile_backend", "aot_eager")   # the stand-in for inductor (module docstring)
    compiled = []
    plain_init = TrainEngine.__init__

    def init(self, *a, **kw):
        plain_init(self, *a, **kw)
        compiled.append(self._ds.is_compiled)

    monkeypatch.setattr(TrainEngine, "__init__", init)
    code, graphs, err = _train(data, tmp_path, "compiled", monkeypatch, "train.compile=true")
    assert code == 0, err
    assert compiled == [True]
    # step 1 compiles one graph (forward and backward), every later step reuses it (the NaN step, whose fault
    # runs eagerly, included)
    assert graphs == [0, 1, 1, 1, 1], graphs
    code, graphs, err = _train(data, tmp_path, "eager", monkeypatch)
    assert code == 0, err
    assert graphs == [0] * 5                        # nothing compiled without train.compile
    got, want = losses(tmp_path / "compiled"), losses(tmp_path / "eager")
    assert got[3] is None and want[3] is None         # skipped: its NaN loss is logged as null
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    del got[3], want[3]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), (step, got, want)
    last = json.loads((tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["skipped_steps"] == 1


def test_compile_with_zero3_is_one_line_before_anything_is_built(data, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("pretrain.parallel.engine.build_stage", lambda *a, **kw: built.append(1))
    code, out, err = run_main(args(data, tmp_path, "z3", "train.compile=true", "parallel.zero_stage=3"))
    assert code == 2 and not built
    assert err.count("\n") == 1 and err.startswith("error: train.compile=true: ") and "zero_stage=3" in err, err
