"""Writing one split's token stream: packing into samples, shards, and the progress journal (see data_prep/pack.py
for the format of packing and resume)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from conf.files import atomic_write_bytes
from data_prep import shards as S

END = 1 << 62                     # position of a split that is finished
# test hook: "shard:N" / "prejournal:N" SIGKILLs this process at that point; "shard:N:INT" sends it SIGINT there
# instead (a Ctrl-C at a known shard, however busy the machine)
KILL_ENV = "DATA_PREP_KILL_AT"


def _excl_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(len(a), dtype=np.int64)
    if len(a) > 1:
        np.cumsum(a[:-1], out=out[1:])
    return out


# ---------------------------------------------------------------------------------------------------------------

class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.f = None

    @staticmethod
    def read(path: Path) -> tuple[Optional[dict], list[dict]]:
        """(header, records); a torn last line (killed while appending) is ignored."""
        header, records = None, []
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                try:
                    rec = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    break
                if i == 0:
                    header = rec
                else:
                    records.append(rec)
        return header, records

    def rewrite(self, header: dict, records: list[dict]) -> None:
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [header] + records).encode()
        atomic_write_bytes(self.path, data)

    def append(self, rec: dict) -> None:
        if self.f is None:
            self.f = open(self.path, "ab")
        self.f.write((json.dumps(rec, sort_keys=True) + "\n").encode())
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


class _Kill:
    def __init__(self):
        spec = os.environ.get(KILL_ENV, "")
        self.point, _, rest = spec.partition(":")
        n, _, sig = rest.partition(":")
        self.n = int(n) if n.isdigit() else -1
        self.signal = signal.SIGINT if sig == "INT" else signal.SIGKILL
        self.count = 0

    def check(self, point: str) -> None:
        if self.point == point and self.count == self.n:
            os.kill(os.getpid(), self.signal)


class SplitWriter:
    """Packs one split's token stream into samples and shards (see the module docstring)."""

    def __init__(self, name: str, out: Path, seq_len: int, per_shard: int, dtype: np.dtype, fill_id: int,
                 last: str, on_shard: Callable[[dict], None]):
        self.name, self.out, self.L, self.per_shard = name, out, seq_len, per_shard
        self.dtype, self.fill_id, self.last, self.on_shard = dtype, fill_id, last, on_shard
        self.shards: list[dict] = []
        self.starts: list[list[int]] = []
        self.pending: list[np.ndarray] = []
        self.pending_start: Optional[list[int]] = None
        self.buf = np.empty(0, dtype=dtype)
        self.buf_start = 0            # stream position of buf[0] (= start of the next sample)
        self.stream_end = 0           # stream position after the last token fed
        self.marks_t = np.empty(0, dtype=np.int64)     # stream position where each recent piece starts
        self.marks_pid = np.empty(0, dtype=np.int64)
        self.resume_at: list[int] = [0, 0]
        self.fed_through = -1         # every piece up to this id has been fed (those of other splits skipped)
        self.min_through = -1         # a carry-over is exact only once fed_through reaches this
        self.done = False
        self.pad_tokens = self.dropped_tokens = 0

    def restore(self, shards: list[dict], starts: list[list[int]], state: dict) -> None:
        """Continue after ``shards``; ``state`` is {"next": position}, {"carry": ...} or {"final": ...}."""
        self.shards, self.starts = list(shards), list(starts)
        self.buf_start = self.stream_end = sum(s["samples"] for s in shards) * self.L
        if "final" in state:
            final = state["final"]
            self.done, self.resume_at = True, [END, 0]
            self.stream_end = final["stream_tokens"]
            self.pad_tokens, self.dropped_tokens = final["pad_tokens"], final["dropped_tokens"]
        elif "carry" in state:
            c = state["carry"]
            if c["stream"] != self.buf_start:
                raise RuntimeError(f"progress journal: {self.name} carry-over at {c['stream']}, shards end at "
                                   f"{self.buf_start}")
            self.buf = np.asarray(c["buf"], dtype=self.dtype)
            self.stream_end = self.buf_start + len(self.buf)
            self.marks_t = np.asarray(c["marks_t"], dtype=np.int64)
            self.marks_pid = np.asarray(c["marks_pid"], dtype=np.int64)
            self.fed_through = self.min_through = c["through"]
            self.resume_at = [c["through"] + 1, 0]
        else:
            self.resume_at = list(state["next"])
            self.min_through = self.resume_at[0] - (0 if self.resume_at[1] else 1)

    def carry(self) -> Optional[dict]:
        """This split's state when it holds no pending samples (so a few tokens describe it), else None."""
        if self.pending or self.done or self.fed_through < max(self.min_through, 0):
            return None
        return {"through": int(self.fed_through), "stream": int(self.buf_start), "buf": self.buf.tolist(),
                "marks_t": self.marks_t.tolist(), "marks_pid": self.marks_pid.tolist()}

    def position(self, t: int) -> list[int]:
        i = int(np.searchsorted(self.marks_t, t, side="right")) - 1
        return [int(self.marks_pid[i]), int(t - self.marks_t[i])]

    def feed(self, tokens: np.ndarray, pids: np.ndarray, lens: np.ndarray, skips: np.ndarray) -> None:
        starts = self.stream_end + _excl_cumsum(lens) - skips
        self.marks_t = np.concatenate([self.marks_t, starts])
        self.marks_pid = np.concatenate([self.marks_pid, pids])
        self.buf = np.concatenate([self.buf, tokens]) if len(self.buf) else tokens
        self.stream_end += len(tokens)
        L = self.L
        while len(self.buf) > L:
            if not self.pending:
                self.pending_start = self.position(self.buf_start)
            n = min((len(self.buf) - 1) // L, self.per_shard - len(self.pending))
            buf = self.buf
            self.pending.extend(buf[i * L:i * L + L + 1] for i in range(n))
            self.buf = buf[n * L:]
            self.buf_start += n * L
            if len(self.pending) == self.per_shard:
                self._write(self.position(self.buf_start), None)
        i0 = int(np.searchsorted(self.marks_t, self.buf_start, side="right")) - 1
        if i0 > 0:
            self.marks_t, self.marks_pid = self.marks_t[i0:], self.marks_pid[i0:]

    def finish(self) -> None:
        if self.done:
            return
        r = len(self.buf)
        if r > 1:
            if self.last == "drop":
                self.dropped_tokens = r - 1
            else:
                if not self.pending:
                    self.pending_start = self.position(self.buf_start)
                self.pad_tokens = self.L + 1 - r
                self.pending.append(np.concatenate([self.buf, np.full(self.pad_tokens, self.fill_id, self.dtype)]))
        self.buf = np.empty(0, dtype=self.dtype)
        final = {"stream_tokens": int(self.stream_end), "pad_tokens": self.pad_tokens,
                 "dropped_tokens": self.dropped_tokens}
        if self.pending:
            self._write([END, 0], final)
        else:
            self.on_shard({"split": self.name, "shard": None, "final": final})
        self.done = True

    def _write(self, next_pos: list[int], final: Optional[dict]) -> None:
        index = len(self.shards)
        entry = S.write_shard(self.out / S.shard_name(self.name, index), self.name, index, self.pending)
        if final is not None:               # the split's last shard: its last sample may end in padding
            entry["pad_tokens"] = final["pad_tokens"]
        rec = {"split": self.name, "shard": entry, "start": self.pending_start, "next": next_pos}
        if final is not None:
            rec["final"] = final
        self.on_shard(rec)
        self.shards.append(entry)
        self.starts.append(self.pending_start)
        self.pending = []


def replay(out: Path, header: dict, records: list[dict], writers: list[SplitWriter], journal: Journal,
            input_counts: dict[int, dict], log: Callable[[str], None]) -> None:
    """Continue an interrupted run: per split, its verified shards, then its latest state — the start of the next
    shard, a carry-over (no pending samples: buffered tokens + the last piece fed), or finished. Shards after a
    damaged one, or written after the last journal line, are removed; the journal is rewritten to match."""
    kept: dict[str, list[dict]] = {w.name: [] for w in writers}
    state: dict[str, dict] = {w.name: {"next": [0, 0]} for w in writers}
    frozen: set[str] = set()
    for rec in records:
        for k, v in rec.get("inputs", {}).items():
            input_counts[int(k)] = v
        name = rec.get("split")
        if name is not None and name not in frozen:
            entry = rec["shard"]
            if entry is not None:
                path = out / entry["name"]
                if not path.exists() or path.stat().st_size != entry["bytes"] \
                        or S.sha256_file(path) != entry["sha256"]:
                    log(f"warning: {path}: missing or does not match its recorded sha256; "
                        "it and the shards after it are made again")
                    frozen.add(name)
                    state[name] = {"next": rec["start"]}
            if name not in frozen:
                kept[name].append({k: v for k, v in rec.items() if k not in ("inputs", "carry")})
                state[name] = {"final": rec["final"]} if "final" in rec else {"next": rec["next"]}
        for name, carry in rec.get("carry", {}).items():
            if name not in frozen:
                state[name] = {"carry": carry}
    canonical: list[dict] = []
    for w in writers:
        recs = [r for r in kept[w.name] if r["shard"] is not None]
        w.restore([r["shard"] for r in recs], [r["start"] for r in recs], state[w.name])
        canonical += kept[w.name]
        if "carry" in state[w.name]:
            canonical.append({"carry": {w.name: state[w.name]["carry"]}})
        listed = {r["shard"]["name"] for r in recs}
        for p in out.glob(f"{w.name}-*.tar"):
            if p.name not in listed:
                p.unlink()
    journal.rewrite(header, ([{"inputs": {str(k): v for k, v in sorted(input_counts.items())}}]
                             if input_counts else []) + canonical)
