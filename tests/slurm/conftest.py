"""The Slurm tests run against a real one-node cluster (slurm/local_cluster.sh start, as root). Where none answers
they skip with the reason — except when MOR_REQUIRE_SLURM=1 (CI sets it), where a missing cluster fails them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pretrain.fixtures import make_shards
from tests.slurm import jobs

REQUIRED = os.environ.get("MOR_REQUIRE_SLURM") == "1"


def slurm_unavailable() -> str | None:
    """Why no Slurm cluster can run jobs here, or None when one can."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client commands not installed (as root: bash slurm/local_cluster.sh start)"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    states = res.stdout.split()
    if res.returncode != 0 or not states:
        return f"no Slurm controller answers ({res.stderr.strip() or 'sinfo printed nothing'})"
    if not any(s.rstrip("*~#$@^-!%") in ("idle", "mix", "alloc", "comp", "plnd") for s in states):
        return f"no usable Slurm node (states: {' '.join(states)})"
    return None


@pytest.fixture(scope="session")
def slurm():
    reason = slurm_unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(f"MOR_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small tokenized corpus for the jobs' tiny model."""
    return make_shards(tmp_path_factory.mktemp("slurm_data") / "shards", vocab=128, seq_len=32, train=512, val=16)


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs(request):
    """A failed test must not leave its job running (or requeueing itself) for the next ones: those it submitted
    through jobs.sbatch, and a sweep's, which pretrain.sweep records in its out_dir's jobs.json."""
    yield
    ids = [str(j) for j in jobs.submitted]
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None:
        for record in Path(tmp).rglob("jobs.json"):
            try:
                recorded = json.loads(record.read_text())
            except (OSError, ValueError):
                continue
            if recorded.get("executor") == "slurm":
                ids += [jid.split("_")[0] for jid in recorded.get("jobs", {}).values()]  # the whole array
    if ids:
        subprocess.run(["scancel", *sorted(set(ids))], capture_output=True, timeout=60, check=False)
        # and out of the queue before the next test starts its clock (ranks that ignore SIGTERM take KillWait)
        try:
            jobs.wait_for(lambda: all(jobs.gone(i) for i in set(ids)), 120, "cancelled jobs to end", every=1)
        except AssertionError:
            pass
    jobs.submitted.clear()
