"""The tokenize pipeline: read pieces (sources), encode them in worker processes (tokenizer), pack the token
streams into fixed windows and write shards (shards), resumably.

Packing. Each split (train, val) has one token stream: documents in input order, each as [BOS] ids EOS (BOS only
with ``bos``). The stream is cut into samples of ``seq_len + 1`` tokens; consecutive samples overlap by one token
(sample i ends with the token sample i+1 starts with), so every token after the first is a label exactly once.
The final partial window of a split is padded to full length with the pad id (EOS when the model has none) when
``last`` is ``pad`` (``partial`` is a synonym), or dropped (``drop``); either is counted in the manifest.

Determinism. The main process cuts the inputs into work items in a fixed way (data_prep/stream.py): raw byte
units of one-document-per-line inputs, which workers parse and encode (data_prep/units.py), or batches of pieces
it reads itself; results come back in submission order and are packed in the main process. Shards are therefore
byte-identical for any number of workers.

Resume. ``OUT/progress.journal`` is an append-only journal, fsynced after every shard: a header with the run's
fingerprint (tokenizer sha256, settings, inputs with sha256), then one line per shard with its manifest entry, the
stream position where it starts and where the next shard starts — a position is (piece id, token offset in that
piece's stream), piece id = input index << 40 | piece index within the input (see data_prep/units.py for
units) — and the counts of inputs read to the
end. On restart the shards are checked against their sha256 (a bad or missing one is dropped with those after it),
each split continues from its position (pieces before it are read but not encoded), and the rest is as if the run
had never stopped. When everything is written the manifest is saved with ``complete: true`` and the journal
removed.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from data_prep import dedup, shards as S
from data_prep import sources, units
from data_prep import tokenizer as T
from data_prep.progress import Progress
from data_prep.sources import UserError
from data_prep.stream import PIECE_BITS, Encoder
from data_prep.writer import END, KILL_ENV, Journal, SplitWriter, _Kill, replay  # noqa: F401

PIPELINE = "mor-tokenize/2"
JOURNAL = "progress.journal"
LAST_CHOICES = ("pad", "partial", "drop")


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: shards written so far are kept; rerunning resumes."""


