"""Bytes moved by collectives, counted as a run makes them: what pretrain/plan predicts, measured.

    with count_traffic() as counter:          # install before the engine is built: start-up is counted too
        engine = TrainEngine(...)
        for i in range(steps):
            with counter.step(i):
                engine.train_step(micro)
    counter.totals(step=2)                    # {(kind, group): payload bytes} of step 2, model traffic only

**Where it listens.** Every torch.distributed collective ends in one method of the process group it runs on
(``ProcessGroup.allreduce``, ``allgather``, ``_allgather_base`` / ``all_gather_single``, ``reduce_scatter_single``,
``send``, ``recv``, ...). The counter wraps those methods on the ``ProcessGroup`` class, not the functions of
``torch.distributed``, because the callers hold the functions themselves: megatron-core's tensor-parallel mappings
bind ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` at import (``dist_all_gather_func``), DeepSpeed's
``TorchBackend`` binds them when ``deepspeed.comm`` starts, and a pipeline's ``P2POp`` holds ``isend`` / ``irecv``,
which ``batch_isend_irecv`` then compares by identity. Coalesced calls (ZeRO-3's gathers, the pipeline's batched
p2p) reach the same methods. tests/plan/test_measured.py checks that a run's calls from megatron's mappings, its
pipeline schedule and DeepSpeed ZeRO 0-3 are all seen (their counted bytes equal pretrain/plan's prediction), and
tests/plan/test_traffic_counter.py that a function megatron bound at import is.

**Payload bytes** (per call, on the rank that makes it): the bytes of the whole tensor the collective is about,

    all_reduce, broadcast, reduce     the tensor (the sum of its tensors for a coalesced call)
    all_gather                        the gathered result: the group's size × this rank's shard
    reduce_scatter                    the input before it is scattered: the group's size × this rank's output
    p2p_send / p2p_recv               the tensor sent / received
    all_to_all                        this rank's input

A ring algorithm moves payload × 2(n−1)/n per rank for an all-reduce and × (n−1)/n for an all-gather or a
reduce-scatter over a group of n; that factor belongs to the time model (pretrain/plan/timing.py), not to the count.
A call on a group of one rank moves nothing: it is recorded (``ranks`` 1) but left out of the totals.

**Groups**: ``tp``, ``pp``, ``dp`` (megatron-core's tensor-, pipeline- and data-parallel groups), ``mp`` (its
model-parallel group, TP × PP), ``world``; the same ranks as one of those count as it (first match in that
order), anything else is ``other``.

**Bookkeeping** (``Call.bookkeeping``): calls made inside an object collective (``all_gather_object``,
``broadcast_object_list``, ...: statistics, checkpoint metadata) and every call of at most ``SMALL_ELEMENTS``
elements (losses, the non-finite guard's flag, gradient norms, counters). The smallest model collective — a norm
weight's d elements under sequence parallelism, or a ZeRO-3 shard of one — is larger at any model size this
project runs. ``totals`` leaves bookkeeping out unless asked; the planner predicts model traffic only.

**Phases**: calls outside ``counter.step(i)`` belong to ``startup`` (DeepSpeed's parameter broadcasts, the
pipeline's replica sync) or, after a step, to ``between``.

``peak_tensor_memory`` measures the peak of torch's CPU tensor allocations over a piece of work (the profiler's
memory events over the live tensors it starts with), not the process's resident size.
"""
from __future__ import annotations

import contextlib
import gc
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

SMALL_ELEMENTS = 16
GROUPS = ("tp", "pp", "dp", "mp", "world")

# ProcessGroup method -> (kind, index of the argument whose tensors are the payload; -1: none)
_METHODS: dict[str, tuple[str, int]] = {
    "allreduce": ("all_reduce", 0),
    "allreduce_coalesced": ("all_reduce", 0),
    "broadcast": ("broadcast", 0),
    "reduce": ("reduce", 0),
    "allgather": ("all_gather", 0),
    "allgather_coalesced": ("all_gather", 0),
    "allgather_into_tensor_coalesced": ("all_gather", 0),
    "_allgather_base": ("all_gather", 0),
    "all_gather_single": ("all_gather", 0),
    "all_gather_single_coalesced": ("all_gather", 0),
    "reduce_scatter": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "reduce_scatter_single": ("reduce_scatter", 1),
    "reduce_scatter_single_coalesced": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 1),
    "send": ("p2p_send", 0),
    "recv": ("p2p_recv", 0),
    "recv_anysource": ("p2p_recv", 0),
    "alltoall": ("all_to_all", 1),
    "alltoall_base": ("all_to_all", 1),
    "all_to_all_single": ("all_to_all", 1),
    "gather": ("gather", 1),
    "scatter": ("scatter", 0),
    "barrier": ("barrier", -1),
}
_OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                       "send_object_list", "recv_object_list")


