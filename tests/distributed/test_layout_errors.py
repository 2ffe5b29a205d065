"""Impossible layouts fail early with one clear line naming the setting."""
from __future__ import annotations

import pytest

from conf.errors import ConfigError
from pretrain.parallel.layout import ParallelConfig, check_layout, init_distributed
from tests.model.helpers import tiny

CASES = [
    (3, ParallelConfig(tensor_parallel=2), tiny(), "world size 3 is not divisible by tensor_parallel × "
                                                   "pipeline_parallel = 2 × 1"),
    (3, ParallelConfig(tensor_parallel=3), tiny(), "n_heads=4 is not divisible by 3"),
    (4, ParallelConfig(tensor_parallel=4), tiny(), "n_kv_heads=2 is not divisible by 4"),
    (8, ParallelConfig(pipeline_parallel=8, zero_stage=0), tiny(sharing="none", n_layers=4),
     "8 stages but the model unrolls to only 4 layers"),
    (4, ParallelConfig(pipeline_parallel=2, zero_stage=2), tiny(), "ZeRO-2 cannot run with pipeline_parallel=2"),
    (4, ParallelConfig(pipeline_parallel=2, zero_stage=3), tiny(), "ZeRO-3 cannot run with pipeline_parallel=2"),
    (2, ParallelConfig(micro_batch_size=4, global_batch_size=6), tiny(),
     "global_batch_size: 6 is not a multiple of micro_batch_size × data-parallel size = 4 × 2"),
    (2, ParallelConfig(sequence_parallel=True), tiny(), "sequence_parallel: needs tensor_parallel > 1"),
    (2, ParallelConfig(zero_stage=4), tiny(), "zero_stage: must be 0, 1, 2 or 3"),
]


@pytest.mark.parametrize("world,pcfg,cfg,message", CASES)
def test_layout_error_is_one_clear_line(world, pcfg, cfg, message):
    with pytest.raises(ConfigError) as err:
        check_layout(pcfg, world, cfg)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_valid_layouts_give_the_data_parallel_size():
    assert check_layout(ParallelConfig(tensor_parallel=2, pipeline_parallel=2, zero_stage=1), 8, tiny()) == 2
    assert check_layout(ParallelConfig(micro_batch_size=2, global_batch_size=8), 2, tiny()) == 2


def test_init_distributed_checks_the_launcher_world_before_starting(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        init_distributed(ParallelConfig(tensor_parallel=2), tiny())
