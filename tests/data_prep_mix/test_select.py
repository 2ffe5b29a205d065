"""select.py: conditions on fields split the sample corpus by year into two files that partition it; values
compare as numbers or strings as written; mistakes are one line; the output is written once, the same bytes for
the same inputs."""
from __future__ import annotations

import gzip
import subprocess
import sys

import pytest

from data_prep import select
from data_prep.inputs import UserError
from tests.data_prep.conftest import CORPUS, ROOT, write_jsonl


def _lines(path) -> list[bytes]:
    with gzip.open(path, "rb") as f:
        return f.read().splitlines()


def test_years_before_and_from_1960_partition_the_sample_corpus(tmp_path):
    early, late = tmp_path / "raw" / "early.jsonl.gz", tmp_path / "raw" / "late.jsonl.gz"
    runs = [[sys.executable, "data_prep/select.py", str(CORPUS), "--where", "year<1960", "--out", str(early)],
            [sys.executable, "-m", "data_prep.select", "data_prep/corpus", "--where", "year >= 1960", "--out",
             str(late)]]
    outs = [subprocess.run(r, cwd=ROOT, capture_output=True, text=True, timeout=60) for r in runs]
    assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
    assert outs[0].stdout == f"kept 60 of 123 records (year<1960) from 1 file(s): {early}\n"
    assert outs[1].stdout.startswith("kept 63 of 123 records (year >= 1960)")
    a, b = _lines(early), _lines(late)
    assert len(a) + len(b) == 123 and not set(a) & set(b)
    assert a + b == _lines(CORPUS)                    # the corpus is in year order: each line exactly as it was
    again = subprocess.run(runs[0], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.rstrip().endswith("(unchanged)")


def test_numbers_strings_and_several_conditions(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"year": 1999, "party": "A", "n": 2.5}, {"year": 2001, "party": "B"},
                                              {"year": 2003, "party": "A", "n": None}, {"party": "A"}])
    out = tmp_path / "o.jsonl"
    assert select.run([str(src)], ["year>2000", "party=='A'"], str(out), skip_missing=True) == \
        f"kept 1 of 4 records (year>2000 and party=='A') from 1 file(s); 1 without a field left out: {out}"
    assert out.read_text() == '{"year": 2003, "party": "A", "n": null}\n'
    assert "kept 3 of 4" in select.run([str(src)], ["party!=B"], str(out), overwrite=True)
    assert "kept 1 of 4" in select.run([str(src)], ["n<=2.5"], str(out), skip_missing=True, overwrite=True)
    with pytest.raises(UserError, match=r"in.jsonl:1: field 'party' holds a string \(\"A\"\), but --where "
                                        r"'party>1' compares numbers"):
        select.run([str(src)], ["party>1"], str(tmp_path / "x.jsonl"))
    with pytest.raises(UserError, match=r"in.jsonl:2: field 'n' is missing \(fields: year, party\); pass --skip-mi"):
        select.run([str(src)], ["n<3"], str(tmp_path / "x.jsonl"))
    null = write_jsonl(tmp_path / "null.jsonl", [{"n": None}])
    with pytest.raises(UserError, match=r"null.jsonl:1: field 'n' is null"):
        select.run([str(null)], ["n<3"], str(tmp_path / "x.jsonl"))
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(UserError, match="exists and holds other records; pass --overwrite"):
        select.run([str(src)], ["year>2000"], str(out), skip_missing=True)


@pytest.mark.parametrize("where", ["year", "year=1960", "<1960", "year<", "year<>1960"])
def test_bad_conditions(where):
    with pytest.raises(UserError, match="expected FIELD OP VALUE"):
        select.parse_condition(where)


def test_parse_condition_values():
    assert select.parse_condition("year<1960").value == 1960
    assert select.parse_condition("x>=-2.5e1").value == -25.0
    assert select.parse_condition("year=='1960'").value == "1960"
    assert select.parse_condition('name != "Harry S. Truman"').value == "Harry S. Truman"
    assert select.parse_condition("party==Republican").value == "Republican"
