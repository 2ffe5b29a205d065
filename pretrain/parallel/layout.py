"""Process groups, megatron-core parallel state, seeding, and layout checks: the one place that sets them up.

A run's world is tensor-parallel (TP) × pipeline-parallel (PP) × data-parallel (DP); DP is what remains of the
world size. ``init_distributed`` reads the usual launcher environment (torchrun's RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, or Slurm's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), starts NCCL on
GPU or gloo on CPU, and builds megatron's groups. On CPU only, ``pretrain.parallel.cpu_compat`` redirects the few CUDA
device arguments megatron-core hard-codes; on GPU megatron-core runs unmodified.
"""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from conf.errors import ConfigError
from model.config import ModelConfig


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    # DeepSpeed ZeRO stage over the data-parallel group: 0 (plain DP), 1 optimizer state, 2 + gradients, 3 + params.
    zero_stage: int = 1
    micro_batch_size: int = 1
    # Sequences per optimizer step over all data-parallel ranks; None means micro_batch_size × DP (no accumulation).
    global_batch_size: Optional[int] = None
    seed: int = 1234
    # How long a rank waits in one collective for the others before it fails: a rank or node that died or hangs
    # ends the run after at most this (the default of Megatron-LM's --distributed-timeout-minutes). The slowest
    # rank's start-up, a compile or a checkpoint save must fit in it.
    collective_timeout_s: float = 600.0


@dataclass(frozen=True)
class Layout:
    world: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    device: torch.device
    # The node each global rank runs on (Slurm's node name, else the host name).
    nodes: tuple[str, ...] = ()


def grad_accumulation_steps(pcfg: ParallelConfig, dp: int) -> int:
    gbs = pcfg.global_batch_size or pcfg.micro_batch_size * dp
    return gbs // (pcfg.micro_batch_size * dp)


def _layout_error(message: str) -> ConfigError:
    """A layout error: the same on every rank of a launch, so printed by rank 0 only."""
    return ConfigError(message, every_rank=True)


def check_layout(pcfg: ParallelConfig, world: int, model: Optional[ModelConfig] = None) -> int:
    """Raise ConfigError (one line) for a layout that cannot run; return the data-parallel size. Every rank finds
    the same error, so only rank 0 of a launch prints it (conf.cli_errors)."""
    tp, pp = pcfg.tensor_parallel, pcfg.pipeline_parallel
    if tp < 1 or pp < 1:
        raise _layout_error(f"parallel.tensor_parallel / pipeline_parallel must be >= 1, got {tp} / {pp}")
    if world % (tp * pp):
        raise _layout_error(f"parallel: world size {world} is not divisible by tensor_parallel × pipeline_parallel "
                          f"= {tp} × {pp}; use a world size that is a multiple of {tp * pp}")
    dp = world // (tp * pp)
    if pcfg.zero_stage not in (0, 1, 2, 3):
        raise _layout_error(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {pcfg.zero_stage}")
    if pp > 1 and pcfg.zero_stage > 1:
        raise _layout_error(f"parallel.zero_stage: ZeRO-{pcfg.zero_stage} cannot run with pipeline_parallel={pp} "
                          "(DeepSpeed partitions gradients per backward, a pipeline runs several); use zero_stage<=1")
    if pcfg.sequence_parallel and tp == 1:
        raise _layout_error("parallel.sequence_parallel: needs tensor_parallel > 1")
    if not pcfg.collective_timeout_s > 0:
        raise _layout_error(f"parallel.collective_timeout_s: must be > 0 seconds, got {pcfg.collective_timeout_s}")
    if pcfg.micro_batch_size < 1:
        raise _layout_error(f"parallel.micro_batch_size: must be >= 1, got {pcfg.micro_batch_size}")
    gbs = pcfg.global_batch_size
    if gbs is not None and (gbs < 1 or gbs % (pcfg.micro_batch_size * dp)):
        raise _layout_error(f"parallel.global_batch_size: {gbs} is not a multiple of micro_batch_size × data-parallel "
                          f"size = {pcfg.micro_batch_size} × {dp}")
    if model is not None:
        if model.n_heads % tp:
            raise _layout_error(f"parallel.tensor_parallel: n_heads={model.n_heads} is not divisible by {tp}")
        if model.n_kv_heads % tp:
            raise _layout_error(f"parallel.tensor_parallel: n_kv_heads={model.n_kv_heads} is not divisible by {tp}")
        if model.ffn_hidden % tp:
            raise _layout_error(f"parallel.tensor_parallel: ffn_hidden={model.ffn_hidden} is not divisible by {tp}")
        if model.vocab_size % tp:   # megatron's vocab-parallel embedding and loss split it evenly (else it asserts)
            raise _layout_error(f"parallel.tensor_parallel: vocab_size={model.vocab_size} is not divisible by {tp}")
        if pp > 1:
            from model.program import stage_ranges
            try:
                stage_ranges(model, pp)  # raises ConfigError when the layers cannot be split into pp stages
            except ConfigError as e:
                raise _layout_error(str(e)) from None
    return dp


def _env_int(*names: str, default: Optional[int] = None) -> Optional[int]:
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rendezvous ports for Slurm jobs: one per job id, cycling through 20000-31999. That is below Linux's default range
# of ephemeral ports (32768-60999, net.ipv4.ip_local_port_range), which every outgoing connection and every gloo
# or NCCL listener on the node draws from, so another job's sockets cannot hold it by chance; and jobs started
# close together (an array's elements) get different ports. slurm/launch.sh computes the same.
RENDEZVOUS_PORT_BASE, RENDEZVOUS_PORTS = 20000, 12000


def rendezvous_port(job_id: int) -> int:
    return RENDEZVOUS_PORT_BASE + job_id % RENDEZVOUS_PORTS


def _start_process_group(backend: str, rank: int, world: int, timeout_s: float) -> None:
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    except dist.DistNetworkError as e:
        # Rank 0 serves the rendezvous; if its port is taken it fails at once while the others wait for it until
        # the timeout. Say which port, where, and what to do instead of torch's C++ trace.
        if rank == 0 and "EADDRINUSE" in str(e):
            raise ConfigError(f"rank 0 on {node_name()}: the rendezvous port MASTER_PORT="
                              f"{os.environ.get('MASTER_PORT')} is already in use there; choose a free one "
                              "(slurm/launch.sh and pretrain.sweep take MOR_MASTER_PORT) and launch again") from None
        raise


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(pcfg: ParallelConfig, model: Optional[ModelConfig] = None, *,
                     device: Optional[str] = None) -> Layout:
    """Start (or join) the process group from the launcher's environment and build megatron's TP/PP/DP groups."""
    return _init(pcfg, model, device=device, rank=_env_int("RANK", "SLURM_PROCID", default=0),
                 world=_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
                 local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=0))


