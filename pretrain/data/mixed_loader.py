"""The training loader of a data mixture: several tokenized folders, one source per global micro-batch.

    loader = MixtureLoader({"web": "data/web", "code": "data/code"}, phases, micro_per_step=8,
                           micro_batch_size=16, seed=0, dp_rank=rank, dp_size=world, num_workers=2)
    for tokens, labels in loader:
        src = loader.last_source           # index into loader.names: which source this batch came from

Reading is TokenLoader's (pretrain/data/loader.py), once per source: every source has R readers of its own with
its own epochs (a small source starts over while a large one goes on), and global micro-batch g belongs to reader
*slot* g mod R, which the layout assigns to a rank and worker exactly as a single data set's reader g mod R. The
slot's k-th batch is global micro-batch g = slot + k·R; it comes from source ``schedule.source_of(g)``
(pretrain/data/mixture.py) and, within that source, from its reader ``slot`` — the next batch that reader has not
yet given. So the batch at every global position is a function of (seed, g, R, the schedule, the data), whatever
the number of ranks and workers, and a position saved under one layout continues under another (the same rule as
TokenLoader: the count of global micro-batches read).

Resume: a slot that has given d batches has given, of source i, as many as the schedule sends to i among
slot, slot + R, ..., slot + (d-1)·R (``MixSchedule.slot_counts``); each source's reader continues from there. The
state also holds the schedule's segments and the phases as the config last gave them (mixture.plan: the past stays
as it was trained; a change to a phase that has begun needs data.allow_mix_change).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_prep.shards import Manifest
from pretrain.data import mixture
from pretrain.data.loader import continued_batches, fingerprint, load_manifest, shard_entries, worker_batches
from pretrain.data.mixture import MixSchedule, Phase, Segment
from pretrain.data.readers import ReadPlan, Readers, RoundRobin

STATE_VERSION = 1


def load_sources(folders: dict[str, str], splits: tuple[str, ...] = ("train",)) -> dict[str, Manifest]:
    """Every source's manifest, checked as load_manifest does, and checked to share one tokenizer and one sequence
    length; ValueError with one line naming the source (FileNotFoundError for a missing manifest)."""
    manifests: dict[str, Manifest] = {}
    for name, folder in folders.items():
        try:
            manifests[name] = load_manifest(folder, splits)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"sources.{name}: {e}") from None
    first, m0 = next(iter(manifests.items()))
    for name, m in manifests.items():
        sha0, sha = m0.tokenizer.get("sha256"), m.tokenizer.get("sha256")
        if sha != sha0:
            raise ValueError(f"sources.{name}: {folders[name]} was tokenized with another tokenizer than "
                             f"{folders[first]} (sha256 {str(sha)[:12]}… vs {str(sha0)[:12]}…); tokenize every "
                             "source with one model (data_prep/tokenize.py --corpus ... --tokenizer MODEL)")
        if m.seq_len != m0.seq_len:
            raise ValueError(f"sources.{name}: {folders[name]} has seq_len {m.seq_len} but {folders[first]} has "
                             f"{m0.seq_len}; tokenize every source with the same --seq-len")
    return manifests


def phases_of(data_cfg) -> list[Phase]:
    """The config's phases (pretrain.config.DataConfig): phase 0 is the sources' own weights, from step 0."""
    names = list(data_cfg.sources)
    out = [Phase(0, tuple((n, mixture.as_fraction(s.weight)) for n, s in data_cfg.sources.items()))]
    for ph in data_cfg.phases:
        out.append(Phase(ph.start, tuple((n, mixture.as_fraction(ph.weights.get(n, 0.0))) for n in names)))
    return out


class _MixedReaders(IterableDataset):
    """One worker's reader slots, each reading from the source the schedule names for its next global batch."""

    def __init__(self, plans: list[ReadPlan], schedule: MixSchedule, done: list[int], turn: int):
        super().__init__()
        self.plans, self.schedule, self.done, self.turn = plans, schedule, done, turn

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
        info = get_worker_info()
        lay = self.plans[0]                      # the slots are the same for every source
        worker = ((info.id if info is not None else 0) + self.turn) % lay.workers
        slots = lay.reader_ids(worker)
        done, turn = lay.reader_positions(worker, self.done[worker])
        readers = [Readers(p, [], 0) for p in self.plans]
        streams: dict[tuple[int, int], Iterator] = {}
        rr = RoundRobin([None] * len(slots))
        rr.done, rr.turn = list(done), turn
        start_counts = [None] * len(slots)      # per slot: batches of each source before its resume position
        while True:
            j = rr.next()
            k = rr.done[j] - 1
            g = slots[j] + k * lay.readers
            i = self.schedule.source_of(g)
            if (j, i) not in streams:
                if start_counts[j] is None:
                    start_counts[j] = self.schedule.slot_counts(slots[j], lay.readers, done[j])
                read = int(start_counts[j][i])   # batches of source i this slot gave before the resume position
                streams[(j, i)] = readers[i].stream(slots[j], read * lay.batch)
            tokens, labels = next(streams[(j, i)])
            yield tokens, labels, worker, i


