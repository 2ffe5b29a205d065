"""The reading side of ``pretrain.data.loader.TokenLoader``: which reader gets which parts of which shards in which epoch
(``ReadPlan``), the order in which DataLoader hands out its workers' batches (``RoundRobin``), and the per-worker
webdataset pipeline (``Readers``: plan of parts -> tar samples -> decoded, counted -> shuffled -> batches). The
design is described in ``pretrain/data/loader.py``."""
from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_prep.shards import SUFFIX, sha256_file
from model.loss import IGNORE_INDEX

_ORDER, _SAMPLES = 0x5EED0, 0x5EED1          # stream ids for the numpy SeedSequence


class ShardError(ValueError):
    """A shard is missing, truncated, corrupt or does not match the manifest; the message names the file."""


def parts_per_shard(counts: list[int], readers: int) -> int:
    """How many contiguous parts each shard is read as: 1 when there are at least as many shards as readers;
    else the fewest m >= ceil(readers / shards) for which cutting every shard into min(m, its samples) parts
    gives a part to every reader (or every sample its own part, when there are fewer samples than readers)."""
    if len(counts) >= readers:
        return 1
    m = -(-readers // len(counts))
    while sum(min(m, c) for c in counts) < readers and m < max(counts):
        m += 1
    return m


class ReadPlan:
    """Everything derived from the manifest and the loader's settings, shared by the loader and its workers.

    The unit of assignment is a *part*: a contiguous run of a shard's samples, (shard, first, end). A shard is one
    part unless there are fewer shards than readers (``parts_per_shard``); part i is then shard i, so nothing
    differs from reading whole shards."""

    def __init__(self, folder: Path, entries: list[dict[str, Any]], pads: list[int], *, seq_len: int,
                 dtype: np.dtype, seed: int, dp_rank: int, dp_size: int, workers: int, batch: int, shuffle: bool,
                 shuffle_buffer: int, epochs: Optional[int], verify_sha256: bool, readers: Optional[int] = None):
        self.folder, self.entries, self.pads = folder, entries, pads
        self.seq_len, self.dtype, self.seed = seq_len, dtype, seed
        self.dp_rank, self.dp_size, self.workers, self.batch = dp_rank, dp_size, workers, batch
        self.shuffle, self.shuffle_buffer, self.epochs, self.verify_sha256 = shuffle, shuffle_buffer, epochs, verify_sha256
        self.readers = readers or dp_size * workers
        if self.readers % (dp_size * workers):
            raise ValueError(f"{self.readers} readers cannot be shared evenly by {dp_size} data-parallel rank(s) × "
                             f"{workers} worker(s); choose a multiple of {dp_size * workers}")
        m = parts_per_shard([e["samples"] for e in entries], self.readers)
        self.parts: list[tuple[int, int, int]] = []
        for i, e in enumerate(entries):
            k = min(m, e["samples"])
            self.parts += [(i, j * e["samples"] // k, (j + 1) * e["samples"] // k) for j in range(k)]
        self.counts = np.array([end - first for _, first, end in self.parts], dtype=np.int64)
        self._totals: list[np.ndarray] = []      # per epoch: samples of each reader

    def reader_ids(self, worker: int) -> list[int]:
        """The readers ``worker`` of this rank runs, in the order it interleaves them: this rank owns readers
        dp_rank + dp_size·j (j = 0..R/dp_size-1) and its worker w those with j ≡ w (mod workers). So the rank's
        k-th batch comes from reader dp_rank + dp_size·(k mod R/dp_size), i.e. global micro-batch k·dp_size +
        dp_rank comes from reader (that number) mod R, whatever the number of ranks and workers."""
        per_rank = self.readers // self.dp_size
        return [self.dp_rank + self.dp_size * j for j in range(worker, per_rank, self.workers)]

    def batches_of(self, reader: int) -> Optional[int]:
        """Batches a reader yields in a bounded pass; None when unbounded."""
        if self.epochs is None:
            return None
        return -(-sum(self.total(e, reader) for e in range(self.epochs)) // self.batch)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.parts)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, _ORDER]).permutation(n)

    def shards(self, epoch: int, reader: int) -> np.ndarray:
        """Indices (into ``parts``) of the parts ``reader`` reads in ``epoch``, in reading order."""
        first = (reader - epoch * len(self.parts)) % self.readers
        return self.order(epoch)[first::self.readers]

    def total(self, epoch: int, reader: int) -> int:
        while len(self._totals) <= epoch:
            e, n = len(self._totals), len(self.parts)
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
        return sum(self.batches_of(r) for r in self.reader_ids(worker))

    def reader_positions(self, worker: int, done: int) -> tuple[list[int], int]:
        """(batches done by each of the worker's readers, whose turn is next) after the worker yielded ``done``."""
        rr = RoundRobin([self.batches_of(r) for r in self.reader_ids(worker)])
        rr.advance(done)
        return rr.done, rr.turn


class RoundRobin:
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


class Readers(IterableDataset):
    """The per-worker part: a webdataset pipeline (plan of shards -> tar samples -> shuffled -> batches)."""

    def __init__(self, plan: ReadPlan, done: list[int], turn: int):
        super().__init__()
        self.plan, self.done, self.turn = plan, done, turn

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        lay = self.plan
        worker = ((info.id if info is not None else 0) + self.turn) % lay.workers
        readers = lay.reader_ids(worker)
        done, turn = lay.reader_positions(worker, self.done[worker])
        # one pipeline per reader, their batches interleaved in turn (a reader whose bounded pass ended skipped)
        pipelines = [self.stream(r, d * lay.batch) for r, d in zip(readers, done)]
        rr = RoundRobin([lay.batches_of(r) for r in readers])
        rr.done, rr.turn = list(done), turn
        while (j := rr.next()) is not None:
            tokens, labels = next(pipelines[j])
            yield tokens, labels, worker

    def stream(self, reader: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One reader's batches from its sample number ``start`` on (a mixture's reader slots use this too)."""
        return iter(wds.DataPipeline(partial(self._plan, reader, start), self._samples, self._batches))

    def _plan(self, reader: int, start: int) -> Iterator[dict[str, Any]]:
        """The reader's parts from sample ``start`` on, whole parts before it skipped by their counts."""
        lay = self.plan
        epoch, skip = lay.locate(reader, start)
        while lay.epochs is None or epoch < lay.epochs:
            for i in lay.shards(epoch, reader):
                n = int(lay.counts[i])
                if skip >= n:
                    skip -= n
                    continue
                shard = lay.parts[i][0]
                yield dict(url=str(lay.folder / lay.entries[shard]["name"]), epoch=epoch, part=int(i), skip=skip)
                skip = 0
            epoch += 1

    def _samples(self, plan: Iterator[dict[str, Any]]) -> Iterator[tuple[np.ndarray, int]]:
        """(sample, padding tokens at its end) of each planned part, shuffled within the part."""
        lay = self.plan
        for item in plan:
            shard, first, end = lay.parts[item["part"]]
            path, entry = Path(item["url"]), lay.entries[shard]
            if lay.verify_sha256:
                if not path.exists():
                    raise ShardError(f"{path}: shard listed in the manifest is missing")
                if sha256_file(path) != entry["sha256"]:
                    raise ShardError(f"{path}: sha256 differs from the manifest; re-create it with data_prep/tokenize.py")
            source = dict(url=str(path))             # url_opener stores the open stream here; closed below
            try:
                tar = wds.tarfile_to_samples(handler=_shard_handler(path))([source])
                decoded = self._decode(tar, path, entry["samples"], lay.pads[shard])
                if (first, end) != (0, entry["samples"]):
                    # a part of a shard: the samples before it are read and dropped, those after it not read (a
                    # shard shorter than its entry still stops whoever reads past its end)
                    decoded = itertools.islice(decoded, first, end)
                rng = np.random.default_rng([lay.seed, item["epoch"], item["part"], _SAMPLES])
                ordered = self._shuffle(decoded, end - first, rng) if lay.shuffle else decoded
                yield from itertools.islice(ordered, item["skip"], None)
            finally:
                if source.get("stream") is not None:
                    source["stream"].close()

    def _decode(self, tar: Iterator[dict[str, Any]], path: Path, expected: int,
                pad: int) -> Iterator[tuple[np.ndarray, int]]:
        """(sample, its padding tokens): only a shard's last sample can end in padding, ``pad`` tokens of it."""
        width, count = self.plan.seq_len + 1, 0
        for sample in tar:
            data = sample.get(SUFFIX)
            if data is None or len(data) != width * self.plan.dtype.itemsize:
                got = f"no .{SUFFIX} member" if data is None else f"{len(data)} bytes"
                raise ShardError(f"{path}: sample {sample.get('__key__')} has {got}, expected {width} tokens "
                                 f"of {self.plan.dtype.itemsize} bytes; re-create it with data_prep/tokenize.py")
            tokens = np.frombuffer(data, dtype=self.plan.dtype)
            count += 1
            if count > expected:
                raise ShardError(f"{path}: holds more than the {expected} samples its manifest entry lists")
            yield tokens, (pad if count == expected else 0)
        if count != expected:
            raise ShardError(f"{path}: holds {count} samples, the manifest says {expected} (truncated?); "
                             "re-create it with data_prep/tokenize.py")

    def _shuffle(self, samples: Iterator[Any], n: int, rng: np.random.Generator) -> Iterator[Any]:
        size, buf = self.plan.shuffle_buffer, []
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

    def _batches(self, samples: Iterator[tuple[np.ndarray, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b, rows = self.plan.batch, []
        for s in samples:
            rows.append(s)
            if len(rows) == b:
                yield _collate(rows)
                rows = []
        if rows:                                     # bounded mode only: the reader's short last batch
            yield _collate(rows)


def _collate(rows: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), contiguous int64 halves of one buffer (one shared-memory block between processes). The
    labels of padding are IGNORE_INDEX, so they count nowhere; the tokens stay as they are."""
    arr = np.stack([r for r, _ in rows])
    out = np.empty((2, arr.shape[0], arr.shape[1] - 1), dtype=np.int64)
    out[0] = arr[:, :-1]
    out[1] = arr[:, 1:]
    for k, (_, pad) in enumerate(rows):
        if pad:                         # labels are the sample from its second token: the last `pad` are padding
            out[1, k, -pad:] = IGNORE_INDEX
    t = torch.from_numpy(out)
    return t[0], t[1]
