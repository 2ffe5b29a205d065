"""Schedule shapes: warm-up, plateau and decay where the config puts them."""
from __future__ import annotations

import math

import pytest

from pretrain.config import ScheduleConfig
from pretrain.training.schedule import lr_multiplier


def curve(cfg, total=100):
    return [lr_multiplier(s, total, cfg) for s in range(total)]


def test_wsd_is_a_trapezoid():
    c = curve(ScheduleConfig(kind="wsd", warmup_frac=0.05, decay_frac=0.2, min_lr_ratio=0.0))
    assert c[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(v == 1.0 for v in c[5:80])
    assert c[80] == pytest.approx(1 - 1 / 20) and c[99] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(c[80:], c[81:]))


def test_wsd_decays_to_the_floor():
    c = curve(ScheduleConfig(kind="wsd", warmup_frac=0.0, decay_frac=0.5, min_lr_ratio=0.1))
    assert c[0] == 1.0 and c[49] == 1.0 and c[99] == pytest.approx(0.1)


def test_cosine_shape():
    c = curve(ScheduleConfig(kind="cosine", warmup_frac=0.1, min_lr_ratio=0.0))
    assert c[9] == pytest.approx(1.0) and c[99] == pytest.approx(0.0, abs=1e-12)
    mid = 10 + (99 - 10) / 2
    assert lr_multiplier(int(mid), 100, ScheduleConfig(kind="cosine", warmup_frac=0.1)) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_constant_after_warmup():
    c = curve(ScheduleConfig(kind="constant", warmup_frac=0.02))
    assert c[0] == 0.5 and c[1] == 1.0 and c[-1] == 1.0


@pytest.mark.parametrize("floor", [0.1, 0.25])
def test_cosine_decays_to_min_lr_ratio(floor):
    """The cosine reaches min_lr_ratio at the last step, passes the mean of 1 and the floor half-way through the
    decay, and never goes below the floor."""
    cfg = ScheduleConfig(kind="cosine", warmup_frac=0.1, min_lr_ratio=floor)
    c = curve(cfg)
    assert c[9] == pytest.approx(1.0)
    assert c[99] == pytest.approx(floor)
    assert lr_multiplier(10 + 89 // 2, 100, cfg) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (89 // 2) / 89)))
    assert min(c[10:]) == pytest.approx(floor)
