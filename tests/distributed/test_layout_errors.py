"""Impossible layouts fail early with one clear line naming the setting."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

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


@pytest.mark.parametrize("tp,nodes,spans", [
    (2, ("a", "a", "b", "b"), None),                      # a pair per node
    (4, ("a", "a", "a", "a", "b", "b", "b", "b"), None),
    (2, ("a", "b"), "ranks 0-1 run on a, b"),             # one rank per node
    (4, ("a", "a", "b", "b"), "ranks 0-3 run on a, b"),   # two ranks per node
    (2, ("a", "b", "a", "b"), "ranks 0-1 run on a, b"),   # numbered round-robin (srun --distribution=cyclic)
    (2, ("a", "a", "a", "b", "b", "b"), "ranks 2-3 run on a, b"),   # 3 per node: the second pair straddles
])
def test_a_tensor_parallel_group_must_stay_inside_a_node(tp, nodes, spans):
    from pretrain.parallel.layout import _check_tp_inside_nodes
    if spans is None:
        _check_tp_inside_nodes(tp, nodes)
        return
    with pytest.raises(ConfigError) as err:
        _check_tp_inside_nodes(tp, nodes)
    text = str(err.value)
    assert text.startswith(f"parallel.tensor_parallel={tp} would span nodes: {spans}") and "\n" not in text, text
    assert err.value.every_rank   # every rank finds it: rank 0 alone prints it


def test_the_logs_say_which_ranks_run_on_which_node():
    from pretrain.parallel.layout import describe_nodes
    assert describe_nodes(("n1", "n1", "n2", "n2")) == "n1: ranks 0-1, n2: ranks 2-3"
    assert describe_nodes(("n1", "n2")) == "n1: rank 0, n2: rank 1"
    assert describe_nodes(("n1", "n2", "n1")) == "n1: rank 0, n2: rank 1, n1: rank 2"


def test_layout_errors_are_printed_by_rank_0_only(capsys):
    from conf import cli_errors
    for rank0, shown in ((True, True), (False, False)):
        with pytest.raises(SystemExit) as done, cli_errors(rank0=rank0):
            check_layout(ParallelConfig(tensor_parallel=2), 3, tiny())
        assert done.value.code == 2
        assert ("error: parallel: world size 3" in capsys.readouterr().err) == shown
    # an error one rank alone may have (its own files) is printed wherever it happens
    with pytest.raises(SystemExit), cli_errors(rank0=False):
        raise ConfigError("data.path: no such folder")
    assert "error: data.path: no such folder" in capsys.readouterr().err


def test_the_collective_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="collective_timeout_s: must be > 0 seconds, got 0"):
        check_layout(ParallelConfig(collective_timeout_s=0), 1, tiny())


def test_tensor_parallel_must_divide_the_vocabulary():
    """megatron's vocab-parallel embedding asserts otherwise; here it is one line before anything starts."""
    with pytest.raises(ConfigError, match="vocab_size=130 is not divisible by 4") as err:
        check_layout(ParallelConfig(tensor_parallel=4), 4, tiny(n_heads=4, n_kv_heads=4, vocab_size=130))
    assert "\n" not in str(err.value)


def test_a_taken_rendezvous_port_is_one_line_from_rank_0():
    """Rank 0 serves the rendezvous; another socket on its port (here a listening one of this test) makes it fail
    at once, and it names the port instead of torch's C++ trace. In a fresh process: this one has its group."""
    import socket
    import sys
    code = ("from conf import cli_errors\n"
            "from pretrain.parallel.layout import ParallelConfig, init_distributed\n"
            "with cli_errors():\n"
            "    init_distributed(ParallelConfig(collective_timeout_s=20), device='cpu')\n")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                             cwd=Path(__file__).resolve().parents[2], check=False)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert f"rank 0 on {socket.gethostname()}: the rendezvous port MASTER_PORT={port} is already in use" \
        in errors[0] and "Traceback" not in res.stderr, res.stderr


def test_rendezvous_ports_stay_below_the_ephemeral_range_and_differ_for_neighbouring_jobs():
    from pretrain.parallel.layout import rendezvous_port
    lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = [rendezvous_port(j) for j in range(1, 30001)]
    assert min(ports) >= 1024 and max(ports) < min(lo, 32768)
    assert len(set(ports[:12000])) == 12000   # 12000 jobs in a row never share a port
    # slurm/launch.sh's own line, run by bash: the launcher and the sweep's jobs follow one rule
    launch = (Path(__file__).resolve().parents[2] / "slurm" / "launch.sh").read_text().splitlines()
    (line,) = [ln for ln in launch if ln.startswith("export MASTER_PORT=")]
    got = subprocess.run(["bash", "-c", f"unset MOR_MASTER_PORT; SLURM_JOB_ID=123457; {line}; echo $MASTER_PORT"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert int(got) == rendezvous_port(123457)