@dataclass
class Options:
    inputs: list[str]
    out: str
    tokenizer: str
    seq_len: int = 2048
    val_fraction: float = 0.01
    doc_per: str = "auto"
    text_field: str = "text"
    bos: bool = False
    last: str = "pad"
    shard_size_mb: float = 128.0
    samples_per_shard: Optional[int] = None
    workers: int = 0                  # 0: all cores
    skip_bad_records: bool = False
    overwrite: bool = False
    progress: Optional[bool] = None   # None: a bar when stderr is a terminal
    log: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))
    dedup: str = "none"               # none | exact (data_prep/dedup.py)
    # with dedup, the corpora read before this one in the same run (data_prep/mix.py): dedup.settings_entry
    dedup_earlier: list[dict] = field(default_factory=list)
    label: str = "tokenize"           # the progress bar's name

    def show_progress(self) -> bool:
        return self.progress if self.progress is not None else sys.stderr.isatty()

    def dedup_bar(self, total: int) -> Progress:
        return Progress(self.show_progress(), total, 0, self.log, desc="dedup")

    def reader_args(self, drop_space: bool = True) -> dict[str, Any]:
        """How the inputs are read (sources.Reader): the same in the dedup pass, the workers and the main process."""
        return dict(doc_per=self.doc_per, text_field=self.text_field, val_fraction=self.val_fraction,
                    skip_bad_records=self.skip_bad_records, drop_space=drop_space)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def samples_per_shard(seq_len: int, itemsize: int, shard_size_mb: float) -> int:
    member = 512 + -(-((seq_len + 1) * itemsize) // 512) * 512          # tar header + padded data
    return max(1, int(shard_size_mb * 2**20) // member)




# ---------------------------------------------------------------------------------------------------------------

def _our_files(out: Path) -> list[Path]:
    # ".NAME.tmp-PID": what conf.files.atomic_write_bytes leaves behind when a kill cuts a write short
    found = []
    for p in out.iterdir():
        n = p.name
        if n in (S.MANIFEST, JOURNAL) or (n.endswith(".tar") and n.split("-")[0] in S.SPLITS) \
                or (n.startswith(".") and ".tmp-" in n):
            found.append(p)
    return found


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """An exclusive lock on OUT/.lock while the block runs: a second tokenize.py on the same folder stops at once."""
    f = open(out / ".lock", "a+b")
    try:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:                 # no fcntl (Windows): no lock
        pass
    except OSError:
        f.close()
        raise UserError(f"{out}: another tokenize.py is writing here (it holds {out / '.lock'})") from None
    try:
        yield
    finally:
        try:
            (out / ".lock").unlink()                # held by us until close: nobody else is inside
        except OSError:
            pass
        f.close()


def _diff(old: dict, new: dict) -> str:
    parts = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            if k == "inputs":
                o = {i["path"]: i for i in old.get(k, [])}
                n = {i["path"]: i for i in new.get(k, [])}
                changed = sorted(p for p in set(o) | set(n) if o.get(p) != n.get(p))
                parts.append(f"inputs differ ({len(changed)} file(s), e.g. {changed[0]})" if changed
                             else "input order differs")
            else:
                parts.append(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now")
    return "; ".join(parts)


def _tok_mismatch(out: Path, old_tok: dict, new: dict) -> UserError:
    return UserError(f"{out} holds shards made with tokenizer sha256 {old_tok.get('sha256')} "
                     f"({old_tok.get('path')}), this run's tokenizer is sha256 {new['sha256']} ({new['path']}); "
                     "use another --out or pass --overwrite")


@dataclass
class _Plan:
    """What a run is, once its options are checked: tokenizer, inputs and the settings fingerprint."""
    tok: T.TokenizerInfo
    proto: bytes
    dtype: Any
    fill_id: int
    per_shard: int
    last: str
    workers: int
    files: list
    inputs: list[dict]
    settings: dict
    fingerprint: dict


def prepare(opt: Options) -> _Plan:
    """Check ``opt`` and find its inputs (with their sha256). ``run`` does this itself; a run of several corpora
    (data_prep/mix.py) does it for every corpus first, since a corpus's dedup settings name those before it."""
    if opt.seq_len < 1:
        raise UserError(f"--seq-len {opt.seq_len}: must be >= 1")
    if opt.last not in LAST_CHOICES:
        raise UserError(f"--last {opt.last!r}: expected one of {', '.join(LAST_CHOICES)}")
    if opt.samples_per_shard is not None and opt.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {opt.samples_per_shard}: must be >= 1")
    if opt.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb {opt.shard_size_mb}: must be > 0")
    if opt.dedup not in dedup.MODES:
        raise UserError(f"--dedup {opt.dedup!r}: expected one of {', '.join(dedup.MODES)}")
    workers = opt.workers or default_workers()
    if workers < 1:
        raise UserError(f"--workers {opt.workers}: must be >= 1")
    last = "pad" if opt.last == "partial" else opt.last
    sp, tok, proto = T.load(opt.tokenizer)
    del sp
    if tok.eos_id < 0:
        raise UserError(f"{opt.tokenizer}: the tokenizer has no EOS id; documents are joined with EOS")
    if opt.bos and tok.bos_id < 0:
        raise UserError(f"{opt.tokenizer}: --bos given but the tokenizer has no BOS id")
    dtype = S.token_dtype(tok.vocab_size)
    fill_id = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    per_shard = opt.samples_per_shard or samples_per_shard(opt.seq_len, dtype.itemsize, opt.shard_size_mb)

    out = Path(opt.out)
    out_real = os.path.realpath(out) + os.sep
    files = [f for f in sources.find_inputs(opt.inputs) if not os.path.realpath(f.path).startswith(out_real)]
    if not files:
        raise UserError(f"no inputs outside the output folder {out}")
    sources.Reader(opt.doc_per, opt.text_field, opt.val_fraction)          # checks those options
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    sha = sources.sha256_files(files, workers)
    inputs = [{"path": f.path, "bytes": f.size, "sha256": h} for f, h in zip(files, sha)]
    settings = {"pipeline": PIPELINE, "seq_len": opt.seq_len, "val_fraction": opt.val_fraction,
                "doc_per": opt.doc_per, "text_field": opt.text_field, "bos": opt.bos, "last": last,
                "pad_fill_id": fill_id, "samples_per_shard": per_shard,
                "piece_chars": sources.PIECE_CHARS, "segment_chars": T.SEGMENT_CHARS, "unit_bytes": units.UNIT_BYTES,
                "packing": "samples of seq_len+1 tokens, consecutive samples overlap by one token",
                "split": "val iff blake2b-64(first piece of the document, UTF-8) < val_fraction * 2**64"}
    if opt.dedup != "none":             # absent without it: a data set made before --dedup existed stays valid
        settings["dedup"] = dedup.settings_entry(opt.dedup_earlier)
    fingerprint = {"tokenizer_sha256": tok.sha256, "settings": settings, "inputs": inputs}
    return _Plan(tok, proto, dtype, fill_id, per_shard, last, workers, files, inputs, settings, fingerprint)


def _existing(opt: Options, plan: _Plan, out: Path, journal: Journal):
    """What the output folder holds: (journal header, journal records) of an interrupted run to resume, (None, [])
    to start afresh, or a Manifest when it is already complete with these settings. Raises UserError for a
    folder this run must not touch."""
    tok_entry = plan.tok.manifest_entry()
    if opt.overwrite:
        for p in _our_files(out):
            p.unlink()
    header, records = (None, [])
    if journal.path.exists():
        header, records = Journal.read(journal.path)
        if header is None or header.get("pipeline") != PIPELINE:
            raise UserError(f"{journal.path}: unreadable progress journal (or one of another version); "
                            "pass --overwrite to start over")
        old = header["fingerprint"]
        if old != plan.fingerprint and not any(r.get("shard") for r in records):
            opt.log(f"{out}: an earlier attempt with other inputs or settings left no shards; starting over")
            for p in _our_files(out):
                p.unlink()
            header, records = None, []
        elif old["tokenizer_sha256"] != plan.tok.sha256:
            raise _tok_mismatch(out, header.get("tokenizer", {}), tok_entry)
        elif old != plan.fingerprint:
            diff = _diff(old["settings"] | {"inputs": old["inputs"]}, plan.settings | {"inputs": plan.inputs})
            raise UserError(f"{out} holds an interrupted run with other settings ({diff}); "
                            "rerun with the same settings to resume, or pass --overwrite")
    elif (out / S.MANIFEST).exists():
        try:
            m = S.Manifest.load(out)
        except (ValueError, TypeError) as e:
            raise UserError(f"{e}; pass --overwrite to start over") from None
        if m.tokenizer.get("sha256") != plan.tok.sha256:
            raise _tok_mismatch(out, m.tokenizer, tok_entry)
        if m.complete and m.settings == plan.settings and m.inputs == plan.inputs:
            return m
        diff = _diff(m.settings | {'inputs': m.inputs}, plan.settings | {'inputs': plan.inputs})
        raise UserError(f"{out} holds {'a complete' if m.complete else 'an unfinished'} dataset made with other "
                        f"settings ({diff}); use another --out or pass --overwrite")
    elif any(p.name.endswith(".tar") for p in _our_files(out)):
        raise UserError(f"{out} holds shard files but no manifest or progress journal; "
                        "use another --out or pass --overwrite")
    for p in _our_files(out):                       # temporary files of a killed run
        if p.name.startswith("."):
            p.unlink()
    return header, records


def run(opt: Options, planned: Optional[_Plan] = None,
        drops: Optional[Callable[[], list[dedup.Drops]]] = None) -> dict[str, Any]:
    """Tokenize ``opt.inputs`` into shards in ``opt.out``. Returns a summary dict. Raises UserError, Interrupted.
    With ``opt.dedup``, ``drops()`` gives the documents to drop per input (by default found among the inputs)."""
    t0 = time.time()
    plan = planned or prepare(opt)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        journal = Journal(out / JOURNAL)
        found = _existing(opt, plan, out, journal)
        if isinstance(found, S.Manifest):
            opt.log(f"{out}: already complete with these inputs and settings; nothing to do (--overwrite redoes it)")
            return {"manifest": found, "already_complete": True, "elapsed": time.time() - t0, "resumed": False}
        header, records = found
        file_drops = None
        if opt.dedup != "none":
            file_drops = drops() if drops is not None else \
                dedup.Dedup([plan.files], opt.reader_args(), plan.workers, opt.dedup_bar, opt.log).of(0)
        return _tokenize(opt, plan, out, journal, header, records, t0, file_drops)


def _tokenize(opt: Options, plan: _Plan, out: Path, journal: Journal, header: Optional[dict], records: list[dict],
              t0: float, drops: Optional[list[dedup.Drops]]) -> dict[str, Any]:
    files, tok = plan.files, plan.tok
    kill = _Kill()
    input_counts: dict[int, dict] = {}
    unjournaled: dict[int, dict] = {}

    def on_shard(rec: dict) -> None:
        if rec.get("shard"):
            kill.count += 1
            kill.check("prejournal")
        if unjournaled:
            rec["inputs"] = {str(k): v for k, v in unjournaled.items()}
            unjournaled.clear()
        carries = {w.name: c for w in writers if w.name != rec["split"] and (c := w.carry()) is not None}
        if carries:
            rec["carry"] = carries
        journal.append(rec)
        if rec.get("shard"):
            kill.check("shard")

    def on_input(i: int, counts: dict) -> None:
        input_counts[i] = unjournaled[i] = counts

    writers = [SplitWriter(name, out, opt.seq_len, plan.per_shard, plan.dtype, plan.fill_id, plan.last, on_shard)
               for name in S.SPLITS]
    resumed = header is not None
    if resumed:
        replay(out, header, records, writers, journal, input_counts, opt.log)
    else:
        header = {"pipeline": PIPELINE, "fingerprint": plan.fingerprint, "tokenizer": tok.manifest_entry()}
        journal.rewrite(header, [])
    start_input = min(min(w.resume_at[0] for w in writers) >> PIECE_BITS, len(files))
    for i in range(start_input):
        if i not in input_counts:               # cannot happen with an intact journal; be safe
            start_input = i
            break
    for i in [i for i in input_counts if i >= start_input]:
        del input_counts[i]
    if resumed:
        n_kept = sum(len(w.shards) for w in writers)
        opt.log(f"{out}: resuming an interrupted run ({n_kept} shard(s) verified and kept; reading again from "
                f"input {start_input + 1} of {len(files)})")
    manifest = S.Manifest(seq_len=opt.seq_len, dtype=plan.dtype.name, vocab_size=tok.vocab_size,
                          tokenizer=tok.manifest_entry(), settings=plan.settings, inputs=plan.inputs)
    manifest.save(out)

    done_bytes = sum(f.size for f in files[:start_input])
    prog = Progress(opt.show_progress(), sum(f.size for f in files), done_bytes, opt.log, desc=opt.label)
    reader_args = opt.reader_args(drop_space=tok.add_dummy_prefix)
    reader = sources.Reader(**reader_args, warn=prog.warn)
    encoder = Encoder(files, start_input, done_bytes, reader, writers, plan.workers,
                      (plan.proto, asdict(tok), plan.dtype.name, opt.bos), reader_args, on_input, prog.update, drops)
    t_start = time.time()
    try:
        encoder.run()
        for w in writers:
            w.finish()
    except KeyboardInterrupt:
        prog.close()
        journal.close()
        manifest.splits = {w.name: list(w.shards) for w in writers}
        manifest.save(out)
        n = sum(len(w.shards) for w in writers)
        raise Interrupted(f"interrupted: {n} complete shard(s) kept in {out}; rerun the same command to resume") \
            from None
    finally:
        prog.close()
        journal.close()

    counts = Counter()
    for c in input_counts.values():
        counts.update(c)
    keys = sources.COUNT_KEYS + (dedup.DEDUP_KEYS if drops is not None else ())
    counts = {k: int(counts.get(k, 0)) for k in keys}
    counts["input_files"] = len(files)
    for w in writers:
        counts[f"tokens_{w.name}"] = int(w.stream_end)
        counts[f"samples_{w.name}"] = sum(s["samples"] for s in w.shards)
    counts["pad_tokens"] = sum(w.pad_tokens for w in writers)
    counts["dropped_tokens"] = sum(w.dropped_tokens for w in writers)
    manifest.splits = {w.name: list(w.shards) for w in writers}
    manifest.counts = counts
    manifest.complete = True
    manifest.save(out)
    journal.path.unlink()
    return {"manifest": manifest, "already_complete": False, "elapsed": time.time() - t0,
            "tokenize_seconds": time.time() - t_start, "resumed": resumed, "workers": plan.workers}
