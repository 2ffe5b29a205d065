"""The tokenize pipeline: read pieces (sources), encode them in worker processes (tokenizer), pack the token
streams into fixed windows and write shards (shards), resumably.

Packing. Each split (train, val) has one token stream: documents in input order, each as [BOS] ids EOS (BOS only
with ``bos``). The stream is cut into samples of ``seq_len + 1`` tokens; consecutive samples overlap by one token
(sample i ends with the token sample i+1 starts with), so every token after the first is a label exactly once.
The final partial window of a split is padded to full length with the pad id (EOS when the model has none) when
``last`` is ``pad`` (``partial`` is a synonym), or dropped (``drop``); either is counted in the manifest.

Determinism. The main process reads the inputs and batches pieces in a fixed way; workers only encode; results
come back in submission order and are packed in the main process. Shards are therefore byte-identical for any
number of workers.

Resume. ``OUT/progress.journal`` is an append-only journal, fsynced after every shard: a header with the run's
fingerprint (tokenizer sha256, settings, inputs with sha256), then one line per shard with its manifest entry, the
stream position where it starts and where the next shard starts — a position is (piece id, token offset in that
piece's stream), piece id = input index << 40 | piece index within the input — and the counts of inputs read to the
end. On restart the shards are checked against their sha256 (a bad or missing one is dropped with those after it),
each split continues from its position (pieces before it are read but not encoded), and the rest is as if the run
had never stopped. When everything is written the manifest is saved with ``complete: true`` and the journal
removed.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from data_prep import shards as S
from data_prep import sources
from data_prep import tokenizer as T
from data_prep.sources import UserError
from data_prep.writer import END, KILL_ENV, Journal, SplitWriter, _excl_cumsum, _Kill  # noqa: F401

PIPELINE = "mor-tokenize/1"
JOURNAL = "progress.journal"
BATCH_CHARS = 1 << 18             # text per batch sent to a worker
BATCH_PIECES = 4096
PIECE_BITS = 40
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
    found = []
    for p in out.iterdir():
        n = p.name
        if n in (S.MANIFEST, JOURNAL) or (n.endswith(".tar") and n.split("-")[0] in S.SPLITS) \
                or (n.startswith(".") and ".tmp-" in n):
            found.append(p)
    return found


def _lock(out: Path):
    """An exclusive lock on OUT/.lock for the run: a second tokenize.py on the same folder stops at once."""
    f = open(out / ".lock", "a+b")
    try:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:                 # no fcntl (Windows): no lock
        pass
    except OSError:
        f.close()
        raise UserError(f"{out}: another tokenize.py is writing here (it holds {out / '.lock'})") from None
    return f


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


def run(opt: Options) -> dict[str, Any]:
    """Tokenize ``opt.inputs`` into shards in ``opt.out``. Returns a summary dict. Raises UserError, Interrupted."""
    t0 = time.time()
    if opt.seq_len < 1:
        raise UserError(f"--seq-len {opt.seq_len}: must be >= 1")
    if opt.last not in LAST_CHOICES:
        raise UserError(f"--last {opt.last!r}: expected one of {', '.join(LAST_CHOICES)}")
    if opt.samples_per_shard is not None and opt.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {opt.samples_per_shard}: must be >= 1")
    if opt.shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb {opt.shard_size_mb}: must be > 0")
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
    reader = sources.Reader(opt.doc_per, opt.text_field, opt.val_fraction, opt.skip_bad_records,
                            drop_space=tok.add_dummy_prefix)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    sha = sources.sha256_files(files, workers)
    inputs = [{"path": f.path, "bytes": f.size, "sha256": h} for f, h in zip(files, sha)]
    settings = {"pipeline": PIPELINE, "seq_len": opt.seq_len, "val_fraction": opt.val_fraction,
                "doc_per": opt.doc_per, "text_field": opt.text_field, "bos": opt.bos, "last": last,
                "pad_fill_id": fill_id, "samples_per_shard": per_shard,
                "piece_chars": sources.PIECE_CHARS, "segment_chars": T.SEGMENT_CHARS,
                "packing": "samples of seq_len+1 tokens, consecutive samples overlap by one token",
                "split": "val iff blake2b-64(first piece of the document, UTF-8) < val_fraction * 2**64"}
    tok_entry = tok.manifest_entry()
    fingerprint = {"tokenizer_sha256": tok.sha256, "settings": settings, "inputs": inputs}

    # -- the output folder ----------------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        journal = Journal(out / JOURNAL)
        manifest_path = out / S.MANIFEST
        if opt.overwrite:
            for p in _our_files(out):
                p.unlink()
        header, records = (None, [])
        if journal.path.exists():
            header, records = Journal.read(journal.path)
            if header is None or header.get("pipeline") != PIPELINE:
                raise UserError(f"{journal.path}: unreadable progress journal; pass --overwrite to start over")
            old = header["fingerprint"]
            if old != fingerprint and not any(r.get("shard") for r in records):
                opt.log(f"{out}: an earlier attempt with other inputs or settings left no shards; starting over")
                for p in _our_files(out):
                    p.unlink()
                header, records = None, []
            elif old["tokenizer_sha256"] != tok.sha256:
                raise _tok_mismatch(out, header.get("tokenizer", {}), tok_entry)
            elif old != fingerprint:
                diff = _diff(old["settings"] | {"inputs": old["inputs"]}, settings | {"inputs": inputs})
                raise UserError(f"{out} holds an interrupted run with other settings ({diff}); "
                                "rerun with the same settings to resume, or pass --overwrite")
        elif manifest_path.exists():
            try:
                m = S.Manifest.load(out)
            except (ValueError, TypeError) as e:
                raise UserError(f"{e}; pass --overwrite to start over") from None
            if m.tokenizer.get("sha256") != tok.sha256:
                raise _tok_mismatch(out, m.tokenizer, tok_entry)
            if m.complete and m.settings == settings and m.inputs == inputs:
                opt.log(f"{out}: already complete with these inputs and settings; nothing to do "
                        "(--overwrite redoes it)")
                return {"manifest": m, "already_complete": True, "elapsed": time.time() - t0, "resumed": False}
            raise UserError(f"{out} holds {'a complete' if m.complete else 'an unfinished'} dataset made with other "
                            f"settings ({_diff(m.settings | {'inputs': m.inputs}, settings | {'inputs': inputs})}); "
                            "use another --out or pass --overwrite")
        elif any(p.name.endswith(".tar") for p in _our_files(out)):
            raise UserError(f"{out} holds shard files but no manifest or progress journal; "
                            "use another --out or pass --overwrite")
        for p in _our_files(out):                       # temporary files of a killed run
            if p.name.startswith("."):
                p.unlink()

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

        writers = [SplitWriter(name, out, opt.seq_len, per_shard, dtype, fill_id, last, on_shard) for name in S.SPLITS]

        # -- resume ---------------------------------------------------------------------------------------------------
        resumed = header is not None
        if resumed:
            # Replay the journal: per split, its verified shards, then its latest state — the start of the next
            # shard, a carry-over (no pending samples: buffered tokens + the last piece fed), or finished.
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
                            opt.log(f"warning: {path}: missing or does not match its recorded sha256; "
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
                        p.unlink()               # written after the last journal line, or after a damaged shard
            journal.rewrite(header, ([{"inputs": {str(k): v for k, v in sorted(input_counts.items())}}]
                                     if input_counts else []) + canonical)
        else:
            header = {"pipeline": PIPELINE, "fingerprint": fingerprint, "tokenizer": tok_entry}
            journal.rewrite(header, [])
        start_input = min(w.resume_at[0] for w in writers) >> PIECE_BITS
        start_input = min(start_input, len(files))
        for i in range(start_input):
            if i not in input_counts:               # cannot happen with an intact journal; be safe
                start_input = i
                break
        input_counts = {i: c for i, c in input_counts.items() if i < start_input}
        if resumed:
            n_kept = sum(len(w.shards) for w in writers)
            opt.log(f"{out}: resuming an interrupted run ({n_kept} shard(s) verified and kept; reading again from "
                    f"input {start_input + 1} of {len(files)})")

        manifest = S.Manifest(seq_len=opt.seq_len, dtype=dtype.name, vocab_size=tok.vocab_size, tokenizer=tok_entry,
                              settings=settings, inputs=inputs)
        manifest.save(out)

        # -- the pipeline ---------------------------------------------------------------------------------------------
        total_bytes = sum(f.size for f in files)
        done_bytes = sum(f.size for f in files[:start_input])
        show = opt.progress if opt.progress is not None else sys.stderr.isatty()
        bar = None
        if show:
            from tqdm import tqdm
            bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc="tokenize", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

        def warn(msg: str) -> None:
            if bar is not None:
                bar.write(f"warning: {msg}", file=sys.stderr)
            else:
                opt.log(f"warning: {msg}")

        reader.warn = warn
        stats = {"docs": 0, "tokens": 0, "t_last": 0.0}
        resume_at = [list(w.resume_at) for w in writers]

        def batches():
            texts: list[str] = []
            first: list[int] = []
            lastf: list[int] = []
            pids: list[int] = []
            splits: list[int] = []
            skips: list[int] = []
            dones: list[tuple[int, dict]] = []
            chars = 0
            base = done_bytes
            for i in range(start_input, len(files)):
                f = files[i]
                counts = Counter()
                for pieces in reader.pieces(f, counts):
                    for pi, text, fst, lst, split in pieces:
                        pid = (i << PIECE_BITS) | pi
                        ra = resume_at[split]
                        skip = 0
                        if ra is not None:
                            if pid < ra[0]:
                                continue
                            if pid == ra[0]:
                                skip = ra[1]
                            resume_at[split] = None
                        texts.append(text)
                        first.append(fst)
                        lastf.append(lst)
                        pids.append(pid)
                        splits.append(split)
                        skips.append(skip)
                        chars += len(text)
                        if chars >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
                            yield texts, first, lastf, pids, splits, skips, dones, base + reader.position
                            texts, first, lastf, pids, splits, skips, dones, chars = [], [], [], [], [], [], [], 0
                dones.append((i, {k: int(counts[k]) for k in sources.COUNT_KEYS}))
                base += f.size
            yield texts, first, lastf, pids, splits, skips, dones, base

        def consume(meta, result) -> None:
            texts, first, lastf, pids, splits, skips, dones, position = meta
            tokens, lens = result
            if texts:
                pids_a = np.asarray(pids, dtype=np.int64)
                splits_a = np.asarray(splits, dtype=np.int8)
                skips_a = np.asarray(skips, dtype=np.int64)
                if skips_a.any():
                    offs = _excl_cumsum(lens)
                    keep = np.ones(len(tokens), dtype=bool)
                    for j in np.nonzero(skips_a)[0]:
                        if skips_a[j] > lens[j]:
                            raise RuntimeError("resume point lies beyond its piece: inputs or tokenizer changed")
                        keep[offs[j]:offs[j] + skips_a[j]] = False
                    tokens, lens = tokens[keep], lens - skips_a
                for s, w in enumerate(writers):
                    sel = splits_a == s
                    if sel.all():
                        w.feed(tokens, pids_a, lens, skips_a)
                    elif sel.any():
                        w.feed(tokens[np.repeat(sel, lens)], pids_a[sel], lens[sel], skips_a[sel])
                    w.fed_through = max(w.fed_through, int(pids_a[-1]))
                stats["docs"] += sum(first)
                stats["tokens"] += int(len(tokens))
            for i, c in dones:
                input_counts[i] = c
                unjournaled[i] = c
            if bar is not None:
                bar.update(position - bar.n)
                now = time.time()
                if now - stats["t_last"] > 0.5:
                    el = max(now - t_start, 1e-9)
                    dps = stats["docs"] / el
                    bar.set_postfix_str(f"{dps:,.{0 if dps >= 100 else 1}f} docs/s, {stats['tokens'] / el:,.0f} tok/s",
                                        refresh=False)
                    stats["t_last"] = now

        info = asdict(tok)
        pool = None
        old_term = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            raise KeyboardInterrupt

        t_start = time.time()
        try:
            if workers > 1:
                import multiprocessing as mp
                ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
                pool = ctx.Pool(workers, initializer=T.init_worker, initargs=(proto, info, dtype.name, opt.bos))
            else:
                T.init_worker(proto, info, dtype.name, opt.bos, in_worker=False)
            try:                                        # after the fork: workers keep the default SIGTERM
                signal.signal(signal.SIGTERM, on_term)
            except ValueError:                          # not the main thread
                pass
            inflight: deque = deque()
            depth = 2 * workers + 2
            for meta in batches():
                payload = (meta[0], bytes(meta[1]), bytes(meta[2]))
                if pool is None:
                    consume(meta, T.encode_batch(payload) if meta[0] else (None, None))
                    continue
                inflight.append((meta, pool.apply_async(T.encode_batch, (payload,)) if meta[0] else None))
                while len(inflight) > depth:
                    m, r = inflight.popleft()
                    consume(m, r.get() if r is not None else (None, None))
            while inflight:
                m, r = inflight.popleft()
                consume(m, r.get() if r is not None else (None, None))
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
            for w in writers:
                w.finish()
        except KeyboardInterrupt:
            if pool is not None:
                pool.terminate()
                pool = None
            if bar is not None:
                bar.close()
                bar = None
            journal.close()
            manifest.splits = {w.name: list(w.shards) for w in writers}
            manifest.save(out)
            n = sum(len(w.shards) for w in writers)
            raise Interrupted(f"interrupted: {n} complete shard(s) kept in {out}; rerun the same command to resume") \
                from None
        finally:
            try:
                signal.signal(signal.SIGTERM, old_term)
            except ValueError:
                pass
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.close()
            journal.close()

        counts = Counter()
        for c in input_counts.values():
            counts.update(c)
        counts = {k: int(counts.get(k, 0)) for k in sources.COUNT_KEYS}
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
                "tokenize_seconds": time.time() - t_start, "resumed": resumed, "workers": workers}
    finally:
        try:
            (out / ".lock").unlink()                # held by us until close: nobody else is inside
        except OSError:
            pass
        lock.close()
