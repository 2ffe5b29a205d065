"""Shared test set-up: the repo root on sys.path, a one-process megatron world, and the tiers.

Every test has one kind (setup.cfg lists them): ``distributed`` (tests/distributed: gloo processes against one
process), ``faults`` (tests/faults: a failure injected into real training processes), ``slurm`` (tests/slurm: jobs
on a real controller), ``slow`` (marked where it is: a test elsewhere that trains or spawns for more than a few
seconds), ``gpu`` (needs CUDA; skipped on CPU) — or else ``unit``, given here. ``make test-fast`` runs the unit
tier (``pytest -m unit``), ``make test`` all of them."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


KINDS = ("distributed", "faults", "slurm", "slow", "gpu")
FOLDER_KIND = {"distributed": "distributed", "faults": "faults", "slurm": "slurm"}


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        folder = item.path.parent.name
        if folder in FOLDER_KIND:
            item.add_marker(FOLDER_KIND[folder])
        if not any(k in item.keywords for k in KINDS):
            item.add_marker("unit")
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def megatron_world():
    """A world of one process with megatron's TP = PP = 1 groups, as the model layers require."""
    from pretrain.parallel.layout import init_single_process
    init_single_process()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
