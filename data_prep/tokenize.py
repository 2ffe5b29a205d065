#!/usr/bin/env python
"""Tokenize text into WebDataset shards of packed sequences (see data_prep/README.md).

    python data_prep/tokenize.py INPUTS... --out DIR --tokenizer tok.model
    python data_prep/tokenize.py INPUTS... --train-tokenizer tok.model --vocab-size 32000 [--out DIR]
    python data_prep/tokenize.py --corpus web=raw/web --corpus books=raw/books --weight books=2 \
        --train-tokenizer tok.model --out DIR          # DIR/web/, DIR/books/: a data set per corpus
    python -m data_prep.tokenize ...
"""
# Guard first: `python data_prep/tokenize.py` puts data_prep/ at the front of sys.path, where this file would
# shadow the standard library's `tokenize` (used by linecache, inspect, traceback, ...). Drop that folder from
# sys.path and make the repository root importable before anything else is imported.
import os as _os
import sys as _sys

_HERE = _os.path.dirname(_os.path.realpath(__file__))
_sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != _HERE]
if _sys.modules.get("tokenize") is not None and \
        _os.path.realpath(getattr(_sys.modules["tokenize"], "__file__", "") or "") == _os.path.realpath(__file__):
    del _sys.modules["tokenize"]
if _os.path.dirname(_HERE) not in _sys.path:
    _sys.path.insert(0, _os.path.dirname(_HERE))

import argparse  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