@dataclass(frozen=True)
class Call:
    phase: str          # "startup", "step N", "between"
    kind: str           # all_reduce, all_gather, reduce_scatter, reduce, broadcast, p2p_send, p2p_recv, ...
    group: str          # tp, pp, dp, mp, world, other
    ranks: int          # the group's size
    nbytes: int         # payload bytes (module docstring)
    elements: int
    bookkeeping: bool


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


class TrafficCounter:
    """The calls seen while installed (``count_traffic``), with their phase."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.phase = "startup"
        self._names: dict[int, str] = {}
        self._local = threading.local()

    # ---- phases -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, index: int) -> Iterator[None]:
        """Calls inside count as optimizer step ``index``."""
        self.phase = f"step {index}"
        try:
            yield
        finally:
            self.phase = "between"

    @contextlib.contextmanager
    def bookkeeping(self) -> Iterator[None]:
        """Calls inside count as bookkeeping whatever their size (object collectives use this)."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    # ---- recording ----------------------------------------------------------------------------------------------
    def group_name(self, pg) -> str:
        key = id(pg)
        if key not in self._names:
            self._names[key] = classify_group(pg)
        return self._names[key]

    def record(self, method: str, pg, args: tuple) -> None:
        kind, at = _METHODS[method]
        tensors = _tensors(args[at]) if 0 <= at < len(args) else []
        elements = sum(t.numel() for t in tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if kind == "gather":   # the gathered result: every rank's input
            nbytes, elements = nbytes * pg.size(), elements * pg.size()
        small = elements <= SMALL_ELEMENTS
        self.calls.append(Call(self.phase, kind, self.group_name(pg), pg.size(), nbytes, elements,
                               small or getattr(self._local, "depth", 0) > 0))

    # ---- results ------------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted({int(c.phase.split()[1]) for c in self.calls if c.phase.startswith("step ")})

    def select(self, *, phase: Optional[str] = None, step: Optional[int] = None,
               bookkeeping: Optional[bool] = False) -> list[Call]:
        """Calls of a phase (or optimizer step), on groups of two or more ranks; ``bookkeeping`` False: model
        traffic only, True: bookkeeping only, None: both."""
        want = f"step {step}" if step is not None else phase
        return [c for c in self.calls if (want is None or c.phase == want) and c.ranks > 1
                and (bookkeeping is None or c.bookkeeping == bookkeeping)]

    def totals(self, **select) -> dict[tuple[str, str], int]:
        """{(kind, group): payload bytes} over ``select``'s calls (see ``select``)."""
        out: dict[tuple[str, str], int] = defaultdict(int)
        for c in self.select(**select):
            out[(c.kind, c.group)] += c.nbytes
        return dict(out)

    def counts(self, **select) -> dict[tuple[str, str], int]:
        """{(kind, group): number of calls}."""
        out: dict[tuple[str, str], int] = defaultdict(int)
        for c in self.select(**select):
            out[(c.kind, c.group)] += 1
        return dict(out)


def _ranks(pg) -> tuple[int, ...]:
    try:
        return tuple(sorted(dist.get_process_group_ranks(pg)))
    except Exception:   # noqa: BLE001 - a group this rank is not in, or one torch does not know by name
        return ()


def _megatron_groups() -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        return {"world": dist.group.WORLD}
    return {"tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
            "dp": ps.get_data_parallel_group(), "mp": ps.get_model_parallel_group(), "world": dist.group.WORLD}


def classify_group(pg) -> str:
    """tp, pp, dp, mp or world (megatron-core's groups: the same object first, then the same ranks), else other."""
    known = _megatron_groups()
    for name in GROUPS:
        if name in known and known[name] is pg:
            return name
    if pg is dist.group.WORLD or pg is getattr(dist.distributed_c10d, "_get_default_group", lambda: None)():
        return "world"
    ranks = _ranks(pg)
    for name in GROUPS:
        if name in known and ranks and _ranks(known[name]) == ranks:
            return name
    return "other"


# ---- installation -----------------------------------------------------------------------------------------------
_active: list[TrafficCounter] = []


def _wrap_method(cls, name: str) -> Optional[Callable]:
    original = cls.__dict__.get(name) or getattr(cls, name, None)
    if original is None:
        return None

    def counted(self, *args, **kwargs):
        for counter in _active:
            counter.record(name, self, args)
        return original(self, *args, **kwargs)

    counted.__wrapped__ = original
    setattr(cls, name, counted)
    return original


def _wrap_object_collective(name: str) -> list[tuple[Any, str, Callable]]:
    original = getattr(dist.distributed_c10d, name, None)
    if original is None:
        return []

    def counted(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for counter in _active:
                stack.enter_context(counter.bookkeeping())
            return original(*args, **kwargs)

    counted.__wrapped__ = original
    undo = []
    for module in (dist, dist.distributed_c10d):
        if getattr(module, name, None) is original:
            setattr(module, name, counted)
            undo.append((module, name, original))
    return undo


@contextlib.contextmanager
def count_traffic() -> Iterator[TrafficCounter]:
    """Count every collective made in this process while open (module docstring). Not re-entrant across
    threads; nested counters each see every call."""
    counter = TrafficCounter()
    first = not _active
    undo: list[tuple[Any, str, Callable]] = []
    if first:
        pg_cls = dist.ProcessGroup
        for name in _METHODS:
            original = _wrap_method(pg_cls, name)
            if original is not None:
                undo.append((pg_cls, name, original))
        for name in _OBJECT_COLLECTIVES:
            undo += _wrap_object_collective(name)
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)


# ---- memory -----------------------------------------------------------------------------------------------------
def live_tensor_bytes() -> int:
    """Bytes of the CPU storages of every tensor Python can reach now (each storage once)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu" or obj.is_meta:
                continue
            if type(obj).__module__.startswith("torch._subclasses"):   # a compile's fake or functional tensors
                continue
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except Exception:   # noqa: BLE001 - tensor subclasses without storage or data (a compile's FakeTensors
            continue        # left alive), freed objects
        if ptr:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
    return sum(seen.values())


class MemoryPeak:
    """``peak_tensor_memory``'s result (bytes), filled in when its ``with`` block ends: ``start``, the live tensors
    at the start, or at the last ``mark``; ``peak``, the most allocated at once from there on; ``end``, ``start``
    plus what was allocated after it and not freed. ``segments``: (start, peak, end) of each stretch between
    marks (the first begins at the first mark, or at the start without one)."""

    _MARK = "peak_tensor_memory.mark"

    def __init__(self) -> None:
        self.start = self.peak = self.end = 0
        self.segments: list[tuple[int, int, int]] = []
        self._starts: list[int] = []

    def mark(self) -> None:
        """Begin a segment here: the live tensors now, then the allocations that follow. Work profiled before the
        first mark lets the profiler see the frees of what that work allocated (it reports no free of memory
        allocated before it started), so mark after a warm-up step to measure a steady one."""
        from torch.profiler import record_function

        gc.collect()
        self._starts.append(live_tensor_bytes())
        with record_function(self._MARK):
            pass


@contextlib.contextmanager
def peak_tensor_memory() -> Iterator[MemoryPeak]:
    """The peak of torch's CPU tensor memory over the work inside (or after each ``mark()``): the live tensors at
    the start plus the highest running sum of the allocations and frees that torch's profiler reports
    (``profile_memory``). The profiler reports no free of a block allocated before it started, so work that frees
    older tensors reads high: profile a warm-up step first and ``mark()`` before the one to measure."""
    from torch.profiler import ProfilerActivity, profile

    result = MemoryPeak()
    gc.collect()
    begin = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        yield result
    events = list(prof.profiler.kineto_results.events())
    marks = sorted(e.start_ns() for e in events if e.name() == MemoryPeak._MARK)
    bounds = marks or [None]
    starts = result._starts or [begin]
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.device_type() == torch.autograd.DeviceType.CPU and e.name() == "[memory]")
    for i, (since, start) in enumerate(zip(bounds, starts)):
        until = bounds[i + 1] if i + 1 < len(bounds) else None
        running = most = 0
        for t, delta in deltas:
            if (since is None or t >= since) and (until is None or t < until):
                running += delta
                most = max(most, running)
        result.segments.append((start, start + most, start + running))
    result.start, result.peak, result.end = result.segments[-1]
