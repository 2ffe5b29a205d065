"""python -m pretrain.serve_bench runs the paper's protocol on CPU with tiny presets, each model and setting in a
process of its own: vanilla through the plain batched decode, MoR through the depth-wise engine; --batch max sizes
the slots from memory per model (MoR gets more), independent of the request count, and the queue grows to keep
them full; the report gives the compute bound beside every ratio; every mistake is one line before any work."""
from __future__ import annotations

import json
import math

import pytest

from pretrain.serve import bench as serve_bench
from pretrain.serve.bench import main


@pytest.mark.slow
def test_fixed_and_memory_sized_batches_in_one_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # 0.25 MiB less a fifth: vanilla's 8 layers x 16 positions x 256 B = 32 KiB a slot (plus its index) -> 6 slots
    code = main(["tiny_vanilla", "tiny_mor_ec", "--requests", "5", "--fill", "2", "--gen-mean", "6", "--gen-std", "2",
                 "--batch", "3,max", "--memory", "0.25", "--warmup", "1", "--depths", "0.5,0.3,0.2",
                 "--json", str(out), "--markdown", "--threads", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "| model | server | batch |" in text and "| tiny_mor_ec | depth-wise | max |" in text
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny_vanilla", "3"), ("tiny_mor_ec", "3"),
                                                        ("tiny_vanilla", "max"), ("tiny_mor_ec", "max")]
    fixed_v, fixed_ec, max_v, max_ec = rows
    assert [r["server"] for r in rows] == ["static", "depth-wise"] * 2
    assert fixed_v["slots"] == fixed_ec["slots"] == 3 and fixed_v["requests"] == 6   # max(5, 2 x 3)
    assert fixed_v["tokens"] == fixed_ec["tokens"]          # the same drawn lengths for every model
    assert all(r["max_len"] == 15 for r in rows)           # 1 + ceil(6 + 4 x 2): lengths 1..14
    # the same memory holds more MoR slots (its deeper steps cache fewer tokens), and more than the requests
    assert max_v["slots"] == 6 and max_ec["slots"] > max_v["slots"] > 5
    assert max_ec["requests"] == 2 * max_ec["slots"] and max_ec["kv_bytes"] <= 0.25 * 2**20 * 0.8
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > r["kv_bytes"] > 0 and r["preemptions"] == 0
        assert sum(r["depth_shares"]) == pytest.approx(1.0)
        assert r["vs_first"] == pytest.approx(r["compute_bound"] * r["pass_speed"])
    # vanilla runs 8 layers per token; MoR the first and last + 2 per recursion step, from the realised depths
    assert fixed_v["layer_passes"] == 8 and fixed_v["depth_shares"] == [0.0, 1.0]
    shares = fixed_ec["depth_shares"]
    assert fixed_ec["layer_passes"] == pytest.approx(2 + 2 * sum(d * f for d, f in enumerate(shares)))
    assert fixed_ec["compute_bound"] == pytest.approx(8 / fixed_ec["layer_passes"])
    assert shares[1] > shares[3] > 0.05 and shares[0] == 0   # the calibrated bias: different depths, shallow most


@pytest.mark.parametrize("argv,message", [
    (["--batch", "zero"], "--batch: 'zero'"),
    (["--batch", "4,4"], "names a setting twice"),
    (["--requests", "0"], "--requests: must be >= 1"),
    (["--fill", "0"], "--fill: must be >= 1"),
    (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--temperature", "nan"], "--temperature: must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature: must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["--gen-mean", "nan"], "--gen-mean"),
    (["--gen-std", "-1"], "--gen-std"),
    (["--seed", str(2**64)], "--seed"),
    (["--memory", "64"], "--memory: sizes --batch max only"),
    (["--batch", "max", "--headroom", "1"], "--headroom: must be in [0, 1)"),
    (["--batch", "max", "--memory", "0"], "--memory: must be"),
    (["--batch", "max", "--memory", "0.01"], "holds not one sequence's KV cache"),
    (["--depths", "0.5,0.5"], "2 shares for a model of 3 recursion steps"),
    (["--depths", "0.5,0.6,0.1"], "sum to 1"),
    (["--depths", "a,b,c"], "not a comma-separated list"),
    (["--checkpoint", "runs/x"], "--checkpoint: given 1 times for 2 models"),
    (["--json", "{tmp}"], "is a folder"),
    (["--json", "{tmp}/no/such/x.json"], "not a folder we can write to"),
])
def test_mistakes_are_one_line_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    def no_work(job):
        raise AssertionError("a measurement started")

    monkeypatch.setattr(serve_bench, "run_job", no_work)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["tiny_vanilla", "tiny_mor_ec", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_depths_must_have_a_model_to_steer(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tiny_vanilla", "tiny_mor_tc", "--depths", "0.4,0.3,0.3"])
    assert e.value.code == 2 and "none of the models routes by expert choice" in capsys.readouterr().err


def test_lengths_are_the_same_whatever_the_queue_length():
    short, long = serve_bench.lengths(10, 64, 16, 129, 0), serve_bench.lengths(1000, 64, 16, 129, 0)
    assert long[:10] == short and 1 <= min(long) and max(long) <= 128
    assert abs(sum(long) / 1000 - 64) < 2 and math.isclose(sum(long[:10]), sum(short))
