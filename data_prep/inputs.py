"""Finding and checking raw text inputs: files, folders (recursive) or globs of .txt(.gz), .jsonl(.gz), .parquet,
in sorted path order, with their sizes and sha256 (see data_prep/sources.py for how they are read)."""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

EXTENSIONS = {".txt": "txt", ".txt.gz": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}


class UserError(Exception):
    """A problem with the user's inputs or options: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# Finding inputs

@dataclass(frozen=True)
class InputFile:
    path: str          # absolute
    kind: str          # txt | jsonl | parquet
    gz: bool
    size: int


def input_kind(path: str) -> Optional[tuple[str, bool]]:
    name = os.path.basename(path).lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext], ext.endswith(".gz")
    return None


def _check_file(path: str, shown: str) -> InputFile:
    kind = input_kind(path)
    if kind is None:
        raise UserError(f"{shown}: unsupported input type (expected {', '.join(EXTENSIONS)})")
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{shown}: cannot read (broken symbolic link)")
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{shown}: cannot read ({e.strerror})") from None
    if not os.access(path, os.R_OK):
        raise UserError(f"{shown}: cannot read (permission denied)")
    return InputFile(os.path.abspath(path), kind[0], kind[1], st.st_size)


def find_inputs(specs: list[str]) -> list[InputFile]:
    """Expand files, folders and globs into a sorted list of distinct inputs. Raises UserError naming the spec."""
    found: dict[str, InputFile] = {}
    if not specs:
        raise UserError("no inputs given")
    for spec in specs:
        if os.path.isdir(spec):
            candidates = []
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                candidates += [os.path.join(root, f) for f in files if input_kind(f)]
            if not candidates:
                raise UserError(f"{spec}: no {', '.join(EXTENSIONS)} files in this folder")
        elif any(c in spec for c in "*?["):
            candidates = []
            for p in glob.glob(spec, recursive=True):
                if os.path.isdir(p):
                    continue
                if input_kind(p):
                    candidates.append(p)
            if not candidates:
                raise UserError(f"{spec}: the pattern matches no {', '.join(EXTENSIONS)} files")
        elif os.path.lexists(spec):
            candidates = [spec]
        else:
            raise UserError(f"{spec}: no such file or folder")
        for c in candidates:
            f = _check_file(c, c)
            found.setdefault(os.path.realpath(f.path), f)
    return sorted(found.values(), key=lambda f: f.path)


def sha256_files(inputs: list[InputFile], threads: int) -> list[str]:
    """sha256 of every input's bytes on disk, in parallel threads (hashlib and file reads release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(f: InputFile) -> str:
        h = hashlib.sha256()
        try:
            with open(f.path, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        except OSError as e:
            raise UserError(f"{f.path}: cannot read ({e.strerror or e})") from None
        return h.hexdigest()

    if threads <= 1 or len(inputs) <= 1:
        return [one(f) for f in inputs]
    with ThreadPoolExecutor(max_workers=min(threads, len(inputs))) as ex:
        return list(ex.map(one, inputs))
