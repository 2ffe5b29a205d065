"""Shared test set-up: the repo root on sys.path, a one-process megatron world, tiny configs, GPU marker."""
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
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
