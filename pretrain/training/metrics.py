"""Run metrics: a JSONL file always, a readable log line per interval, wandb (offline by default), MFU.

MFU = tokens/s × training FLOPs per token (model/flops.py, which follows the routing) ÷ (peak FLOP/s × GPUs).
``read_metrics`` is the one reader of metrics.jsonl (the trainer on a restart, the plot, the sweep's table).

wandb is a guest: its service (``wandb-core``, a child process) gets the SIGTERM that Slurm sends to every process
of a job step on ``scancel``, requeue, preemption or the time limit, and shuts down at once (a Go program: it
cannot be made to ignore or block SIGTERM). The trainer must still save, so any wandb failure detaches wandb with
one line and metrics.jsonl carries on; ``close`` bounds wandb's finish (a dead or wedged service must neither hang
nor raise). Its console capture is off: it copies every printed line through a hook on stdout/stderr that, once
the service is gone or the disk is full, fails on each line and prints the failure (thousands of lines).
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from conf.errors import ConfigError, one_line
from conf.files import atomic_write_bytes, atomic_write_text

# Dense bf16 peaks per device (FLOP/s); CPU runs report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# How long closing may wait for wandb (its last uploads, online): a job saving on a time-limit warning has a few
# minutes left, and nothing is lost by stopping the wait (the run's files stay under RUN/wandb for `wandb sync`).
WANDB_FINISH_S = 60.0


def _parse(path: Path, *, strict: bool = True) -> tuple[list[tuple[bytes, dict[str, Any]]], int]:
    """(line, record) of each record of a metrics.jsonl, and how many lines were skipped: a torn last line, and
    with ``strict`` False any damaged line (with ``strict``, a damaged line before the last is a ConfigError)."""
    numbered = [(n, line) for n, line in enumerate(Path(path).read_bytes().split(b"\n"), 1) if line.strip()]
    out, skipped = [], 0
    for k, (n, line) in enumerate(numbered):
        try:
            rec = json.loads(line)      # bytes: a line cut inside a UTF-8 character is a ValueError too
        except ValueError as e:
            rec, why = None, f"{type(e).__name__}: {getattr(e, 'msg', e)}"
        else:
            why = f"a JSON {type(rec).__name__}, not an object"
        if not isinstance(rec, dict):
            # A run killed in the middle of a write leaves its last line cut short: drop it, keep the rest. Anywhere
            # else the file was damaged: readers stop, since guessing what it said would be worse.
            if k == len(numbered) - 1 or not strict:
                skipped += 1
                continue
            raise ConfigError(f"{path}:{n}: not a metrics record ({why}); the file is damaged: fix or remove "
                              "that line")
        out.append((line, rec))
    return out, skipped


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in file order. A torn last line (a run killed mid-write) is skipped; a
    malformed line anywhere else is a ConfigError naming the file and line."""
    return [rec for _, rec in _parse(Path(path))[0]]


def device_peak_flops() -> Optional[float]:
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: Optional[float], devices: int) -> Optional[float]:
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * devices)


class MetricsLog:
    """Rank 0 writes; other ranks get a no-op object from ``MetricsLog.for_rank``."""

    def __init__(self, run_dir: Path, *, wandb_mode: str, project: str, name: str, config: dict[str, Any],
                 start_step: int = 0, say=None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.dropped = self._forget_after(start_step)
        self._file = open(self.path, "a", buffering=1)
        self._say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._wandb = None
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb
            # The run id lives in the run folder, so a restarted job resumes the same wandb run.
            id_file = run_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            atomic_write_text(id_file, run_id)
            self._wandb = wandb.init(project=project, name=name, id=run_id, resume="allow", mode=wandb_mode,
                                     dir=str(run_dir), config=config, settings=wandb.Settings(console="off"))

    def _forget_after(self, step: int) -> int:
        """Drop records past ``step``, where this (re)start begins: they describe steps whose weights were lost
        (a kill after the last checkpoint) and are about to be trained again, so the file keeps every step once.
        A torn last line of a killed run goes too, and so does a damaged line anywhere (rank 0 alone reads this
        file: stopping here would leave the other ranks waiting). Rewritten atomically, the kept lines byte for
        byte; returns how many lines were dropped (the trainer reports it)."""
        if not self.path.exists():
            return 0
        records, torn = _parse(self.path, strict=False)
        keep = [line for line, rec in records if rec.get("step", 0) <= step]
        dropped = len(records) + torn - len(keep)
        if dropped:
            atomic_write_bytes(self.path, b"".join(line + b"\n" for line in keep))
        return dropped

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                step=record["step"])
            except Exception as e:  # noqa: BLE001 - whatever wandb raises, training and its metrics go on
                self._detach(one_line(e, 120))

    def _detach(self, why: str) -> None:
        self._wandb = None
        self._say(f"wandb: stopped working ({why}); detached, metrics.jsonl carries on "
                  "(the records wandb missed are there)")
        # wandb's exit hook would try the dead service again and print its failure: tear it down now, bounded.
        _bounded(_wandb_teardown, 5.0)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as e:   # a full disk: the run stops saying so; the unwritten record cannot be kept
            self._say(f"metrics: the last record(s) could not be written to {self.path} ({e.strerror})")
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            why = _bounded(lambda: (run.finish(), _wandb_teardown()), WANDB_FINISH_S)
            if why:
                self._say(f"wandb: did not finish ({why}); its files stay under {self.path.parent / 'wandb'} "
                          "(`wandb sync` uploads them); metrics.jsonl holds the run's records")


def _wandb_teardown() -> None:
    """wandb's own teardown of its service connection, which also removes its exit hook."""
    import wandb
    wandb.teardown()


def _bounded(fn, seconds: float) -> Optional[str]:
    """Run ``fn`` for at most ``seconds`` in a daemon thread; why it failed (one line), or None. wandb's teardown
    raises on a dead service and may wait forever on a wedged one; neither may keep a run from ending."""
    failure: list[str] = []

    def call() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - SystemExit too: wandb exits with its service's status
            failure.append(one_line(e, 120))
    thread = threading.Thread(target=call, name="wandb-close", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return f"no answer in {seconds:.0f} s"
    return failure[0] if failure else None


class NullLog:
    dropped = 0

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def format_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']:>6d}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}",
             f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("mem_gb") is not None:
        parts.append(f"mem {r['mem_gb']:.1f}GB")
    kept = [f"{k.split('/')[0]}:{v:.2f}" for k, v in r.items() if k.endswith("kept_frac")]
    if kept:
        parts.append("kept " + " ".join(kept))
    return "  ".join(parts)


class Progress:
    """Training progress for people: a tqdm bar over the steps (rate, ETA, loss, tokens/s) when rank 0 writes to a
    terminal, and the log lines — written above the bar when there is one, as plain lines otherwise (files)."""

    def __init__(self, log, *, show: bool, total: int, initial: int):
        self.log, self.bar = log, None
        self._last, self._tok_s = time.perf_counter(), None
        if show and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", desc="train", dynamic_ncols=True,
                            smoothing=0.1, file=sys.stderr)

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        rate = rec.get("step_tokens", 0) / max(now - self._last, 1e-9)
        self._last = now
        self._tok_s = rate if self._tok_s is None else 0.9 * self._tok_s + 0.1 * rate
        self.bar.set_postfix_str(f"loss {rec['loss']:.3f}, {self._tok_s:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
