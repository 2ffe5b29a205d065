"""Resumable, deterministic, data-parallel loader over the token shards of ``data_prep/shards.py``.

    loader = TokenLoader("data/tok", split="train", micro_batch_size=16, seed=0,
                         dp_rank=rank, dp_size=world, num_workers=2)
    for tokens, labels in loader:          # int64 (B, seq_len) each; labels = tokens shifted by one
        n = label_count(labels)            # the labels that count (padding's are IGNORE_INDEX)
        ...
        ckpt["data"] = loader.state_dict() # per rank
    loader.load_state_dict(ckpt["data"])   # the next batch is exactly the one that would have come next

    val = TokenLoader("data/tok", split="val", micro_batch_size=16, shuffle=False, epochs=1,
                      dp_rank=rank, dp_size=world)   # one pass per ``for`` loop, same batches every time

With ``shuffle=False`` and ``num_workers=0`` a rank reads its shards in manifest order and their samples in tar
order; with workers, the workers' batches interleave (deterministically). In a bounded pass ranks may yield
different numbers of batches (none at all when the split has fewer samples than readers): sum validation losses
and token counts over ranks.

Call ``load_manifest(folder)`` first: every consumer (trainer, evaluation, the loader itself) then stops with the
same one line for a data set that is unfinished (with the command that finishes it) or has an empty split.

Labels are the sample shifted by one, except padding: the tokenizer pads the last sample of each split (the
manifest's ``pad_tokens``, see ``Manifest.padding``), and the labels of those positions are ``IGNORE_INDEX``
(model/loss.py), so the loss skips them; ``label_count(labels)`` is what token counts should use. Tokens stay
as they are.

Readers. The split is read by C *readers* (``readers``; default dp_size * max(1, num_workers): one per
(data-parallel rank, loader worker) pair). Rank r owns readers ``r + dp_size * j`` and its worker w runs those
with j ≡ w (mod workers), interleaving them; the rank's batches come from its readers in turn, so global
micro-batch ``g = k * dp_size + r`` (the k-th of rank r) is a batch of reader ``g mod C``, whatever the number of
ranks and workers. With a fixed C (a multiple of dp_size × workers) the sequence of global micro-batches — hence
of optimizer steps' samples, given the global batch — does not depend on the layout, and a position saved under
one number of ranks or workers continues under another (``load_state_dict``).

Epoch ``e`` orders the split's shards by a permutation drawn from (seed, e) (identity when ``shuffle=False``);
the shard at position ``p`` goes to reader ``(e * N + p) mod C`` (N shards). So in one epoch every shard, hence every sample, is read by exactly one
reader. Uneven shard counts: each reader gets ⌊N/C⌋ or ⌈N/C⌉ shards per epoch, and because the offset
``e * N`` moves on every epoch, the readers that get the extra shard rotate: over consecutive epochs no reader
falls systematically behind (the shard assignment is as if the epochs' orders were laid end to end and dealt
round-robin). Shards with 0 samples are ignored.

Fewer shards than readers (N < C): every shard is read as m contiguous parts (m the fewest >= ceil(C / N) that
gives every reader a part, ``data_readers.parts_per_shard``), and the parts take the place of the shards above
(order, assignment, shuffle seeds): still every sample once per epoch, deterministic, resumable. With N >= C a
part is a whole shard, so nothing changes. An unbounded loader needs at least C samples.

Within a shard (a part, when shards are cut), samples pass through a shuffle buffer of ``shuffle_buffer``
samples that is emptied at the end of the shard, with its random numbers drawn from (seed, epoch, shard index)
only: the order of a shard's samples in an epoch does not depend on who reads it. A buffer at least as large as
the shard is a uniform permutation of the shard. Memory per reader: shuffle_buffer * (seq_len + 1) * itemsize
(33 MB at 8192, seq 2048, uint16). Batches of a reader are ``micro_batch_size`` consecutive samples of its
stream, so a batch holds samples of one shard, or of the few around a shard boundary; the mix across shards comes
from the shuffled shard order and from the tokenizer's shards.

Each reader's stream is its samples of epoch 0, then of epoch 1, ... (``epochs=None``: forever; ``epochs=k``:
epochs 0..k-1). Unbounded, every batch is full and a batch may hold the last samples of one epoch and the first
of the next. Bounded (``epochs=k``), no sample is dropped: the last batch of each reader is short when its
sample count is not a multiple of B, so a rank yields up to max(1, num_workers) short batches (1..B-1 rows) per
pass, each the last batch of one worker (a worker with fewer samples ends, and yields its short batch, earlier
than the others). Ranks may yield different numbers of batches; ``len(loader)`` is this rank's count for a pass.
Each ``for`` over a bounded loader that has finished its pass starts a new pass; an interrupted pass continues.

Worker interleaving. ``torch.utils.data.DataLoader`` over an IterableDataset asks its workers in turn (0, 1,
..., W-1, 0, ...) and returns their batches in that order; a worker whose stream has ended is skipped. The
loader therefore knows, from the number ``n`` of batches it has yielded, how many batches each worker has
yielded, hence each reader's sample position. Every batch carries its worker id, checked against this model.

Resume state (``state_dict``): the layout (split, seed, dp_rank, dp_size, num_workers, readers,
micro_batch_size, shuffle, shuffle_buffer, epochs, and a fingerprint of the split's shards) and ``batches`` = n,
the number of batches yielded to the caller since epoch 0 of this pass (not those prefetched by workers).
``load_state_dict`` takes a state of another dp_size, dp_rank or num_workers over the same readers (an unbounded
loader, saved at an optimizer step, where every rank has read alike: the global count n × dp_size is re-divided)
and refuses any other difference. A rebuilt loader derives each worker's sample position, skips whole shards
by their manifest sample counts without opening them, and replays the shuffle of the one partly read shard per
worker, dropping its samples already yielded; the DataLoader's workers are renumbered so that the worker whose
turn it was comes first. ``epoch`` is the oldest epoch this rank is still reading (every sample of earlier
epochs has been yielded); it equals ``epochs`` after a full bounded pass.

Errors: a missing manifest, an unfinished data set or an empty split (``load_manifest``), a missing, truncated or
corrupt shard (``ShardError``, naming the file), a sample of the wrong length, or a shard holding another number
of samples than its manifest entry. With ``verify_sha256=True`` each shard's sha256 is checked against the
manifest every time it is opened.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from data_prep.shards import MANIFEST, Manifest
from model.loss import IGNORE_INDEX
from pretrain.data.readers import ReadPlan, Readers, RoundRobin, ShardError

__all__ = ["TokenLoader", "ShardError", "load_manifest", "label_count", "IGNORE_INDEX"]

STATE_VERSION = 1


def load_manifest(folder: str | Path, splits: tuple[str, ...] = ("train",)) -> Manifest:
    """The manifest of a tokenized data set, checked for reading: finished, and each of ``splits`` holds samples.
    Raises ValueError with one line (FileNotFoundError when there is no manifest); the trainer and every other
    consumer call this first, so all of them say the same."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    if not manifest.complete:
        from data_prep.finish import finish_command, shards_so_far
        so_far = ", ".join(f"{n} {split}" for split, n in shards_so_far(folder, manifest).items())
        raise ValueError(f"{folder}: the tokenization is unfinished ({so_far} shard(s) so far); finish it with: "
                         f"{finish_command(folder, manifest)}")
    for split in splits:
        if split not in manifest.splits:
            raise ValueError(f"{folder}: manifest has no split {split!r} (has {sorted(manifest.splits)})")
        if manifest.samples(split) == 0:
            raise ValueError(f"{folder}: split {split!r} has no samples ({_why_empty(manifest, split)}); "
                             "rerun data_prep/tokenize.py with more text"
                             + (" or a larger --val-fraction" if split == "val" else ""))
        try:
            manifest.padding(split)
        except ValueError as e:
            raise ValueError(f"{folder / MANIFEST}: {e}") from None
    return manifest


