"""The command that finishes an unfinished tokenization.

A consumer of the shards (the trainer, ``pretrain.data.loader.TokenLoader``) that finds ``complete: false`` in a manifest
prints this command so the user can paste it: ``tokenize.py`` with the run's inputs, its tokenizer, ``--out`` and
every setting the manifest records that is not the default, which is exactly what resuming needs (the same
fingerprint, data_prep/pack.py). Kept apart from pack.py, which runs tokenization; this only reads its records.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

from data_prep.inputs import UserError, find_inputs
from data_prep.pack import JOURNAL, Options, samples_per_shard
from data_prep.shards import Manifest
from data_prep.writer import Journal

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "data_prep/tokenize.py"


def _journal(folder: Path) -> Optional[list[dict]]:
    """The progress journal's records, or None when there is none to resume from."""
    path = Path(folder) / JOURNAL
    try:
        header, records = Journal.read(path)
    except OSError:
        return None
    return records if header is not None else None


def shards_so_far(folder: str | Path, manifest: Manifest) -> dict[str, int]:
    """Shards of each split written so far: those the progress journal lists (a killed run's manifest lists none
    yet), else the manifest's."""
    records = _journal(Path(folder))
    if records is None:
        return {split: len(entries) for split, entries in manifest.splits.items()}
    counts = {split: 0 for split in manifest.splits}
    for r in records:
        if r.get("shard"):
            counts[r["split"]] = counts.get(r["split"], 0) + 1
    return counts


def _inputs(paths: list[str], out: Path) -> list[str]:
    """The inputs as a command line gives them: their common folder when it holds exactly these inputs (as
    tokenize.py finds them, outside the output folder), else every file."""
    if len(paths) < 2:
        return paths
    common = os.path.commonpath(paths)
    if os.path.dirname(common) == common:          # the file system's root: not a folder anyone meant
        return paths
    out_real = os.path.realpath(out) + os.sep
    try:
        found = [f.path for f in find_inputs([common]) if not os.path.realpath(f.path).startswith(out_real)]
    except UserError:
        return paths
    return [common] if sorted(found) == sorted(paths) else paths


def _where(folder: Path, manifest: Manifest) -> tuple[list[str], Path]:
    """The inputs and the --out folder. A corpus deduplicated after others in a run of several corpora
    (data_prep/mix.py) is finished by that run, ending with this corpus: the documents it drops depend on theirs."""
    paths = [i["path"] for i in manifest.inputs]
    earlier = (manifest.settings.get("dedup") or {}).get("earlier_corpora")
    if not earlier:
        return _inputs(paths, folder), folder
    corpora = [(e["corpus"], e["inputs"], folder.parent / e["corpus"]) for e in earlier]
    corpora.append((folder.name, paths, folder))
    args = [w for name, inputs, out in corpora for spec in _inputs(inputs, out) for w in ("--corpus", f"{name}={spec}")]
    return args, folder.parent


def finish_command(folder: str | Path, manifest: Manifest) -> str:
    """The ``python data_prep/tokenize.py ...`` line that finishes the data set in ``folder``: it resumes from the
    progress journal, or, with no journal left to resume from, makes the data set again (``--overwrite``)."""
    folder = Path(folder)
    st, default = manifest.settings, Options(inputs=[], out="", tokenizer="")
    seq_len = st.get("seq_len", manifest.seq_len)
    inputs, out = _where(folder, manifest)
    args = [*inputs, "--tokenizer", manifest.tokenizer.get("path") or "MODEL", "--out", str(out)]
    for flag, value, usual in (("--seq-len", seq_len, default.seq_len),
                               ("--val-fraction", st.get("val_fraction"), default.val_fraction),
                               ("--doc-per", st.get("doc_per"), default.doc_per),
                               ("--text-field", st.get("text_field"), default.text_field),
                               ("--last", st.get("last"), default.last)):
        if value is not None and value != usual:
            args += [flag, str(value)]
    if st.get("bos"):
        args.append("--bos")
    if st.get("dedup"):
        args += ["--dedup", st["dedup"].get("mode", "exact")]
    # the manifest records samples per shard, whichever option chose it: name it unless the default size gives it
    per_shard = st.get("samples_per_shard")
    if per_shard is not None and per_shard != samples_per_shard(seq_len, manifest.np_dtype.itemsize,
                                                                default.shard_size_mb):
        args += ["--samples-per-shard", str(per_shard)]
    records = _journal(folder)
    if records is None:
        args.append("--overwrite")
    elif any(c.get("bad_records_skipped") for r in records for c in r.get("inputs", {}).values()):
        # not a setting, so not recorded; a skipped record so far shows the run had it
        args.append("--skip-bad-records")
    script = SCRIPT if Path.cwd().resolve() == ROOT else str(ROOT / SCRIPT)
    return shlex.join(["python", script, *args])
