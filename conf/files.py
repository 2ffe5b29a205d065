"""Atomic file writes, the one way the project replaces a file that another process (or a restart) may read.

The data goes to a temporary file in the same folder (a rename is atomic only within one file system), is flushed
and fsynced, then ``os.replace``d over the target: a reader sees the old file or the whole new one, never a part,
and a crash leaves at most a stray ``.NAME.tmp-PID`` beside it (data_prep's clean-up knows that pattern).
Lives in conf/, the bottom layer, so that data_prep, model and pretrain can all use it.
"""
from __future__ import annotations

import os
from pathlib import Path


def _temp_name(path: Path) -> Path:
    """The temporary file a write to ``path`` goes through: hidden, in the same folder, one per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, a signal) leaves no stray file behind
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """``atomic_write_bytes`` of ``text`` in ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding))
