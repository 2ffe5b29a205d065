"""Resumable, deterministic, data-parallel loader over the token shards of ``data_prep/shards.py``.

    loader = TokenLoader("data/tok", split="train", micro_batch_size=16, seed=0,
                         dp_rank=rank, dp_size=world, num_workers=2)
    for tokens, labels in loader:          # int64 (B, seq_len) each; labels = tokens shifted by one
        ...
        ckpt["data"] = loader.state_dict() # per rank
    loader.load_state_dict(ckpt["data"])   # the next batch is exactly the one that would have come next

    val = TokenLoader("data/tok", split="val", micro_batch_size=16, shuffle=False, epochs=1,
                      dp_rank=rank, dp_size=world)   # one ordered pass per ``for`` loop

Readers. Every (data-parallel rank, loader worker) pair is one *reader*, numbered ``c = worker * dp_size +
rank`` (C = dp_size * max(1, num_workers) readers). Epoch ``e`` orders the split's shards by a permutation
drawn from (seed, e) (identity when ``shuffle=False``); the shard at position ``p`` goes to reader
``(e * N + p) mod C`` (N shards). So in one epoch every shard, hence every sample, is read by exactly one
reader. Uneven shard counts: each reader gets ⌊N/C⌋ or ⌈N/C⌉ shards per epoch, and because the offset
``e * N`` moves on every epoch, the readers that get the extra shard rotate: over consecutive epochs no reader
falls systematically behind (the shard assignment is as if the epochs' orders were laid end to end and dealt
round-robin). Shards with 0 samples are ignored. An unbounded loader needs N >= C.

Within a shard, samples pass through a shuffle buffer of ``shuffle_buffer`` samples that is emptied at the end
of the shard, with its random numbers drawn from (seed, epoch, shard index) only: the order of a shard's samples
in an epoch does not depend on who reads it. A buffer at least as large as the shard is a uniform permutation
of the shard. Memory per reader: shuffle_buffer * (seq_len + 1) * itemsize (33 MB at 8192, seq 2048, uint16).
Batches of a reader are ``micro_batch_size`` consecutive samples of its stream, so a batch holds samples of
one or two shards; the mix across shards comes from the shuffled shard order and from the tokenizer's shards.

Each reader's stream is its samples of epoch 0, then of epoch 1, ... (``epochs=None``: forever; ``epochs=k``:
epochs 0..k-1). Unbounded, every batch is full and a batch may hold the last samples of one epoch and the first
of the next. Bounded (``epochs=k``), no sample is dropped: the last batch of each reader is short when its
sample count is not a multiple of B, so a rank yields up to max(1, num_workers) short batches near the end of
a pass (each with 1..B-1 rows). ``len(loader)`` is the number of batches of a pass for this rank.

Worker interleaving. ``torch.utils.data.DataLoader`` over an IterableDataset asks its workers in turn (0, 1,
..., W-1, 0, ...) and returns their batches in that order; a worker whose stream has ended is skipped. The
loader therefore knows, from the number ``n`` of batches it has yielded, how many batches each worker has
yielded, hence each reader's sample position. Every batch carries its worker id, checked against this model.

Resume state (``state_dict``): the layout (split, seed, dp_rank, dp_size, num_workers, micro_batch_size,
shuffle, shuffle_buffer, epochs, and a fingerprint of the split's shards) and ``batches`` = n, the number of
batches yielded to the caller since epoch 0 of this pass (not those prefetched by workers). ``load_state_dict``
refuses a state of another layout. A rebuilt loader derives each worker's sample position, skips whole shards
by their manifest sample counts without opening them, and replays the shuffle of the one partly read shard per
worker, dropping its samples already yielded; the DataLoader's workers are renumbered so that the worker whose
turn it was comes first. ``epoch`` is the oldest epoch this rank is still reading (every sample of earlier
epochs has been yielded); it equals ``epochs`` after a full bounded pass.

Errors: a missing manifest, a missing, truncated or corrupt shard (``ShardError``, naming the file), a sample
of the wrong length, or a shard holding another number of samples than its manifest entry. With
``verify_sha256=True`` each shard's sha256 is checked against the manifest every time it is opened.
"""
from __future__ import annotations

import hashlib
import itertools
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.shards import SUFFIX, Manifest, sha256_file

STATE_VERSION = 1
_ORDER, _SAMPLES = 0x5EED0, 0x5EED1          # stream ids for the numpy SeedSequence


