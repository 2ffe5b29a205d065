"""The planner in one process: which layouts it lists, its formulas against hand counts, the command line."""
from __future__ import annotations

import json

import pytest

from conf import load_config, run_file
from model.config import ModelConfig
from pretrain.config import RunConfig
from pretrain.parallel.layout import ParallelConfig, check_layout
from pretrain.plan.cli import main
from pretrain.plan.layouts import Cluster, candidates, plan
from pretrain.plan.memory import stage_memory
from pretrain.plan.shapes import Layout, layer_ops, stage_params
from pretrain.plan.timing import Links, collective_time, spans_nodes
from pretrain.plan.traffic import Precision, stage_traffic
from tests.model.helpers import tiny

BF16 = Precision.of("bf16")


def preset(name: str) -> ModelConfig:
    return load_config(name, schema=ModelConfig)


def cluster(gpus: int, per_node: int = 8) -> Cluster:
    return Cluster(gpus, per_node, 80e9, 0.4 * 989e12)


# ---- which layouts ---------------------------------------------------------------------------------------------
def test_listed_layouts_are_exactly_the_valid_ones():
    """360M has 15 heads and 5 kv heads: TP 5 or 15 would shard them, but neither divides 8 GPUs per node, so only
    TP = 1 is listed; every listed layout passes the project's own check_layout, and ZeRO-2/3 never come with PP."""
    cfg = preset("360m_mor_ec")
    listed = list(candidates(cfg, cluster(16), 64, (False,), 64))
    assert listed and {lay.tp for lay in listed} == {1}
    for lay in listed:
        assert check_layout(ParallelConfig(lay.tp, lay.pp, lay.sp, lay.zero, lay.micro_batch, lay.global_batch),
                            16, cfg) == lay.dp
        assert lay.pp == 1 or lay.zero <= 1
        assert lay.global_batch == 64


def test_tp_groups_stay_inside_a_node():
    """1.7B's 32 heads allow TP = 8, which 4 GPUs per node cannot hold in one node."""
    cfg = preset("1b7_mor_ec")
    assert max(lay.tp for lay in candidates(cfg, cluster(16, 8), 64, (False,), 8)) == 8
    assert max(lay.tp for lay in candidates(cfg, cluster(16, 4), 64, (False,), 8)) == 4


def test_no_more_stages_than_layers():
    """tiny_mor_ec unrolls to 8 layers: 16 GPUs give PP up to 8, never 16."""
    cfg = preset("tiny_mor_ec")
    pps = {lay.pp for lay in candidates(cfg, cluster(16, 16), 16, (False,), 16)}
    assert max(pps) == 8 and 16 not in pps


def test_heads_not_divisible_are_not_listed():
    cfg = tiny(sharing="none", n_layers=4, n_heads=6, n_kv_heads=3, d_model=48)
    assert {lay.tp for lay in candidates(cfg, cluster(8), 8, (False,), 8)} == {1}


# ---- formulas --------------------------------------------------------------------------------------------------
def _tp_bytes(name: str) -> float:
    lay = Layout(tp=2, pp=1, dp=32, zero=0, sp=False, micro_batch=16, micro_batches=2)
    return stage_traffic(preset(name), lay, 0, 2048, BF16)[("all_reduce", "tp")]


def test_recursion_tp_bytes_shrink_with_capacity():
    """1.7B, TP = 2, 2 micro-batches of 16 × 2048 tokens, bf16. Per layer op on n tokens: 4 all-reduces of
    16·n·2048·2 bytes. The recursive model runs its 26 layer ops on 2048 tokens; MoR expert-choice runs the 8
    layers of recursion steps 2 and 3 on k = ⌊2/3·2048⌋ = 1365 and ⌊1/3·2048⌋ = 682 tokens. The embedding, the
    head and the loss are the same in both."""
    per_token = 2 * 4 * 16 * 2048 * 2                                     # micro-batches × all-reduces × b·d·e
    recursive = 26 * 2048 * per_token
    mor = (2 + 8) * 2048 * per_token + 8 * (1365 + 682) * per_token
    common = 2 * (16 * 2048 * 2048 * 2 * 2 + 16 * 2048 * 3 * 4)         # embedding; head input grad + loss, fp32
    assert _tp_bytes("1b7_recursive") == recursive + common
    assert _tp_bytes("1b7_mor_ec") == mor + common
    assert (_tp_bytes("1b7_recursive") - common) / (_tp_bytes("1b7_mor_ec") - common) == pytest.approx(
        26 * 2048 / (10 * 2048 + 8 * (1365 + 682)))


