"""python -m pretrain.serve_bench runs the paper's protocol on CPU with tiny presets: a few requests through the
depth-wise batching engine, a table and JSON with every model's numbers; --depths steers a random expert-choice
model's realised depth distribution; mistakes are refused."""
from __future__ import annotations

import json

import pytest

from pretrain.serve_bench import main


def test_a_few_requests_give_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["tiny_vanilla", "tiny_mor_ec", "tiny_mor_ec_kvshare", "--requests", "12", "--gen-mean", "12",
                 "--gen-std", "3", "--batch", "4", "--warmup", "2", "--depths", "0.5,0.3,0.2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "tiny_mor_ec_kvshare" in text
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["tiny_vanilla", "tiny_mor_ec", "tiny_mor_ec_kvshare"]
    for r in rows:
        assert r["slots"] == 4 and r["requests"] == 12 and r["tokens_per_s"] > 0
        assert r["tokens"] == rows[0]["tokens"]          # the same drawn lengths for every model
        assert sum(r["depths"]) == pytest.approx(1.0)
    vanilla, ec, shared = rows
    assert vanilla["vs_first"] == 1.0 and vanilla["depths"] == [1.0]
    assert shared["kv_bytes_per_slot"] < ec["kv_bytes_per_slot"] < vanilla["kv_bytes_per_slot"] * 2
    # the calibrated bias: tokens really take different depths, shallow ones most
    assert ec["depths"][0] > ec["depths"][2] > 0.05


@pytest.mark.parametrize("argv,message", [
    (["tiny_vanilla", "--batch", "zero"], "--batch"),
    (["tiny_mor_ec", "--depths", "0.5,0.5"], "--depths"),
    (["tiny_vanilla", "--requests", "0"], "--requests"),
])
def test_mistakes_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--gen-mean", "8", "--gen-std", "1"])
    assert e.value.code == 2 and message in capsys.readouterr().err
