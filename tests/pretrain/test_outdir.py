"""What counts as a run folder (pretrain/training/outdir.py): every file the trainer may have left first."""
from __future__ import annotations

import pytest

from conf.errors import ConfigError
from pretrain.training.outdir import check_place, is_run


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "run.yaml", "run.lock", "checkpoints/latest",
                                      "checkpoints/step-000002/trainer.pt"])
def test_any_file_a_run_writes_makes_a_run_folder(tmp_path, leftover):
    run = tmp_path / "runs" / "a"
    (run / leftover).parent.mkdir(parents=True)
    (run / leftover).write_text("x")
    assert is_run(run) and not is_run(tmp_path / "runs")
    for out in (run, run / "export", tmp_path / "runs", tmp_path):
        with pytest.raises(ConfigError) as e:
            check_place(out)
        assert "\n" not in str(e.value) and str(run) in str(e.value)
    check_place(tmp_path / "elsewhere")   # a new folder beside the runs is fine


def test_an_empty_checkpoints_folder_is_not_a_run(tmp_path):
    (tmp_path / "x" / "checkpoints").mkdir(parents=True)
    assert not is_run(tmp_path / "x")
