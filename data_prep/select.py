#!/usr/bin/env python
"""Keep the records of .jsonl, .jsonl.gz and .parquet inputs that meet conditions on their fields, in one
.jsonl.gz (or .jsonl) file: e.g. to split a corpus into parts for ``tokenize.py --corpus``.

    python data_prep/select.py data_prep/corpus/sotu-1900-2021.jsonl.gz --where 'year<1960' --out early.jsonl.gz
    python -m data_prep.select ...
"""
# Guard first, as in tokenize.py: `python data_prep/select.py` puts data_prep/ at the front of sys.path, where this
# file would stand in for the standard library's `select` (imported by subprocess, selectors, asyncio, ...). Drop
# that folder from sys.path and make the repository root importable before anything else is imported.
import os as _os
import sys as _sys

_HERE = _os.path.dirname(_os.path.realpath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _HERE]
if _os.path.dirname(_HERE) not in _sys.path:
    _sys.path.insert(0, _os.path.dirname(_HERE))

import argparse  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import operator  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator, Optional, Union  # noqa: E402

from data_prep.inputs import InputFile, UserError, find_inputs  # noqa: E402

OPS: dict[str, Callable[[Any, Any], bool]] = {"<": operator.lt, "<=": operator.le, ">": operator.gt,
                                              ">=": operator.ge, "==": operator.eq, "!=": operator.ne}
_CONDITION = re.compile(r"\s*([^<>=!\s]+)\s*(<=|>=|==|!=|<|>)\s*(.*?)\s*")

EPILOG = """\
conditions: FIELD OP VALUE, OP one of < <= > >= == != (quote the whole condition for the shell). VALUE is a
number when it reads as one (1960, -2.5, 1e3): then FIELD must hold a number, and they compare as numbers.
Otherwise, or when quoted ('1960', "Truman"), VALUE is a string: FIELD must hold a string, and they compare as
strings (by code point). Several --where must all hold. A record without FIELD (or with null there) is an error,
or with --skip-missing left out and counted.

output: the kept records in input order (inputs in path order), each .jsonl line exactly as it was, a parquet row
as one JSON object. Written to a temporary file and renamed; gzip without a time stamp, so the same inputs give
the same bytes. An existing --out holding exactly that is left as it is; one holding anything else needs
--overwrite.

exit status: 0 done, 2 bad input or options (one line on stderr), 130 interrupted.
"""


@dataclass(frozen=True)
class Condition:
    text: str
    field: str
    op: str
    value: Union[float, int, str]

    def holds(self, value: Any, where: str) -> bool:
        """Whether the record's ``value`` of the field meets this condition; UserError for a value of another type."""
        number = isinstance(self.value, (int, float))
        if number != (isinstance(value, (int, float)) and not isinstance(value, bool)) or \
                (not number and not isinstance(value, str)):
            raise UserError(f"{where}: field {self.field!r} holds {_shown(value)}, but --where {self.text!r} compares "
                            f"{'numbers' if number else 'strings'}")
        return OPS[self.op](value, self.value)


def _shown(value: Any) -> str:
    kind = {str: "a string", bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), "a number")
    return f"{kind} ({json.dumps(value)[:40]})"


def parse_condition(text: str) -> Condition:
    m = _CONDITION.fullmatch(text)
    if not m or not m.group(3):
        raise UserError(f"--where {text!r}: expected FIELD OP VALUE with OP one of {' '.join(OPS)} "
                        "(e.g. --where 'year<1960')")
    field, op, raw = m.groups()
    if raw[0] in "<>=!":
        raise UserError(f"--where {text!r}: expected FIELD OP VALUE with OP one of {' '.join(OPS)}; quote a VALUE "
                        f"that starts with {raw[0]!r} (e.g. {field}{op}'{raw}')")
    value: Union[float, int, str]
    if len(raw) >= 2 and raw[0] in "'\"" and raw[-1] == raw[0]:
        value = raw[1:-1]
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
                if not math.isfinite(value):
                    value = raw
            except ValueError:
                value = raw
    return Condition(text, field, op, value)