def test_pipeline_bubble_is_1f1b():
    cfg = preset("1b7_mor_ec")
    for pp, m in ((2, 4), (4, 8), (8, 2)):
        lay = Layout(tp=1, pp=pp, dp=64 // pp, zero=1, sp=False, micro_batch=2, micro_batches=m)
        pred = next(p for p in plan(cfg, cluster(64), global_batch=lay.global_batch, seq_len=2048, precision=BF16,
                                    max_micro_batch=2) if p.layout == lay)
        assert pred.time.bubble == pytest.approx((pp - 1) / (m + pp - 1))


def test_ring_alpha_beta():
    links = Links(intra_bw=100.0, inter_bw=10.0, intra_alpha=1.0, inter_alpha=5.0)
    assert collective_time("all_reduce", 8, 800.0, 1, False, links) == pytest.approx(2 * 7 * 1.0 + 2 * 7 / 8 * 8)
    assert collective_time("all_gather", 4, 400.0, 2, True, links) == pytest.approx(2 * 3 * 5.0 + 3 / 4 * 40)
    assert collective_time("p2p_send", 2, 100.0, 3, True, links) == pytest.approx(3 * 5.0 + 10)


def test_which_groups_cross_nodes():
    lay = Layout(tp=2, pp=2, dp=4, zero=1, sp=False, micro_batch=1, micro_batches=1)
    assert not spans_nodes(lay, "tp", 8) and not spans_nodes(lay, "dp", 8) and spans_nodes(lay, "pp", 8)
    assert spans_nodes(lay, "dp", 4)


def test_zero_stages_shard_the_model_state():
    """Weights + gradients + optimizer state per GPU: ZeRO-0 ≥ 1 ≥ 2 ≥ 3, and ZeRO-1's optimizer state is ZeRO-0's
    fp32 master and moments (12 B per parameter in bf16) divided by DP."""
    cfg = preset("1b7_mor_ec")
    psi = sum(p.numel for p in stage_params(cfg, 1, 1, 0))
    states = []
    for zero in range(4):
        m = stage_memory(cfg, Layout(1, 1, 8, zero, False, 1, 4), 0, 2048, BF16)
        states.append(m.weights + m.gradients + m.optimizer)
        if zero == 0:
            assert m.optimizer == 12 * psi
        if zero == 1:
            assert m.optimizer == pytest.approx(12 * psi / 8, rel=1e-6)
    assert states == sorted(states, reverse=True) and states[3] < states[0] / 4


def test_activations_follow_the_capacities():
    """A MoR expert-choice micro-batch keeps less for backward than the recursive model of the same shapes, by the
    tokens its recursion steps drop."""
    lay = Layout(1, 1, 8, 1, False, 4, 1)
    ops = {n: layer_ops(preset(n), 1, 0, 2048, False) for n in ("1b7_recursive", "1b7_mor_ec")}
    assert sum(o.tokens for o in ops["1b7_recursive"]) == 26 * 2048
    assert sum(o.tokens for o in ops["1b7_mor_ec"]) == 10 * 2048 + 8 * (1365 + 682)
    rec, mor = (stage_memory(preset(n), lay, 0, 2048, BF16).activations for n in ops)
    assert 0.65 < mor / rec < 0.75


# ---- the command line ------------------------------------------------------------------------------------------
def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


IMPOSSIBLE = {
    "partial-node": (("1b7_mor_ec", "--gpus", "60"), "--gpus 60 is not a multiple of --gpus-per-node 8"),
    "unknown-preset": (("1b7_mor_xyz", "--gpus", "64"), "neither a run file of conf/run nor a model preset"),
    "zero-gpus": (("1b7_mor_ec", "--gpus", "0"), "--gpus: must be > 0"),
    "not-a-number": (("1b7_mor_ec", "--gpus", "eight"), "invalid int value"),
    "mfu-above-1": (("1b7_mor_ec", "--gpus", "64", "--mfu", "1.5"), "--mfu: must be in (0, 1]"),
    "bad-alpha": (("1b7_mor_ec", "--gpus", "64", "--alpha-us", "fast"), "--alpha-us"),
    "negative-bandwidth": (("1b7_mor_ec", "--gpus", "64", "--intra-bw", "-1"), "--intra-bw: must be > 0"),
    "no-valid-layout": (("tiny_mor_ec", "--gpus", "1024", "--global-batch", "3"),
                        "no layout of 1024 GPUs can run tiny_mor_ec"),
    "nothing-fits": (("1b7_mor_ec", "--gpus", "8", "--gpu-memory-gb", "1"), "none of the"),
}


@pytest.mark.parametrize("argv,says", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_impossible_requests_are_one_line(capsys, argv, says):
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert "Traceback" not in err


def test_table_and_sbatch_line(capsys):
    """The run file's global batch and micro-batch; the sbatch line's overrides load into the run config and give
    the best layout back."""
    code, out, err = _run(capsys, "1b7_mor_ec", "--gpus", "64", "--top", "5")
    assert code == 0, err
    lines = out.splitlines()
    assert "global batch 1024 x 2048 tokens, bf16" in lines[0] and "8 node(s) x 8 H100" in lines[1]
    head = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("#"))
    rows = lines[head + 2:head + 7]
    assert len(rows) == 5 and all(len(r) == len(lines[head]) for r in rows), "aligned columns"
    sbatch = lines[-1].split()
    assert sbatch[:4] == ["sbatch", "--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8"]
    assert sbatch[4] == "slurm/mor_1b7.sh"
    run = load_config(run_file("1b7_mor_ec"), sbatch[5:], schema=RunConfig)
    assert run.parallel.global_batch_size == 1024
    tp, pp = run.parallel.tensor_parallel, run.parallel.pipeline_parallel
    assert check_layout(run.parallel, 64, run.model) == 64 // (tp * pp)


def test_json_lists_every_stage(capsys):
    """--json: every row's stages; by default each layout once (its fastest micro-batch), with
    --all-micro-batches every micro-batch size."""
    code, out, _ = _run(capsys, "tiny_mor_ec", "--gpus", "8", "--top", "500", "--json", "--precision", "fp32")
    shapes = [tuple(r["layout"][k] for k in ("tp", "sp", "pp", "dp", "zero", "checkpointing"))
              for r in json.loads(out)["layouts"]]
    assert code == 0 and len(shapes) == len(set(shapes)) > 10
    code, out, _ = _run(capsys, "tiny_mor_ec", "--gpus", "8", "--top", "50", "--json", "--precision", "fp32",
                        "--all-micro-batches")
    assert code == 0
    data = json.loads(out)
    assert data["request"]["precision"] == "fp32" and len(data["layouts"]) == 50
    for row in data["layouts"]:
        pp = row["layout"]["pp"]
        assert len(row["memory_per_stage"]) == len(row["traffic_per_stage"]) == pp
        assert row["sbatch"].startswith("sbatch --nodes=1 ") and "model=tiny_mor_ec" in row["sbatch"]


def test_measured_rate_from_a_bench_line(capsys, tmp_path):
    """A bench line's TFLOP/s per GPU replaces MFU × peak: half the rate, twice the compute time."""
    bench = tmp_path / "bench.jsonl"
    bench.write_text('# a comment line\n{"config": "1b7_mor_ec", "tokens_per_s_per_gpu": 1000, '
                     '"tflops_per_gpu": 197.8}\n')
    args = ("1b7_mor_ec", "--gpus", "64", "--top", "1", "--json")
    _, fast, _ = _run(capsys, *args, "--mfu", "0.4")
    _, slow, _ = _run(capsys, *args, "--tokens-per-s-json", str(bench))
    t_fast, t_slow = (json.loads(o)["layouts"][0]["time"]["compute"] for o in (fast, slow))
    assert t_slow == pytest.approx(2 * t_fast, rel=1e-6)


@pytest.mark.parametrize("given,starts,override", [
    ("1b7_mor_tc", "MOR_RUN=1b7_mor_tc sbatch ", None),
    ("conf/model/360m_mor_ec_kvshare.yaml", "sbatch ", "model=conf/model/360m_mor_ec_kvshare.yaml"),
])
def test_sbatch_line_names_the_run_or_model(capsys, given, starts, override):
    """Another run file than the script's own goes in MOR_RUN; a model config (a preset or a path) in a model=
    override of the script's run."""
    code, out, _ = _run(capsys, given, "--gpus", "16", "--top", "1")
    line = out.splitlines()[-1]
    assert code == 0 and line.startswith(starts), line
    assert override is None or override in line.split()