class ShardError(ValueError):
    """A shard is missing, truncated, corrupt or does not match the manifest; the message names the file."""


class _Layout:
    """Everything derived from the manifest and the loader's settings, shared by the loader and its workers."""

    def __init__(self, folder: Path, entries: list[dict[str, Any]], *, seq_len: int, dtype: np.dtype, seed: int,
                 dp_rank: int, dp_size: int, workers: int, batch: int, shuffle: bool, shuffle_buffer: int,
                 epochs: Optional[int], verify_sha256: bool):
        self.folder, self.entries = folder, entries
        self.counts = np.array([e["samples"] for e in entries], dtype=np.int64)
        self.seq_len, self.dtype, self.seed = seq_len, dtype, seed
        self.dp_rank, self.dp_size, self.workers, self.batch = dp_rank, dp_size, workers, batch
        self.shuffle, self.shuffle_buffer, self.epochs, self.verify_sha256 = shuffle, shuffle_buffer, epochs, verify_sha256
        self.readers = dp_size * workers
        self._totals: list[np.ndarray] = []      # per epoch: samples of each reader

    def reader(self, worker: int) -> int:
        return worker * self.dp_size + self.dp_rank

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.entries)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, _ORDER]).permutation(n)

    def shards(self, epoch: int, reader: int) -> np.ndarray:
        """Indices (into ``entries``) of the shards ``reader`` reads in ``epoch``, in reading order."""
        first = (reader - epoch * len(self.entries)) % self.readers
        return self.order(epoch)[first::self.readers]

    def total(self, epoch: int, reader: int) -> int:
        while len(self._totals) <= epoch:
            e, n = len(self._totals), len(self.entries)
            owner = (e * n + np.arange(n)) % self.readers
            self._totals.append(np.bincount(owner, weights=self.counts[self.order(e)],
                                            minlength=self.readers).astype(np.int64))
        return int(self._totals[epoch][reader])

    def locate(self, reader: int, sample: int) -> tuple[int, int]:
        """(epoch, offset in that epoch) of sample number ``sample`` of the reader's stream; (epochs, 0) past the end."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            t = self.total(epoch, reader)
            if sample < t:
                return epoch, sample
            sample, epoch = sample - t, epoch + 1
        return epoch, 0

    def reader_batches(self, worker: int) -> Optional[int]:
        """Batches a worker yields in a bounded pass; None when unbounded."""
        if self.epochs is None:
            return None
        n = sum(self.total(e, self.reader(worker)) for e in range(self.epochs))
        return -(-n // self.batch)


class _RoundRobin:
    """The order in which DataLoader hands out its workers' batches: in turn, skipping workers that are done."""

    def __init__(self, totals: list[Optional[int]]):
        self.totals, self.done, self.turn = totals, [0] * len(totals), 0

    def _left(self, w: int) -> float:
        t = self.totals[w]
        return float("inf") if t is None else t - self.done[w]

    def next(self) -> Optional[int]:
        for _ in range(len(self.totals)):
            w, self.turn = self.turn, (self.turn + 1) % len(self.totals)
            if self._left(w) > 0:
                self.done[w] += 1
                return w
        return None

    def advance(self, n: int) -> None:
        """Hand out ``n`` batches; whole rounds at once."""
        while n > 0:
            active = [w for w in range(len(self.totals)) if self._left(w) > 0]
            if not active:
                raise ValueError("resume state points past the end of the pass")
            rounds = min(min(self._left(w) for w in active), n // len(active)) if self.turn == 0 else 0
            if rounds > 0:
                for w in active:
                    self.done[w] += int(rounds)
                n -= int(rounds) * len(active)
            else:
                n -= self.next() is not None


def _shard_handler(path: Path):
    def handler(exn: Exception) -> bool:
        if isinstance(exn, ShardError):
            raise exn
        if isinstance(exn, FileNotFoundError):
            raise ShardError(f"{path}: shard listed in the manifest is missing") from None
        detail = str(exn.args[0]) if exn.args else ""
        raise ShardError(f"{path}: corrupt or truncated shard ({type(exn).__name__}: {detail}); "
                         "re-create it with data_prep/tokenize.py") from None
    return handler


class _Readers(IterableDataset):
    """The per-worker part: a webdataset pipeline (plan of shards -> tar samples -> shuffled -> batches)."""

    def __init__(self, layout: _Layout, done: list[int], turn: int):
        super().__init__()
        self.layout, self.done, self.turn = layout, done, turn

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.turn) % self.layout.workers
        reader = self.layout.reader(worker)
        start = self.done[worker] * self.layout.batch
        pipeline = wds.DataPipeline(partial(self._plan, reader, start), self._samples, self._batches)
        for tokens, labels in pipeline:
            yield tokens, labels, worker

    def _plan(self, reader: int, start: int) -> Iterator[dict[str, Any]]:
        """The reader's shards from sample ``start`` on, whole shards before it skipped by their counts."""
        lay = self.layout
        epoch, skip = lay.locate(reader, start)
        while lay.epochs is None or epoch < lay.epochs:
            for i in lay.shards(epoch, reader):
                n = int(lay.counts[i])
                if skip >= n:
                    skip -= n
                    continue
                yield dict(url=str(lay.folder / lay.entries[i]["name"]), epoch=epoch, shard=int(i), skip=skip)
                skip = 0
            epoch += 1

    def _samples(self, plan: Iterator[dict[str, Any]]) -> Iterator[np.ndarray]:
        lay = self.layout
        for item in plan:
            path, entry = Path(item["url"]), lay.entries[item["shard"]]
            if lay.verify_sha256:
                if not path.exists():
                    raise ShardError(f"{path}: shard listed in the manifest is missing")
                if sha256_file(path) != entry["sha256"]:
                    raise ShardError(f"{path}: sha256 differs from the manifest; re-create it with data_prep/tokenize.py")
            source = dict(url=str(path))             # url_opener stores the open stream here; closed below
            try:
                tar = wds.tarfile_to_samples(handler=_shard_handler(path))([source])
                decoded = self._decode(tar, path, entry["samples"])
                rng = np.random.default_rng([lay.seed, item["epoch"], item["shard"], _SAMPLES])
                ordered = self._shuffle(decoded, entry["samples"], rng) if lay.shuffle else decoded
                yield from itertools.islice(ordered, item["skip"], None)
            finally:
                if source.get("stream") is not None:
                    source["stream"].close()

    def _decode(self, tar: Iterator[dict[str, Any]], path: Path, expected: int) -> Iterator[np.ndarray]:
        width, count = self.layout.seq_len + 1, 0
        for sample in tar:
            data = sample.get(SUFFIX)
            if data is None or len(data) != width * self.layout.dtype.itemsize:
                got = f"no .{SUFFIX} member" if data is None else f"{len(data)} bytes"
                raise ShardError(f"{path}: sample {sample.get('__key__')} has {got}, expected {width} tokens "
                                 f"of {self.layout.dtype.itemsize} bytes; re-create it with data_prep/tokenize.py")
            tokens = np.frombuffer(data, dtype=self.layout.dtype)
            count += 1
            if count > expected:
                raise ShardError(f"{path}: holds more than the {expected} samples its manifest entry lists")
            yield tokens
        if count != expected:
            raise ShardError(f"{path}: holds {count} samples, the manifest says {expected} (truncated?); "
                             "re-create it with data_prep/tokenize.py")

    def _shuffle(self, samples: Iterator[np.ndarray], n: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        size, buf = self.layout.shuffle_buffer, []
        picks = rng.random(n)                        # drawn up front: one uniform per sample of the shard
        for i, s in enumerate(samples):
            if len(buf) < size:
                buf.append(s)
                continue
            j = int(picks[i] * size)
            yield buf[j]
            buf[j] = s
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _batches(self, samples: Iterator[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b, rows = self.layout.batch, []
        for s in samples:
            rows.append(s)
            if len(rows) == b:
                yield _collate(rows)
                rows = []
        if rows:                                     # bounded mode only: the reader's short last batch
            yield _collate(rows)


def _collate(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), contiguous int64 halves of one buffer (one shared-memory block between processes)."""
    arr = np.stack(rows)
    out = np.empty((2, arr.shape[0], arr.shape[1] - 1), dtype=np.int64)
    out[0] = arr[:, :-1]
    out[1] = arr[:, 1:]
    t = torch.from_numpy(out)
    return t[0], t[1]


class TokenLoader:
    """See the module docstring. Iterating yields ``(tokens, labels)``, int64 tensors of shape (B, seq_len)."""

    def __init__(self, folder: str | Path, split: str = "train", *, micro_batch_size: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 epochs: Optional[int] = None, shuffle_buffer: int = 8192, verify_sha256: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2):
        folder = Path(folder)
        manifest = Manifest.load(folder)             # FileNotFoundError naming the path when missing
        if split not in manifest.splits:
            raise ValueError(f"{folder}: manifest has no split {split!r} (has {sorted(manifest.splits)})")
        entries = [e for e in manifest.splits[split] if e["samples"] > 0]
        if not entries:
            raise ValueError(f"{folder}: split {split!r} has no samples")
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError(f"bad loader settings: micro_batch_size={micro_batch_size} dp_rank={dp_rank} "
                             f"dp_size={dp_size} num_workers={num_workers} shuffle_buffer={shuffle_buffer}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs}: use None (forever) or a positive count")
        readers = dp_size * max(1, num_workers)
        if epochs is None and len(entries) < readers:
            raise ValueError(f"{folder}: split {split!r} has {len(entries)} shards, fewer than the {readers} readers "
                             f"(dp_size {dp_size} x workers {max(1, num_workers)}); use fewer workers or more shards")
        self.folder, self.split, self.seq_len = folder, split, manifest.seq_len
        self.micro_batch_size, self.seed, self.epochs, self.shuffle = micro_batch_size, seed, epochs, shuffle
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._layout = _Layout(folder, entries, seq_len=manifest.seq_len, dtype=manifest.np_dtype, seed=seed,
                               dp_rank=dp_rank, dp_size=dp_size, workers=max(1, num_workers),
                               batch=micro_batch_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                               epochs=epochs, verify_sha256=verify_sha256)
        self._fingerprint = hashlib.sha256("\n".join(f"{e['name']} {e['samples']} {e['sha256']}" for e in entries)
                                           .encode()).hexdigest()[:16]
        self._batches = 0

    # ---- position ----------------------------------------------------------------------------------------
    def _totals(self) -> list[Optional[int]]:
        return [self._layout.reader_batches(w) for w in range(self._layout.workers)]

    def _round_robin(self, n: int) -> _RoundRobin:
        rr = _RoundRobin(self._totals())
        rr.advance(n)
        return rr

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an unbounded TokenLoader (epochs=None) has no length")
        return sum(self._totals())

    @property
    def epoch(self) -> int:
        """The oldest epoch this rank is still reading: every sample of earlier epochs has been yielded."""
        lay, rr = self._layout, self._round_robin(self._batches)
        return min(lay.locate(lay.reader(w), done * lay.batch)[0] for w, done in enumerate(rr.done))

    # ---- state -------------------------------------------------------------------------------------------
    def _layout_key(self) -> dict[str, Any]:
        lay = self._layout
        return dict(split=self.split, seed=self.seed, dp_rank=self.dp_rank, dp_size=self.dp_size,
                    num_workers=self.num_workers, micro_batch_size=self.micro_batch_size, shuffle=self.shuffle,
                    shuffle_buffer=lay.shuffle_buffer, epochs=self.epochs, shards=self._fingerprint)

    def state_dict(self) -> dict[str, Any]:
        return dict(version=STATE_VERSION, batches=self._batches, epoch=self.epoch, **self._layout_key())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        diff = {k: (state.get(k), v) for k, v in self._layout_key().items() if state.get(k) != v}
        if diff:
            raise ValueError("data loader state is from another layout (saved, now): "
                             + ", ".join(f"{k}: {a!r}, {b!r}" for k, (a, b) in diff.items()))
        n = int(state["batches"])
        if n < 0 or (self.epochs is not None and n > len(self)):
            raise ValueError(f"data loader state: batches={n} is outside this pass")
        self._batches = n

    # ---- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.epochs is not None and self._batches >= len(self):
            self._batches = 0                       # a finished bounded pass: the next ``for`` is a new pass
        rr = self._round_robin(self._batches)
        readers = _Readers(self._layout, list(rr.done), rr.turn)
        if self.num_workers == 0:
            source: Any = iter(readers)
        else:
            source = iter(DataLoader(readers, batch_size=None, num_workers=self.num_workers,
                                     pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                                     persistent_workers=False, in_order=True))
        try:
            for tokens, labels, worker in source:
                expected = rr.next()
                if worker != expected:
                    raise RuntimeError(f"batch from loader worker {worker}, expected worker {expected}: DataLoader "
                                       "no longer interleaves workers round-robin, so resume would not be exact")
                if self.pin_memory and self.num_workers == 0:
                    tokens, labels = tokens.pin_memory(), labels.pin_memory()
                self._batches += 1
                yield tokens, labels
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