EPILOG = """\
documents (--doc-per):
  auto (default)  a .txt file is one document; a .jsonl line / parquet row is one document
  file            a whole file is one document (records of .jsonl/.parquet joined with newlines)
  line / record   a .txt line is one document (a .jsonl line / parquet row is one anyway)

packing: documents are joined as [BOS] text EOS (BOS only with --bos) into one stream per split and cut into
samples of seq_len+1 tokens, consecutive samples overlapping by one token. The last partial sample of each split
is padded with the pad id (EOS if the model has none) with --last pad (default; 'partial' means the same; the
manifest records the padding, and training ignores it), or dropped with --last drop. Split: a document goes to
val when BLAKE2b-64 of its UTF-8 text (hashlib.blake2b(text, digest_size=8), read little-endian) is below
--val-fraction * 2**64, independent of order and worker count. Documents longer than 262,144 characters are cut
at whitespace into pieces; with a whitespace-splitting model (as trained here, or Llama-style) the ids do not
change.

several corpora (--corpus NAME=PATH, repeated; no INPUTS then): corpus NAME goes to OUT/NAME/, a data set of its
own (shards + manifest.json, as a run on that corpus alone writes), all with one tokenizer. --train-tokenizer
trains it once on a sample of all corpora in which corpus NAME has the share W/sum(W) of its --weight NAME=W
(default 1): min(--tokenizer-sentences, all sentences) sentences, a small corpus repeated to fill its share.
Corpora are tokenized in the order given.

--dedup exact: a document whose normalised text (Unicode NFC, whitespace runs as one space, no whitespace at the
ends; case kept) equals an earlier one's is dropped. Earlier: corpora in the order given, then inputs in path
order, then documents in file order, whatever --workers. Manifests count duplicates_dropped (and
duplicates_dropped_across: those whose kept copy is in an earlier corpus). The inputs are read once more first.

resuming: an interrupted run (Ctrl-C, kill, crash) keeps its finished shards; rerun the same command to continue
(with --corpus: complete corpus folders are kept, the others resume). A complete output folder is never
overwritten without --overwrite.

exit status: 0 done, 2 bad input or options (one line on stderr), 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"error: {message} (see --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="data_prep/tokenize.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Tokenize .txt, .txt.gz, .jsonl, .jsonl.gz and .parquet inputs (files, folders, globs) with a "
                    "SentencePiece model into WebDataset shards train-NNNNNN.tar / val-NNNNNN.tar + manifest.json.")
    p.add_argument("inputs", nargs="*", metavar="INPUTS", help="files, folders (searched recursively) or glob "
                   "patterns (or --corpus instead)")
    p.add_argument("--out", help="output folder for shards and manifest.json (with --corpus: the folder of one such "
                                 "folder per corpus)")
    c = p.add_argument_group("several corpora (instead of INPUTS)")
    c.add_argument("--corpus", action="append", default=[], metavar="NAME=PATH",
                   help="a corpus to tokenize into OUT/NAME/: PATH is a file, folder or glob; give NAME again to add "
                        "inputs (NAME: letters, digits, _ and -)")
    c.add_argument("--weight", action="append", default=[], metavar="NAME=W",
                   help="with --train-tokenizer: corpus NAME's share W/sum(W) of the tokenizer's training sample "
                        "(W > 0; default 1)")
    g = p.add_argument_group("tokenizer (one of)")
    g.add_argument("--tokenizer", metavar="MODEL", help="an existing SentencePiece .model file")
    g.add_argument("--train-tokenizer", metavar="MODEL",
                   help="train a BPE model (byte fallback) on the inputs and write it here (with --corpus: once, "
                        "on a sample of all corpora weighted by --weight); without --out only train. Reused when "
                        "already trained from the same inputs and settings.")
    g.add_argument("--vocab-size", type=int, default=32000, help="for --train-tokenizer (default 32000)")
    g.add_argument("--tokenizer-sentences", type=int, default=1_000_000, metavar="N",
                   help="for --train-tokenizer: sample at most N sentences (lines) (default 1,000,000)")
    g.add_argument("--tokenizer-seed", type=int, default=0,
                   help="for --train-tokenizer (and the draw of a weighted sample) (default 0)")
    g.add_argument("--tokenizer-threads", type=int, default=4,
                   help="for --train-tokenizer: SentencePiece threads; part of the result, so fixed (default 4)")
    d = p.add_argument_group("documents")
    d.add_argument("--doc-per", default="auto", choices=("auto", "file", "line", "record"))
    d.add_argument("--text-field", default="text", help="JSON field / parquet column with the text (default text)")
    d.add_argument("--skip-bad-records", action="store_true",
                   help="skip (and count) bad .jsonl lines / null parquet values instead of stopping")
    d.add_argument("--dedup", default="none", choices=("none", "exact"),
                   help="exact: drop a document equal to an earlier one after normalisation (NFC, whitespace runs "
                        "as one space, ends stripped; across all corpora with --corpus) (default none)")
    s = p.add_argument_group("samples and shards")
    s.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence (default 2048)")
    s.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in val (default 0.01)")
    s.add_argument("--bos", action="store_true", help="start each document with BOS (default: EOS only)")
    s.add_argument("--last", default="pad", choices=("pad", "partial", "drop"),
                   help="final partial sample of each split: pad it (default) or drop it")
    s.add_argument("--shard-size-mb", type=float, default=128.0, help="target shard size (default 128)")
    s.add_argument("--samples-per-shard", type=int, help="samples per shard (overrides --shard-size-mb)")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (and a --train-tokenizer model made from other inputs/settings)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fmt(n: float) -> str:
    return f"{n:,.0f}"


def _check(args) -> None:
    from data_prep.sources import UserError
    if args.corpus and args.inputs:
        raise UserError(f"give INPUTS or --corpus NAME=PATH, not both (INPUTS: {' '.join(args.inputs)})")
    if not args.corpus and not args.inputs:
        raise UserError("no inputs: give INPUTS (files, folders, globs) or --corpus NAME=PATH")
    if args.weight and not args.corpus:
        raise UserError("--weight NAME=W weighs a --corpus; with INPUTS there is one corpus")
    if args.weight and not args.train_tokenizer:
        raise UserError("--weight sets shares of the tokenizer's training sample: it needs --train-tokenizer")
    if args.tokenizer and args.train_tokenizer:
        raise UserError("give --tokenizer or --train-tokenizer, not both")
    if not args.tokenizer and not args.train_tokenizer:
        raise UserError("give --tokenizer MODEL (an existing SentencePiece model) or --train-tokenizer MODEL")
    if not args.train_tokenizer and not args.out:
        raise UserError("--out is required (the output folder)")


def _train_single(args, log) -> bool:
    from data_prep import pack, sources
    from data_prep import tokenizer as T
    files = sources.find_inputs(args.inputs)
    sha = sources.sha256_files(files, pack.default_workers())
    reader = sources.Reader(args.doc_per, args.text_field, 0.0, args.skip_bad_records, drop_space=True,
                            warn=lambda m: log(f"warning: {m}"))
    key = {"inputs": [{"path": f.path, "bytes": f.size, "sha256": h} for f, h in zip(files, sha)],
           "doc_per": args.doc_per, "text_field": args.text_field}
    texts = (t for parts, _ in sources.iter_documents(files, reader) for t in parts)
    return T.train(texts, args.train_tokenizer, vocab_size=args.vocab_size, sentences=args.tokenizer_sentences,
                   seed=args.tokenizer_seed, threads=args.tokenizer_threads, settings_key=key,
                   overwrite=args.overwrite, log=log)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from data_prep import mix, pack
    from data_prep import tokenizer as T
    from data_prep.sources import UserError

    def log(msg: str) -> None:
        print(msg, file=_sys.stderr, flush=True)

    try:
        _check(args)
        corpora = mix.parse(args.corpus, args.weight) if args.corpus else None
        model = args.tokenizer
        if args.train_tokenizer:
            model = args.train_tokenizer
            t0 = time.time()
            if corpora is None:
                trained = _train_single(args, log)
            else:
                trained = mix.train_tokenizer(
                    corpora, model, doc_per=args.doc_per, text_field=args.text_field,
                    skip_bad_records=args.skip_bad_records, vocab_size=args.vocab_size,
                    sentences=args.tokenizer_sentences, seed=args.tokenizer_seed, threads=args.tokenizer_threads,
                    overwrite=args.overwrite, workers=pack.default_workers(), log=log)
            if trained:
                _, info, _ = T.load(model)
                print(f"tokenizer: trained {model} ({info.vocab_size} pieces, sha256 {info.sha256[:16]}…) in "
                      f"{time.time() - t0:.1f} s", flush=True)
            if not args.out:
                return 0
        opt = pack.Options(inputs=args.inputs, out=args.out, tokenizer=model, seq_len=args.seq_len,
                           val_fraction=args.val_fraction, doc_per=args.doc_per, text_field=args.text_field,
                           bos=args.bos, last=args.last, shard_size_mb=args.shard_size_mb,
                           samples_per_shard=args.samples_per_shard, workers=args.workers,
                           skip_bad_records=args.skip_bad_records, overwrite=args.overwrite,
                           progress=False if args.no_progress else None, log=log, dedup=args.dedup)
        if corpora is None:
            res = pack.run(opt)
            if not res["already_complete"]:
                _summary(res, args.out, "done")
            return 0
        results = mix.run(corpora, opt)
    except UserError as e:
        print(f"error: {e}", file=_sys.stderr, flush=True)
        return 2
    except pack.Interrupted as e:
        print(str(e), file=_sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=_sys.stderr, flush=True)
        return 130
    for c, res in zip(corpora, results):
        _summary(res, _os.path.join(args.out, c.name), c.name)
    counts = [r["manifest"].counts for r in results]
    total = sum(c["tokens_train"] + c["tokens_val"] for c in counts)
    dups = sum(c.get("duplicates_dropped", 0) for c in counts)
    print(f"done: {len(results)} corpora, {_fmt(sum(c['documents'] for c in counts))} documents, {_fmt(total)} "
          f"tokens" + (f", {_fmt(dups)} duplicate(s) dropped" if args.dedup != "none" else "")
          + f"; tokenizer sha256 {results[0]['manifest'].tokenizer['sha256'][:16]}… in every manifest", flush=True)
    return 0


def _summary(res: dict, out: str, head: str) -> None:
    """What one data set holds: ``head`` is "done" for a single corpus, else the corpus's name."""
    m = res["manifest"]
    c = m.counts
    ntok = c["tokens_train"] + c["tokens_val"]
    docs = f"{_fmt(c['documents'])} documents ({_fmt(c['documents_val'])} val"
    if "duplicates_dropped" in c:
        docs += f"; {_fmt(c['duplicates_dropped'])} duplicate(s) dropped"
        if c.get("duplicates_dropped_across"):
            docs += f", {_fmt(c['duplicates_dropped_across'])} of them of a document in an earlier corpus"
    docs += f") from {c['input_files']} file(s), {_fmt(ntok)} tokens"
    if res["already_complete"]:
        print(f"{head}: already complete: {docs}")
    else:
        el = res["tokenize_seconds"]
        print(f"{head}: {docs} in {el:.1f} s ({_fmt(ntok / max(el, 1e-9))} tokens/s, {res['workers']} workers)"
              f"{' (resumed)' if res['resumed'] else ''}")
    for split in ("train", "val"):
        print(f"  {split}: {_fmt(m.samples(split))} samples of {m.seq_len}+1 tokens in {len(m.splits[split])} "
              f"shard(s), {_fmt(c[f'tokens_{split}'])} tokens")
    notes = [f"{_fmt(c[k])} {label}" for k, label in (
        ("empty_skipped", "empty documents skipped"), ("bad_records_skipped", "bad records skipped"),
        ("invalid_utf8_replaced", "invalid UTF-8 sequences replaced"), ("nul_removed", "NUL characters removed"),
        ("long_documents_split", "long documents cut into pieces"), ("pad_tokens", "padding tokens"),
        ("dropped_tokens", "tokens dropped (--last drop)")) if c.get(k)]
    if notes:
        print("  " + "; ".join(notes))
    print(f"  manifest: {_os.path.join(out, 'manifest.json')}", flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL) if hasattr(signal, "SIGPIPE") else None
    _sys.exit(main())
