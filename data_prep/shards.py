"""The on-disk format of tokenized training data: WebDataset tar shards plus a JSON manifest.

    OUT/manifest.json             what is there and how it was made (see Manifest)
    OUT/train-000000.tar …        shards of the training split
    OUT/val-000000.tar …          shards of the validation split

Each shard is a plain tar (readable by ``webdataset`` and by ``tar``) of samples; a sample is one packed training
sequence of ``seq_len + 1`` token ids (inputs and next-token labels overlap by one), stored as the member
``<key>.tokens``: raw little-endian ``uint16`` when the vocabulary fits, else ``uint32`` (the manifest's ``dtype``).
Keys are ``<split>-<shard>-<sample>`` with zero-padded numbers, so tar order is sample order.

Padding: the last sample of a split may end in padding (data_prep/writer.py); the manifest entry of the shard
holding it says how many tokens (``pad_tokens``), so a reader can keep them out of the loss (``Manifest.padding``).

A shard file appears only when complete: it is written under a temporary name in the same folder, flushed,
fsynced and renamed (conf/files.py). The manifest is written the same way.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from conf.files import atomic_write_bytes

FORMAT = "mor-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SUFFIX = "tokens"
# Key order of a shard entry in manifest.json: fixed, so an entry read back from the resume journal (stored with
# sorted keys) is written exactly as a fresh one and a resumed run's manifest is byte-identical.
ENTRY_KEYS = ("name", "samples", "tokens", "bytes", "sha256", "pad_tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, shard: int, sample: int) -> str:
    return f"{split}-{shard:06d}-{sample:06d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, split: str, index: int, samples: list[np.ndarray]) -> dict[str, Any]:
    """Write one complete shard atomically; returns its manifest entry. Output is byte-identical for equal input
    (fixed member metadata: no times, owners or modes from the machine)."""
    data = tar_bytes(split, index, samples)
    atomic_write_bytes(path, data)
    n_tokens = int(sum(len(s) for s in samples))
    return {"name": path.name, "samples": len(samples), "tokens": n_tokens, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def tar_bytes(split: str, index: int, samples: list[np.ndarray]) -> bytes:
    """The shard as a USTAR tar, byte for byte what ``tarfile`` writes for these members (mode 0644, uid/gid 0,
    mtime 0, no owner names). Only the first header of each name length and size is made by ``tarfile``; the
    others differ from it only in the name, so they are patched (name bytes and header checksum): ~6x faster
    than ``TarFile.addfile`` per sample, which matters when many workers feed one writer."""
    parts: list[bytes] = []
    total = 0
    base = b""
    base_name = b""
    base_sum = 0
    for i, sample in enumerate(samples):
        data = np.ascontiguousarray(sample).tobytes()
        name = f"{sample_key(split, index, i)}.{SUFFIX}".encode("ascii")
        if len(name) != len(base_name) or len(data) != int(base[124:135] or b"0", 8):
            info = tarfile.TarInfo(name.decode("ascii"))
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            base = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
            base_name, base_sum = name, sum(base[:148]) + 8 * 32 + sum(base[156:])
            header = base
        else:
            chk = base_sum - sum(base_name) + sum(name)
            header = name + base[len(name):148] + b"%06o\0 " % chk + base[156:]
        pad = -len(data) % tarfile.BLOCKSIZE
        parts += (header, data, b"\0" * pad) if pad else (header, data)
        total += len(header) + len(data) + pad
    total += 2 * tarfile.BLOCKSIZE                        # end-of-archive marker, then pad to a whole record
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE + (-total % tarfile.RECORDSIZE)))
    return b"".join(parts)


@dataclass
class Manifest:
    """manifest.json. ``splits[split]`` lists shard entries {name, samples, tokens, bytes, sha256} in order."""
    seq_len: int
    dtype: str                                   # "uint16" or "uint32"
    vocab_size: int
    tokenizer: dict[str, Any]                    # path, sha256, bos_id, eos_id, pad_id, unk_id
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)   # path, bytes, sha256
    counts: dict[str, int] = field(default_factory=dict)         # documents, skipped, replaced chars, ...
    complete: bool = False                                       # all inputs consumed, every shard written
    format: str = FORMAT

    def samples(self, split: str) -> int:
        return sum(s["samples"] for s in self.splits.get(split, []))

    def tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.splits.get(split, []))

    def padding(self, split: str) -> list[int]:
        """Padding tokens at the end of each shard's last sample, per entry of ``splits[split]``. Written by the
        tokenizer as ``pad_tokens`` in the entry of the split's last shard; for a manifest made before that, inferred
        from the counts: a split of S stream tokens cut into N samples of seq_len + 1 overlapping by one holds
        N * seq_len + 1 - S padding tokens (less than 0 after ``--last drop``, which pads nothing). Without counts
        (an unfinished manifest): none."""
        entries = self.splits.get(split, [])
        pads = [int(e.get("pad_tokens", 0)) for e in entries]
        stream = self.counts.get(f"tokens_{split}")
        if entries and not any("pad_tokens" in e for e in entries) and stream is not None:
            pads[-1] = max(0, self.samples(split) * self.seq_len + 1 - int(stream))
        for e, p in zip(entries, pads):
            if not 0 <= p <= self.seq_len:
                raise ValueError(f"split {split!r}, shard {e.get('name')}: {p} padding tokens do not fit in one "
                                 f"sample of {self.seq_len} + 1 tokens; rerun data_prep/tokenize.py")
        return pads

    def save(self, folder: Path) -> None:
        raw = asdict(self)
        raw["splits"] = {split: [_ordered(e) for e in entries] for split, entries in self.splits.items()}
        atomic_write_bytes(Path(folder) / MANIFEST, (json.dumps(raw, indent=1) + "\n").encode())

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: no manifest here; run data_prep/tokenize.py to make shards")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); rerun data_prep/tokenize.py") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else None
            raise ValueError(f"{path}: format {got!r}, expected {FORMAT!r}")
        try:
            return cls(**raw)
        except TypeError as e:                  # a key missing or unknown
            raise ValueError(f"{path}: not a manifest of format {FORMAT} ({e}); rerun data_prep/tokenize.py") from None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.dtype == "uint16" else np.dtype("<u4")


def _ordered(entry: dict[str, Any]) -> dict[str, Any]:
    known = {k: entry[k] for k in ENTRY_KEYS if k in entry}
    return known | {k: entry[k] for k in sorted(entry) if k not in known}


def read_shard(path: Path, dtype: np.dtype, expected: Optional[dict[str, Any]] = None) -> list[np.ndarray]:
    """All samples of one shard, in order. Raises ValueError naming the shard if it is missing, truncated or
    does not match its manifest entry."""
    if not path.exists():
        raise ValueError(f"{path}: shard listed in the manifest is missing")
    out = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                f = tar.extractfile(member)
                out.append(np.frombuffer(f.read(), dtype=dtype))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path}: corrupt or truncated shard ({e}); re-create it with data_prep/tokenize.py") from None
    if expected is not None and len(out) != expected["samples"]:
        raise ValueError(f"{path}: holds {len(out)} samples, the manifest says {expected['samples']} "
                         "(truncated?); re-create it with data_prep/tokenize.py")
    return out
