"""Several corpora in one run (``tokenize.py --corpus NAME=PATH ... --out DIR``): one tokenizer for all of them, a
data set per corpus in DIR/NAME/ (exactly what a run on that corpus alone writes, so each folder is a data set of
its own), and ``--dedup exact`` across them.

Tokenizer: ``--tokenizer MODEL`` for all, or ``--train-tokenizer MODEL`` trained once on a weighted sample of all
corpora (``--weight NAME=W``, data_prep/sample.py); its reuse key (``MODEL.json``) holds the corpora, their weights
and inputs. Corpora are tokenized one after another in command-line order, each by data_prep/pack.py with its own
journal, so a rerun of the same command keeps the complete folders and resumes the others. With --dedup exact, the
manifest of a corpus records the corpora before it (names, input paths and one sha256 of their inputs): the
documents it drops depend on them, so a change there is a change of settings, refused on resume like any other.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from data_prep import dedup, pack, sample, sources
from data_prep import shards as S
from data_prep import tokenizer as T
from data_prep.sources import UserError

NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Corpus:
    name: str
    specs: list[str] = field(default_factory=list)     # files, folders, globs
    weight: float = 1.0


def parse(corpus_args: list[str], weight_args: list[str]) -> list[Corpus]:
    """The corpora of ``--corpus NAME=PATH`` (a name given again adds inputs) and their ``--weight NAME=W``."""
    corpora: dict[str, Corpus] = {}
    for arg in corpus_args:
        name, eq, path = arg.partition("=")
        if not eq or not path:
            raise UserError(f"--corpus {arg!r}: expected NAME=PATH (a file, folder or glob), e.g. --corpus web=raw/")
        if not NAME.fullmatch(name):
            raise UserError(f"--corpus {arg!r}: the name {name!r} may hold only letters, digits, '_' and '-' "
                            "(it names the folder OUT/NAME)")
        corpora.setdefault(name, Corpus(name)).specs.append(path)
    weighted: set[str] = set()
    for arg in weight_args:
        name, eq, value = arg.partition("=")
        if not eq:
            raise UserError(f"--weight {arg!r}: expected NAME=W, e.g. --weight web=2")
        if name not in corpora:
            raise UserError(f"--weight {arg!r}: no corpus {name!r} (--corpus gives {', '.join(corpora)})")
        if name in weighted:
            raise UserError(f"--weight {arg!r}: corpus {name!r} has a weight already; give one --weight per corpus")
        try:
            w = float(value)
        except ValueError:
            w = math.nan
        if not (math.isfinite(w) and w > 0):
            raise UserError(f"--weight {arg!r}: W must be a number > 0")
        corpora[name].weight = w
        weighted.add(name)
    return list(corpora.values())


def train_tokenizer(corpora: list[Corpus], model: str, *, doc_per: str, text_field: str, skip_bad_records: bool,
                    vocab_size: int, sentences: int, seed: int, threads: int, overwrite: bool, workers: int,
                    log: Callable[[str], None]) -> bool:
    """Train (or reuse) one BPE model on the weighted sample of all corpora. True when it was trained now."""
    files = [sources.find_inputs(c.specs) for c in corpora]
    sha = iter(sources.sha256_files([f for fs in files for f in fs], workers))
    key = {"corpora": [{"name": c.name, "weight": c.weight,
                        "inputs": [{"path": f.path, "bytes": f.size, "sha256": next(sha)} for f in fs]}
                       for c, fs in zip(corpora, files)],
           "doc_per": doc_per, "text_field": text_field, "sampling": sample.RULE}

    def texts(fs: list) -> Callable[[bool], Iterable[str]]:
        def read(warn: bool) -> Iterable[str]:
            reader = sources.Reader(doc_per, text_field, 0.0, skip_bad_records, drop_space=True,
                                    warn=(lambda m: log(f"warning: {m}")) if warn else (lambda m: None))
            return (t for parts, _ in sources.iter_documents(fs, reader) for t in parts)
        return read

    made_of: dict[str, Any] = {}
    sentences_iter = sample.weighted([(c.name, c.weight, texts(fs)) for c, fs in zip(corpora, files)], sentences,
                                     seed, made_of, log)
    return T.train(sentences_iter, model, vocab_size=vocab_size, sentences=sentences, seed=seed, threads=threads,
                   settings_key=key, overwrite=overwrite, log=log, split=False, record={"sample": made_of})


def run(corpora: list[Corpus], base: pack.Options) -> list[dict[str, Any]]:
    """Tokenize each corpus into ``base.out``/NAME with ``base``'s settings; pack.run's result for each, in order.
    Raises UserError, pack.Interrupted (the folders done so far are complete; rerunning resumes)."""
    out = Path(base.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if (out / S.MANIFEST).exists():
        raise UserError(f"{out} holds a data set of its own ({S.MANIFEST}); with --corpus, --out is the folder "
                        "that gets one data set per corpus: give another")
    opts, plans = [], []
    for c in corpora:
        earlier = [{"corpus": e.name, "inputs": [i["path"] for i in p.inputs], "sha256": dedup.inputs_sha256(p.inputs)}
                   for e, p in zip(corpora, plans)] if base.dedup != "none" else []
        opts.append(replace(base, inputs=c.specs, out=str(out / c.name), dedup_earlier=earlier,
                            label=f"tokenize {c.name}"))
        plans.append(pack.prepare(opts[-1]))
    owner: dict[str, str] = {}
    for c, p in zip(corpora, plans):
        for f in p.files:
            other = owner.setdefault(os.path.realpath(f.path), c.name)
            if other != c.name:
                raise UserError(f"{f.path}: an input of corpus {other!r} and of corpus {c.name!r}; "
                                "give each input to one corpus")
    shared = None
    if base.dedup != "none":
        shared = dedup.Dedup([p.files for p in plans], base.reader_args(), plans[0].workers, base.dedup_bar,
                             base.log)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with pack.locked(out):
        for k, (opt, plan) in enumerate(zip(opts, plans)):
            drops = (lambda k=k: shared.of(k)) if shared is not None else None
            results.append(pack.run(opt, plan, drops))
    return results