def _init(pcfg: ParallelConfig, model: Optional[ModelConfig], *, device: Optional[str], rank: int, world: int,
          local_rank: int) -> Layout:
    dp = check_layout(pcfg, world, model)
    if pcfg.tensor_parallel > 1:
        # megatron's advice for overlapping TP's gradient all-reduce (and SP's communication) with compute, and its
        # start-up warning otherwise; read when CUDA starts, so before anything touches a device. A user's own
        # value wins.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if world > 1 and not os.environ.get("MASTER_PORT"):
            raise ConfigError(f"MASTER_PORT is not set for a world of {world} processes: launch with torchrun, or "
                              "set MASTER_ADDR and MASTER_PORT (the slurm/ launchers do)")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world == 1:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        # With a GPU, NCCL serves CUDA tensors and gloo still serves CPU ones (tests mix both).
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        _start_process_group(backend, rank, world, pcfg.collective_timeout_s)
        atexit.register(_shutdown)
    nodes = _nodes_of_ranks(world)
    _check_tp_inside_nodes(pcfg.tensor_parallel, nodes)
    # DeepSpeed reads these from the environment whatever launched us (torchrun, srun, or a single process).
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(name, str(value))
    if not use_cuda:
        from pretrain.parallel.cpu_compat import patch_megatron_for_cpu
        patch_megatron_for_cpu()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=pcfg.tensor_parallel,
                                                 pipeline_model_parallel_size=pcfg.pipeline_parallel,
                                                 distributed_timeout_minutes=pcfg.collective_timeout_s / 60)
    seed_everything(pcfg.seed)
    return Layout(world, rank, local_rank, pcfg.tensor_parallel, pcfg.pipeline_parallel, dp, dev, nodes)


def node_name() -> str:
    """This process's node: Slurm's name for it (several Slurm nodes may share one host name, as on
    slurm/local_cluster.sh's cluster), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _nodes_of_ranks(world: int) -> tuple[str, ...]:
    """Every global rank's node, in rank order (one all-gather over the world; nothing to ask in a world of 1)."""
    if world == 1:
        return (node_name(),)
    names: list = [None] * world
    dist.all_gather_object(names, node_name())
    return tuple(names)


def _check_tp_inside_nodes(tp: int, nodes: tuple[str, ...]) -> None:
    """A tensor-parallel group talks at every layer (and every recursion step): it must stay on one node's fast
    links. megatron-core's TP groups are runs of ``tp`` consecutive global ranks, and launchers number ranks node by
    node, so a group spans nodes when the ranks per node are not a multiple of ``tp``."""
    for start in range(0, len(nodes), tp):
        group = nodes[start:start + tp]
        if len(set(group)) > 1:
            per_node = describe_nodes(nodes)
            raise _layout_error(f"parallel.tensor_parallel={tp} would span nodes: ranks {start}-{start + tp - 1} "
                                f"run on {', '.join(dict.fromkeys(group))} ({per_node}); use a tensor_parallel "
                                "that divides the ranks per node, or more ranks per node")


def describe_nodes(nodes: tuple[str, ...]) -> str:
    """``node1: ranks 0-1, node2: ranks 2-3``: which ranks run where, for the logs."""
    spans: list[list] = []
    for rank, node in enumerate(nodes):
        if spans and spans[-1][0] == node and spans[-1][2] == rank - 1:
            spans[-1][2] = rank
        else:
            spans.append([node, rank, rank])
    return ", ".join(f"{n}: rank{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''}" for n, a, b in spans)


def seed_everything(seed: int) -> None:
    """The same seed on every rank: replicated parameters start equal; megatron offsets the TP-sharded ones."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)


def init_single_process(seed: int = 0) -> Layout:
    """A world of one (TP = PP = DP = 1): model tests, the demo, inspection and benchmarks."""
    return _init(ParallelConfig(seed=seed), None, device=None, rank=0, world=1, local_rank=0)
