"""slurm/local_cluster.sh: its options, and the nodes it runs answering as separate hosts (their own names,
addresses and slurmd), which is what the multi-node tests rely on."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.slurm.jobs import ROOT

SCRIPT = ROOT / "slurm" / "local_cluster.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False)


def test_help_names_the_node_count_and_how_the_nodes_share_the_host():
    res = run("--help")
    assert res.returncode == 0 and "start [--nodes N]" in res.stdout and "at most 4" in res.stdout \
        and "multiple-slurmd" in res.stdout, res.stdout


@pytest.mark.parametrize("nodes", ["0", "5", "two", ""])
def test_a_bad_node_count_is_one_line_and_changes_nothing(nodes):
    if os.geteuid() != 0:
        pytest.skip("local_cluster.sh runs as root only")
    before = (ROOT / "slurm").stat().st_mtime, subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True,
                                                               text=True, timeout=30, check=False).stdout
    res = run("start", "--nodes", nodes)
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
    assert "start --nodes: expected 1 to 4" in res.stderr and res.stdout == "", res.stdout
    after = (ROOT / "slurm").stat().st_mtime, subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True,
                                                              text=True, timeout=30, check=False).stdout
    assert after == before


def test_each_node_has_its_own_name_address_and_slurmd(slurm):
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30,
                           check=False).stdout.split()
    assert nodes and nodes == [f"node{k}" for k in range(1, len(nodes) + 1)], nodes
    for k, node in enumerate(nodes, 1):
        assert subprocess.run(["getent", "hosts", node], capture_output=True, text=True, timeout=30,
                              check=False).stdout.split() == [f"127.0.2.{k}", node]
    status = run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for node in nodes:
        assert f"slurmd-{node}: running" in status.stdout, status.stdout
    # srun across every node: one task each, told its own node's name
    res = subprocess.run(["srun", f"-N{len(nodes)}", f"-n{len(nodes)}", "-t", "1", "bash", "-c",
                          'echo "$SLURM_PROCID $SLURMD_NODENAME"'], capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.splitlines()) == [f"{k} node{k + 1}" for k in range(len(nodes))], res.stdout
