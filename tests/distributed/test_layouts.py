"""Layouts against a single-process reference: losses, kept tokens and weights after 3 AdamW steps."""
from __future__ import annotations

import pytest

from tests.distributed.harness import assert_matches, run_layout

ALL = ["vanilla", "mor_ec", "mor_tc"]


@pytest.mark.parametrize("world,parallel", [
    pytest.param(2, {"tensor_parallel": 2, "zero_stage": 0, "micro_batch_size": 2}, id="tp2"),
    pytest.param(2, {"zero_stage": 1, "micro_batch_size": 1}, id="dp2-zero1"),
    pytest.param(2, {"zero_stage": 2, "micro_batch_size": 1}, id="dp2-zero2"),
    pytest.param(2, {"zero_stage": 3, "micro_batch_size": 1}, id="dp2-zero3"),
    pytest.param(4, {"tensor_parallel": 2, "zero_stage": 2, "micro_batch_size": 1}, id="tp2-dp2-zero2"),
])
def test_layout_matches_single_process(tmp_path, world, parallel):
    for variant, (ref, got) in run_layout(tmp_path, world, parallel, ALL).items():
        assert_matches(ref, got), variant
