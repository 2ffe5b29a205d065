"""Mistakes in the options of several corpora are one line each, exit status 2, before any work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.data_prep.conftest import ROOT, run_cli
from tests.data_prep_mix.conftest import texts, write_lines


@pytest.fixture
def raw(tmp_path):
    write_lines(tmp_path / "a.jsonl", texts(2))
    write_lines(tmp_path / "b.jsonl", texts(2, start=5))
    return tmp_path


TRAIN = ["--train-tokenizer", "{dir}/t.model"]
CASES = {   # options, the tokenizer option (None: an existing model), the message
    "inputs and corpora": (["{a}", "--corpus", "x={b}"], None, "give INPUTS or --corpus NAME=PATH, not both"),
    "no inputs at all": ([], None, "no inputs: give INPUTS"),
    "a bad name": (["--corpus", "no/slash={a}"], None, "may hold only letters, digits, '_' and '-'"),
    "no path": (["--corpus", "x="], None, "expected NAME=PATH"),
    "no name": (["--corpus", "{a}"], None, "expected NAME=PATH"),
    "weight of an unknown corpus": (["--corpus", "x={a}", "--weight", "y=2"], TRAIN,
                                    "no corpus 'y' (--corpus gives x)"),
    "weight of zero": (["--corpus", "x={a}", "--weight", "x=0"], TRAIN, "W must be a number > 0"),
    "weight not a number": (["--corpus", "x={a}", "--weight", "x=lots"], TRAIN, "W must be a number > 0"),
    "weight twice": (["--corpus", "x={a}", "--weight", "x=2", "--weight", "x=3"], TRAIN, "has a weight already"),
    "weight without corpora": (["{a}", "--weight", "x=2"], TRAIN, "--weight NAME=W weighs a --corpus"),
    "weight without training": (["--corpus", "x={a}", "--weight", "x=2"], None, "it needs --train-tokenizer"),
    "a file in two corpora": (["--corpus", "x={a}", "--corpus", "y={dir}"], None,
                              "an input of corpus 'x' and of corpus 'y'"),
    "a missing input": (["--corpus", "x={dir}/none.jsonl"], None, "no such file or folder"),
}


@pytest.mark.parametrize("case", CASES)
def test_one_line_errors(case, raw, cli, mix_model):
    args, tok, message = CASES[case]
    args = [a.format(a=raw / "a.jsonl", b=raw / "b.jsonl", dir=raw) for a in args + (tok or ["--tokenizer", mix_model])]
    rc, out, err = cli(*args, "--out", raw / "out")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert out == "" and not (raw / "out").exists() and not (raw / "t.model").exists()


def test_out_holding_a_data_set_of_its_own_is_refused(raw, cli, mix_model):
    rc, _, err = cli(raw / "a.jsonl", "--tokenizer", mix_model, "--out", raw / "single", "--seq-len", 32)
    assert rc == 0, err
    rc, _, err = cli("--corpus", f"x={raw / 'b.jsonl'}", "--tokenizer", mix_model, "--out", raw / "single")
    assert rc == 2 and "holds a data set of its own" in err and err.count("\n") == 1


def test_the_scripts_say_one_line_too(raw, mix_model):
    res = run_cli("--corpus", "a b=x", "--tokenizer", mix_model, "--out", raw / "out")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "'a b'" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "data_prep/select.py", str(raw / "a.jsonl"), "--where", "year=1960",
                          "--out", str(raw / "s.jsonl.gz")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "expected FIELD OP VALUE" in res.stderr
    assert "Traceback" not in res.stderr and not (raw / "s.jsonl.gz").exists()
