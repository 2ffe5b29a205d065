"""The variant matrix of the export, causality and decode tests, built from the routing registry
(model.config.ROUTINGS): vanilla once; every registered routing under every sharing strategy, and under
middle-cycle with recursive KV sharing. A variant registered anywhere (model/routing/__init__.py, or a test's
``registered`` below) is in it without an edit here. Each test adds its own option cases (gates, auxiliary
router, balancing) beside it."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from model.config import ROUTINGS
from model.routing import register
from tests.model.helpers import SHARINGS


def matrix() -> dict[str, dict[str, Any]]:
    """{case id: ``tests.model.helpers.tiny`` keywords (routing, sharing, kv_sharing)}."""
    out: dict[str, dict[str, Any]] = {"vanilla": dict(routing="none", sharing="none")}
    for name in ROUTINGS:
        for sharing in SHARINGS:
            out[f"{name}-{sharing}"] = dict(routing=name, sharing=sharing)
        out[f"{name}-middle_cycle-kv"] = dict(routing=name, sharing="middle_cycle", kv_sharing=True)
    return out


@contextlib.contextmanager
def registered(cls) -> Iterator[type]:
    """``cls`` in the registry for the duration (a throwaway variant of a test)."""
    register(cls)
    try:
        yield cls
    finally:
        del ROUTINGS[cls.name]