class MixtureLoader:
    """See the module docstring. Iterating yields ``(tokens, labels)``; ``last_source`` says whose."""

    def __init__(self, folders: dict[str, str], phases: Sequence[Phase], *, micro_per_step: int,
                 micro_batch_size: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 8192, verify_sha256: bool = False, pin_memory: bool = False,
                 prefetch_factor: int = 2, readers: Optional[int] = None, allow_mix_change: bool = False):
        manifests = load_sources(folders)
        self.names = list(folders)
        readers = readers or dp_size * max(1, num_workers)
        self.plans, self.fingerprints, self.samples = [], {}, {}
        for name in self.names:
            m = manifests[name]
            if m.samples("train") < readers:
                raise ValueError(f"sources.{name}: {folders[name]} has {m.samples('train')} training samples, fewer "
                                 f"than the {readers} readers (dp_size {dp_size} x workers {max(1, num_workers)}), "
                                 "so some would never get a batch; use fewer workers or more data")
            entries, pads = shard_entries(m, "train")
            self.plans.append(ReadPlan(Path(folders[name]), entries, pads, seq_len=m.seq_len, dtype=m.np_dtype,
                                       seed=seed, dp_rank=dp_rank, dp_size=dp_size, workers=max(1, num_workers),
                                       batch=micro_batch_size, shuffle=True, shuffle_buffer=shuffle_buffer,
                                       epochs=None, verify_sha256=verify_sha256, readers=readers))
            self.fingerprints[name] = fingerprint(entries)
            self.samples[name] = m.samples("train")
        self.seq_len = manifests[self.names[0]].seq_len
        self.micro_batch_size, self.seed, self.micro_per_step = micro_batch_size, seed, micro_per_step
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.phases, self.allow_mix_change = list(phases), allow_mix_change
        self.schedule = MixSchedule(self.names, mixture.plan(self.phases, micro_per_step), seed)
        self.note: Optional[str] = None       # what a resume changed in the mix, for the trainer to print
        self._batches, self._last = 0, None

    @property
    def readers(self) -> int:
        return self.plans[0].readers

    @property
    def consumed(self) -> int:
        """Global micro-batches read by all ranks together (at an optimizer step, where every rank has read alike)."""
        return self._batches * self.dp_size

    @property
    def last_source(self) -> int:
        return self._last

    # ---- state -------------------------------------------------------------------------------------------
    def _layout_key(self) -> dict[str, Any]:
        lay = self.plans[0]
        return dict(dp_rank=self.dp_rank, dp_size=self.dp_size, num_workers=self.num_workers,
                    micro_batch_size=self.micro_batch_size, seed=self.seed, shuffle_buffer=lay.shuffle_buffer,
                    readers=lay.readers)

    def state_dict(self) -> dict[str, Any]:
        return dict(version=STATE_VERSION, kind="mixture", batches=self._batches, **self._layout_key(),
                    sources=dict(self.fingerprints), micro_per_step=self.micro_per_step,
                    phases=[p.to_state() for p in self.phases], segments=self.schedule.to_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "mixture":
            raise ValueError("data: the checkpoint was trained on one data set (data.path); a mixture "
                             "(data.sources) cannot continue its data position")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        batches = continued_batches(state, self._layout_key(), self.dp_size)
        consumed = batches * self.dp_size
        history = [Segment.from_state(s) for s in state["segments"]]
        saved_names = list(state["sources"])
        trained = MixSchedule(saved_names, history, self.seed).counts(consumed)
        for name, n in zip(saved_names, trained):
            if n and self.fingerprints.get(name) != state["sources"][name]:
                why = "is no longer a source" if name not in self.fingerprints else "holds other shards now"
                raise ValueError(f"data.sources.{name}: {why}, but the checkpoint read {n} micro-batches of it; "
                                 "a run continues only on the data it began with")
        at_step = consumed // int(state["micro_per_step"])
        saved_phases = [Phase.from_state(p) for p in state["phases"]]
        changes = mixture.started_changes(saved_phases, self.phases, at_step)
        if changes and not self.allow_mix_change:
            raise ValueError(f"data.phases: changed where training has begun (resumed at step {at_step}): "
                             f"{'; '.join(changes)}; set data.allow_mix_change=true to apply the new mix from step "
                             f"{at_step} on, or restore the saved weights")
        segments = mixture.plan(self.phases, self.micro_per_step, history=history, at_step=at_step,
                                at_micro=consumed)
        self.schedule = MixSchedule(self.names, segments, self.seed)
        self.note = (f"data: the mix changed where training had begun ({'; '.join(changes)}); the new weights "
                     f"apply from step {at_step} on (data.allow_mix_change=true)") if changes else None
        self._batches = batches

    # ---- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rr = RoundRobin([None] * max(1, self.num_workers))
        rr.advance(self._batches)
        dataset = _MixedReaders(self.plans, self.schedule, list(rr.done), rr.turn)
        for tokens, labels, _, source in worker_batches(dataset, rr, num_workers=self.num_workers,
                                                        pin_memory=self.pin_memory,
                                                        prefetch_factor=self.prefetch_factor):
            expected = self.schedule.source_of(self._batches * self.dp_size + self.dp_rank)
            if source != expected:
                raise RuntimeError(f"batch from source {self.names[source]}, the schedule says "
                                   f"{self.names[expected]}: the reader slots lost their order")
            self._batches += 1
            self._last = source
            yield tokens, labels