def records(f: InputFile) -> Iterator[tuple[str, Any, bytes]]:
    """(where, record, its JSON line) of an input, in order; UserError naming the file and line for bad JSON."""
    if f.kind == "parquet":
        yield from _parquet(f)
        return
    if f.kind != "jsonl":
        raise UserError(f"{f.path}: a .txt file holds no records; select.py reads .jsonl, .jsonl.gz and .parquet")
    try:
        with (gzip.open if f.gz else open)(f.path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                line = line.rstrip(b"\r\n")
                if not line.strip():
                    continue
                where = f"{f.path}:{n}"
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{where}: bad JSON ({getattr(e, 'msg', e)})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{where}: not a JSON object but {type(rec).__name__}")
                yield where, rec, line
    except (OSError, EOFError) as e:
        raise UserError(f"{f.path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _parquet(f: InputFile) -> Iterator[tuple[str, Any, bytes]]:
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{f.path}: not a readable parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield f"{f.path}: row {row}", rec, json.dumps(rec, ensure_ascii=False, default=str).encode()


def select(inputs: list[InputFile], conditions: list[Condition], skip_missing: bool,
           write: Callable[[bytes], Any]) -> dict[str, int]:
    """Write the JSON line of every record meeting all ``conditions``; counts {records, kept, missing}."""
    counts = {"records": 0, "kept": 0, "missing": 0}
    for f in inputs:
        for where, rec, line in records(f):
            counts["records"] += 1
            keep = True
            for c in conditions:
                value = rec.get(c.field)
                if value is None:
                    if not skip_missing:
                        what = "null" if c.field in rec else "missing"
                        raise UserError(f"{where}: field {c.field!r} is {what} (fields: {', '.join(list(rec)[:8])}); "
                                        "pass --skip-missing to leave out such records")
                    counts["missing"] += 1
                    keep = False
                    break
                if not c.holds(value, where):
                    keep = False
                    break
            if keep:
                write(line + b"\n")
                counts["kept"] += 1
    return counts


def _sha256(path: Path) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def run(specs: list[str], where: list[str], out: str, skip_missing: bool = False, overwrite: bool = False) -> str:
    """Select into ``out``; returns the summary line."""
    conditions = [parse_condition(w) for w in where]
    target = Path(out)
    if not (target.name.endswith(".jsonl.gz") or target.name.endswith(".jsonl")):
        raise UserError(f"--out {out}: expected a .jsonl.gz or .jsonl file name")
    if target.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name ending in .jsonl.gz")
    inputs = find_inputs(specs)
    if any(_os.path.realpath(f.path) == _os.path.realpath(target) for f in inputs):
        raise UserError(f"--out {out}: is one of the inputs; write somewhere else")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{_os.getpid()}")   # the pattern conf/files.py uses
    try:
        with open(tmp, "wb") as raw:
            if target.name.endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
                    counts = select(inputs, conditions, skip_missing, gz.write)
            else:
                counts = select(inputs, conditions, skip_missing, raw.write)
            raw.flush()
            _os.fsync(raw.fileno())
        same = target.exists() and _sha256(target) == _sha256(tmp)
        if target.exists() and not same and not overwrite:
            raise UserError(f"--out {out}: exists and holds other records; pass --overwrite to replace it")
        if same:
            tmp.unlink()
        else:
            _os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    missing = f"; {counts['missing']:,} without a field left out" if counts["missing"] else ""
    return (f"kept {counts['kept']:,} of {counts['records']:,} records ({' and '.join(c.text for c in conditions)}) "
            f"from {len(inputs)} file(s){missing}: {out}{' (unchanged)' if same else ''}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="data_prep/select.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                description="Keep the records of .jsonl, .jsonl.gz and .parquet inputs whose fields meet every "
                            "--where condition, in one .jsonl.gz (or .jsonl) file.")
    p.add_argument("inputs", nargs="+", metavar="INPUTS", help="files, folders (searched recursively) or globs")
    p.add_argument("--where", action="append", required=True, metavar="COND",
                   help="FIELD OP VALUE, e.g. 'year<1960' or \"party=='Republican'\"; repeat for AND")
    p.add_argument("--out", required=True, help="the output file, .jsonl.gz (gzip) or .jsonl")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out (and count) records without a condition's field, or null there (default: error)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds other records")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        print(run(args.inputs, args.where, args.out, args.skip_missing, args.overwrite), flush=True)
    except UserError as e:
        print(f"error: {e}", file=_sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=_sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    _sys.exit(main())
