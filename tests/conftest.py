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

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one thread each, and for the processes they start (spawned ranks set it anyway).
    # More threads than cores leave OpenMP's waiting threads spinning on the cores the other worker needs.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


KINDS = ("distributed", "faults", "slurm", "slow", "gpu")
FOLDER_KIND = {"distributed": "distributed", "faults": "faults", "slurm": "slurm"}


# Under pytest-xdist (`make test` runs 2 workers) a file is one unit of work, so its module fixtures (a module's
# shared reference runs) are built once, and the Slurm files are one unit between them, one test at a time: their
# time limits, warnings and kills are timed against jobs that start when submitted (FileScheduling below). (As two
# units on two workers, on the cluster's two nodes, the jobs ran side by side but slowed each other and the rest
# past their deadlines, and the suite took longer.) Units go out in ORDER, the longest kinds first, so that short
# unit files fill the gaps at the end.
ORDER = ("slurm", "faults", "distributed", "slow", "unit", "gpu")
# Units that mostly wait (on the Slurm controller's minute-granular time limits and requeues) rather than compute.
# With --waiting-worker each gets a worker of its own, so that their waiting holds no core that the other workers
# could use.
WAITING = ("tests/slurm",)


def pytest_addoption(parser):
    parser.addoption("--waiting-worker", action="store_true",
                     help=f"with -n N: start N + {len(WAITING)} workers, the last {len(WAITING)} only for the tests "
                          "that mostly wait (the Slurm tests); the other N never take them")


def pytest_configure(config):
    tx = getattr(config.option, "tx", None)
    if config.getoption("waiting_worker") and tx and config.getvalue("dist") == "load":
        config.option.tx = [*tx, *[tx[-1]] * len(WAITING)]
    worker = getattr(config, "workerinput", None)
    if worker and config.getoption("waiting_worker") and not _is_waiter(worker["workerid"], worker["workercount"]):
        # The other workers yield the cores to the Slurm jobs when both want them: those jobs are the longest chain
        # (their time limits, requeues and restarts run one after another), and a busy core slows each start.
        os.nice(10)


def _is_waiter(workerid: str, count: int) -> bool:
    """With --waiting-worker, the last len(WAITING) of the run's ``count`` workers (gw0, gw1, ...) wait. Fixed by
    id for the whole run: a worker that has finished its unit and left must not pass its part to another."""
    return int(workerid[2:]) >= count - len(WAITING)


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    first_kind: dict[str, int] = {}
    for item in items:
        folder = item.path.parent.name
        if folder in FOLDER_KIND:
            item.add_marker(FOLDER_KIND[folder])
        if not any(k in item.keywords for k in KINDS):
            item.add_marker("unit")
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
        unit, rank = _unit(item.nodeid), next(i for i, k in enumerate(ORDER) if k in item.keywords)
        first_kind[unit] = min(first_kind.get(unit, rank), rank)
    if os.environ.get("PYTEST_XDIST_WORKER"):   # alone, a run keeps the files' own order
        items.sort(key=lambda it: first_kind[_unit(it.nodeid)])   # stable: a file's tests keep their order


def _unit(nodeid: str) -> str:
    """The unit of work a test belongs to: the Slurm folder, or its file."""
    path = nodeid.split("::")[0]
    return "tests/slurm" if path.startswith("tests/slurm/") else path


def pytest_xdist_make_scheduler(config, log):
    """Whole units to a worker, in the order the workers collected them (see ORDER); with --waiting-worker the
    last len(WAITING) workers take the WAITING units and nothing else. Used where no --dist mode was asked for. (xdist's own
    --dist loadgroup would need a mark per test, which pytest 9.2 no longer lets a conftest add: pytest-xdist
    issue 1386.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling
    waiter_apart = config.getoption("waiting_worker")

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

        def _takes(self, node, unit: str) -> bool:
            if not waiter_apart or len(self.nodes) < 2:
                return True
            return _is_waiter(node.gateway.id, node.workerinput["workercount"]) == (unit in WAITING)

        def _assign_work_unit(self, node) -> None:
            unit = next((u for u in self.workqueue if self._takes(node, u)), None)
            if unit is None:                   # nothing left that this worker takes: it finishes what it has
                node.shutdown()
                return
            work = self.workqueue.pop(unit)
            self.assigned_work.setdefault(node, {})[unit] = work
            collected = self.registered_collections[node]
            node.send_runtest_some([collected.index(nodeid) for nodeid, done in work.items() if not done])

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not any(self._takes(node, u) for u in self.workqueue):
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 2:
                self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return FileScheduling(config, log)


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
