"""pretrain/parallel/traffic.py in one process (conftest's world of one): what it records, how it classifies, and
that it leaves torch.distributed as it found it. The same counter against real multi-process runs:
tests/plan/test_measured.py."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import mappings

from pretrain.parallel.traffic import count_traffic, peak_tensor_memory


@pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor` is deprecated")
def test_calls_through_functions_bound_at_import_are_seen():
    """megatron's mappings hold all_gather_into_tensor from their import, before any counter existed."""
    with count_traffic() as counter:
        out = torch.empty(64)
        mappings.dist_all_gather_func(out, torch.ones(64), group=ps.get_tensor_model_parallel_group())
        dist.all_reduce(torch.ones(100), group=ps.get_data_parallel_group())
    (gather, reduce) = counter.calls
    assert (gather.kind, gather.group, gather.nbytes, gather.bookkeeping) == ("all_gather", "tp", 256, False)
    assert (reduce.kind, reduce.group, reduce.nbytes, reduce.elements) == ("all_reduce", "dp", 400, 100)


def test_bookkeeping_phases_and_groups_of_one():
    with count_traffic() as counter:
        dist.all_reduce(torch.ones(16))                             # a loss, a flag, a norm: bookkeeping
        with counter.step(0):
            dist.all_reduce(torch.ones(17))
            gathered = [None]
            dist.all_gather_object(gathered, {"stats": list(range(100))})   # an object collective: bookkeeping
        dist.broadcast(torch.ones(50), src=0)
    phases = [(c.phase, c.kind, c.bookkeeping) for c in counter.calls]
    assert phases[0] == ("startup", "all_reduce", True)
    assert phases[1] == ("step 0", "all_reduce", False)
    assert all(p == "step 0" and book for p, _, book in phases[2:-1]) and len(phases) > 3
    assert phases[-1] == ("between", "broadcast", False)
    assert counter.steps() == [0]
    # a world of one moves nothing: every call is recorded, none reaches the totals
    assert all(c.ranks == 1 for c in counter.calls) and counter.totals(step=0) == {}


def test_uninstalled_afterwards():
    before = {name: getattr(dist.ProcessGroup, name) for name in ("allreduce", "send", "_allgather_base")}
    objects = (dist.all_gather_object, dist.distributed_c10d.all_gather_object)
    with count_traffic():
        assert dist.ProcessGroup.allreduce is not before["allreduce"]
        assert dist.all_gather_object is not objects[0]
    assert {name: getattr(dist.ProcessGroup, name) for name in before} == before
    assert (dist.all_gather_object, dist.distributed_c10d.all_gather_object) == objects
    with count_traffic() as outer, count_traffic() as inner:     # nested counters both see a call
        dist.all_reduce(torch.ones(100))
    assert len(outer.calls) == len(inner.calls) == 1


def test_peak_tensor_memory():
    keep = torch.zeros(250_000)                                  # 1 MB alive before and after
    with peak_tensor_memory() as mem:
        a = torch.zeros(500_000)                                 # +2 MB
        b = a * 2                                                # +2 MB: the peak
        del a, b
        c = torch.ones(125_000)                                  # +0.5 MB left at the end
    assert mem.start >= 1_000_000
    assert 4_000_000 <= mem.peak - mem.start < 4_001_000
    assert mem.end - mem.start == 500_000
    del keep, c