def _why_empty(m: Manifest, split: str) -> str:
    docs = m.counts.get("documents_val", 0) if split == "val" else \
        m.counts.get("documents", 0) - m.counts.get("documents_val", 0)
    why = f"{docs} documents, {m.counts.get(f'tokens_{split}', 0)} tokens"
    if split == "val":
        why += f" at --val-fraction {m.settings.get('val_fraction')}"
    if m.settings.get("last") == "drop":
        why += "; --last drop drops a partial last sample"
    return why


def shard_entries(manifest: Manifest, split: str) -> tuple[list[dict[str, Any]], list[int]]:
    """The split's shards that hold samples, and the padding tokens at the end of each."""
    kept = [(e, pad) for e, pad in zip(manifest.splits[split], manifest.padding(split)) if e["samples"] > 0]
    return [e for e, _ in kept], [pad for _, pad in kept]


def fingerprint(entries: list[dict[str, Any]]) -> str:
    """What a saved data position is valid for: the shards' names, sample counts and checksums."""
    return hashlib.sha256("\n".join(f"{e['name']} {e['samples']} {e['sha256']}" for e in entries)
                          .encode()).hexdigest()[:16]


def worker_batches(dataset, rr: RoundRobin, *, num_workers: int, pin_memory: bool,
                   prefetch_factor: int) -> Iterator[tuple]:
    """A reader dataset's items (tokens, labels, worker, ...) in this process or through DataLoader workers,
    checked against ``rr`` (advanced to the position the dataset starts at): DataLoader must hand out its
    workers' batches round-robin, or a resume would not be exact."""
    if num_workers == 0:
        source: Any = iter(dataset)
    else:
        source = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                 prefetch_factor=prefetch_factor, persistent_workers=False, in_order=True))
    try:
        for item in source:
            expected = rr.next()
            if item[2] != expected:
                raise RuntimeError(f"batch from loader worker {item[2]}, expected worker {expected}: DataLoader "
                                   "no longer interleaves workers round-robin, so resume would not be exact")
            if pin_memory and num_workers == 0:
                item = (item[0].pin_memory(), item[1].pin_memory(), *item[2:])
            yield item
    except ShardError as e:
        # DataLoader re-raises a worker's error with the worker's traceback in the message: keep its last line
        msg = str(e)
        if "Traceback" in msg:
            raise ShardError(msg.rsplit("ShardError: ", 1)[-1].strip()) from None
        raise
    finally:
        # stop the workers now: a traceback holding the DataLoader iterator would otherwise keep them alive
        # (and the next fork would inherit it)
        shutdown = getattr(source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def continued_batches(state: dict[str, Any], now: dict[str, Any], dp_size: int, *, movable: bool = True) -> int:
    """The rank's batch count that continues a saved position (``state``) under this loader's layout (``now``,
    its layout key). Another number of ranks or workers over the same readers is allowed when ``movable``: global
    micro-batch g comes from reader g mod R whatever the layout (readers.ReadPlan.reader_ids), so the position is
    the count of global micro-batches read — every rank's count × ranks, taken at a step, where all ranks have read
    alike. Any other difference is a ValueError listing it."""
    diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
    if set(diff) - {"dp_rank", "dp_size", "num_workers"} or (diff and not movable):
        raise ValueError("data loader state is from another layout (saved, now): "
                         + ", ".join(f"{k}: {a!r}, {b!r}" for k, (a, b) in diff.items()))
    consumed = int(state["batches"]) * int(state["dp_size"])
    if consumed % dp_size:
        raise ValueError(f"data loader state: {consumed} micro-batches read by {state['dp_size']} rank(s) "
                         f"cannot be continued by {dp_size}")
    return consumed // dp_size


def label_count(labels: torch.Tensor) -> torch.Tensor:
    """The number of labels that count (not padding) in a batch, as a tensor on the labels' device (no host
    sync): what token counts, tokens/s and MFU should use."""
    return (labels != IGNORE_INDEX).sum()


class TokenLoader:
    """See the module docstring. Iterating yields ``(tokens, labels)``, int64 tensors of shape (B, seq_len)."""

    def __init__(self, folder: str | Path, split: str = "train", *, micro_batch_size: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, shuffle_buffer: int = 8192, verify_sha256: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2, readers: Optional[int] = None):
        folder = Path(folder)
        manifest = load_manifest(folder, (split,))
        entries, pads = shard_entries(manifest, split)
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"bad loader settings: micro_batch_size={micro_batch_size} dp_rank={dp_rank} "
                             f"dp_size={dp_size} num_workers={num_workers} shuffle_buffer={shuffle_buffer}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs}: use None (forever) or a positive count")
        readers = readers or dp_size * max(1, num_workers)
        if epochs is None and manifest.samples(split) < readers:
            raise ValueError(f"{folder}: split {split!r} has {manifest.samples(split)} samples, fewer than the "
                             f"{readers} readers (dp_size {dp_size} x workers {max(1, num_workers)}), so some would "
                             "never get a batch; use fewer workers or more data")
        self.folder, self.split, self.seq_len = folder, split, manifest.seq_len
        self.micro_batch_size, self.seed, self.epochs, self.shuffle = micro_batch_size, seed, epochs, shuffle
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._plan = ReadPlan(folder, entries, pads, seq_len=manifest.seq_len, dtype=manifest.np_dtype, seed=seed,
                               dp_rank=dp_rank, dp_size=dp_size, workers=max(1, num_workers),
                               batch=micro_batch_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                               epochs=epochs, verify_sha256=verify_sha256, readers=readers)
        self._fingerprint = fingerprint(entries)
        self._batches = 0

    # ---- position ----------------------------------------------------------------------------------------
    def _totals(self) -> list[Optional[int]]:
        return [self._plan.reader_batches(w) for w in range(self._plan.workers)]

    def _round_robin(self, n: int) -> RoundRobin:
        rr = RoundRobin(self._totals())
        rr.advance(n)
        return rr

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an unbounded TokenLoader (epochs=None) has no length")
        return sum(self._totals())

    @property
    def readers(self) -> int:
        return self._plan.readers

    @property
    def epoch(self) -> int:
        """The oldest epoch this rank is still reading: every sample of earlier epochs has been yielded."""
        lay, rr = self._plan, self._round_robin(self._batches)
        return min(lay.locate(r, d * lay.batch)[0] for w, done in enumerate(rr.done)
                   for r, d in zip(lay.reader_ids(w), lay.reader_positions(w, done)[0]))

    # ---- state -------------------------------------------------------------------------------------------
    def _layout_key(self) -> dict[str, Any]:
        lay = self._plan
        return dict(split=self.split, seed=self.seed, dp_rank=self.dp_rank, dp_size=self.dp_size,
                    num_workers=self.num_workers, micro_batch_size=self.micro_batch_size, shuffle=self.shuffle,
                    shuffle_buffer=lay.shuffle_buffer, epochs=self.epochs, shards=self._fingerprint,
                    readers=lay.readers)

    def state_dict(self) -> dict[str, Any]:
        return dict(version=STATE_VERSION, batches=self._batches, epoch=self.epoch, **self._layout_key())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == "mixture":
            raise ValueError("data: the checkpoint was trained on a mixture (data.sources); give its data.sources "
                             "to continue it")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        state = {"readers": state["dp_size"] * max(1, state["num_workers"]), **state}   # saved before readers were
        # a bounded pass (validation) continues only under its own layout
        n = continued_batches(state, self._layout_key(), self.dp_size, movable=self.epochs is None)
        if n < 0 or (self.epochs is not None and n > len(self)):
            raise ValueError(f"data loader state: batches={n} is outside this pass")
        self._batches = n

    # ---- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.epochs is not None and self._batches >= len(self):
            self._batches = 0                       # a finished bounded pass: the next ``for`` is a new pass
        rr = self._round_robin(self._batches)
        readers = Readers(self._plan, list(rr.done), rr.turn)
        for tokens, labels, _ in worker_batches(readers, rr, num_workers=self.num_workers,
                                                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor):
            self._batches += 1
            yield tokens, labels

    @property
    def last_source(self) -> int:
        """The source of the batch yielded last: a single data set is source 0 (see MixtureLoader)."""
        return 0
