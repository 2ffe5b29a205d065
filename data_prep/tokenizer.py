"""SentencePiece tokenizers: load an existing ``.model``, train a new one deterministically, encode batches.

Training (``train``) makes a Llama-style BPE model: byte_fallback (no unknown tokens), identity normalisation (no
text changes, so decode(encode(text)) == text), a dummy prefix, digits split, whitespace-only pieces allowed,
ids unk=0, bos=1, eos=2 and no pad. It is deterministic: sentences are fed in input order, sampled by
SentencePiece's seeded reservoir (``sentences`` of them at most) with a fixed thread count — the thread count
changes the model, so it is a setting (``threads``), not the machine's core count. A JSON file next to the model
(``<model>.json``) records the settings and inputs, so a rerun with the same ones reuses the model.

Encoding (``encode_batch``, run in worker processes) cuts each piece of text into ~``SEGMENT_CHARS`` parts at
single spaces between non-space characters when the model splits at whitespace (read from the model file: BPE or
unigram, split_by_whitespace on, whitespace as prefix, no pretokenisation delimiter): the ids are then exactly
those of encoding the whole text, and encoding is faster (SentencePiece's BPE slows on long strings).
"""
from __future__ import annotations

import array
import hashlib
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import numpy as np

from data_prep.sources import UserError, segment

SEGMENT_CHARS = 1024
TRAIN_SENTENCE_CHARS = 2000       # training sentences are cut to this length (SentencePiece skips long ones)
LOSSLESS_NORMALIZERS = ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")


# ---------------------------------------------------------------------------------------------------------------
# Reading a model file's settings (a minimal protobuf reader: no dependency on the protobuf package)

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes, wanted: set[int]) -> dict[int, Any]:
    """Last value of each wanted field number of a protobuf message (varint or length-delimited)."""
    out: dict[int, Any] = {}
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 1:
            v, i = buf[i:i + 8], i + 8
        elif wire == 2:
            ln, i = _varint(buf, i)
            v, i = (buf[i:i + ln] if num in wanted else None), i + ln
        elif wire == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if num in wanted:
            out[num] = v
    return out


def model_spec(proto: bytes) -> dict[str, Any]:
    """The settings of a SentencePiece ModelProto that decide how text may be cut before encoding."""
    top = _fields(proto, {2, 3})
    tr = _fields(top.get(2, b""), {3, 22, 24, 53})
    nm = _fields(top.get(3, b""), {1, 3, 4, 5})
    model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(tr.get(3, 1), "unknown")
    return {
        "model_type": model_type,
        "split_by_whitespace": bool(tr.get(22, 1)),
        "treat_whitespace_as_suffix": bool(tr.get(24, 0)),
        "pretokenization_delimiter": tr.get(53, b"").decode("utf-8", "replace"),
        "normalizer": nm.get(1, b"nmt_nfkc").decode("utf-8", "replace"),
        "add_dummy_prefix": bool(nm.get(3, 1)),
        "remove_extra_whitespaces": bool(nm.get(4, 1)),
        "escape_whitespaces": bool(nm.get(5, 1)),
    }


@dataclass
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    model_type: str
    add_dummy_prefix: bool
    lossless_segments: bool       # cutting at single spaces leaves the ids unchanged
    trained: Optional[dict] = None

    def manifest_entry(self) -> dict[str, Any]:
        return asdict(self)


def load(path: str):
    """(SentencePieceProcessor, TokenizerInfo, model bytes) for a .model file; UserError if it is not one."""
    import sentencepiece as spm
    try:
        with open(path, "rb") as f:
            proto = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read tokenizer ({e.strerror or e})") from None
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
        spec = model_spec(proto)
    except Exception as e:
        raise UserError(f"{path}: not a SentencePiece model ({str(e).strip() or type(e).__name__})") from None
    lossless = (spec["model_type"] in ("bpe", "unigram") and spec["split_by_whitespace"]
                and not spec["treat_whitespace_as_suffix"] and not spec["pretokenization_delimiter"]
                and spec["escape_whitespaces"] and spec["normalizer"] in LOSSLESS_NORMALIZERS)
    info = TokenizerInfo(os.path.abspath(path), hashlib.sha256(proto).hexdigest(), sp.vocab_size(), sp.bos_id(),
                         sp.eos_id(), sp.pad_id(), sp.unk_id(), spec["model_type"], spec["add_dummy_prefix"],
                         lossless)
    sidecar = path + ".json"
    if os.path.exists(sidecar):
        try:
            meta = json.load(open(sidecar))
            if meta.get("sha256") == info.sha256:
                info.trained = meta.get("settings")
        except (OSError, ValueError):
            pass
    return sp, info, proto


# ---------------------------------------------------------------------------------------------------------------
# Training

def _sentences(texts: Iterable[str]) -> Iterable[str]:
    for text in texts:
        for line in text.split("\n"):
            if not line or line.isspace():
                continue
            if len(line) <= TRAIN_SENTENCE_CHARS:
                yield line
                continue
            for part in segment(line, TRAIN_SENTENCE_CHARS, drop_space=True):
                while len(part) > 2 * TRAIN_SENTENCE_CHARS:   # no safe space at all: hard cuts
                    yield part[:TRAIN_SENTENCE_CHARS]
                    part = part[TRAIN_SENTENCE_CHARS:]
                if part and not part.isspace():
                    yield part


def _advice(msg: str) -> str:
    """What to change for SentencePiece's two vocabulary-size failures; nothing for others (its message says)."""
    if "too high" in msg:
        return "; try a smaller --vocab-size or more text"
    if "smaller than required_chars" in msg:
        return "; try a larger --vocab-size (every character of the text needs a piece)"
    return ""


def train(texts: Iterable[str], out_path: str, *, vocab_size: int = 32000, sentences: int = 1_000_000,
          seed: int = 0, threads: int = 4, settings_key: Optional[dict] = None, overwrite: bool = False,
          log=print, split: bool = True, record: Optional[dict] = None) -> bool:
    """Train a BPE model on ``texts`` (an iterable of document texts) and write it atomically to ``out_path``.
    ``settings_key`` (settings + inputs) goes to ``<out_path>.json``; if that file already matches, training is
    skipped and False is returned. ``split=False``: ``texts`` are training sentences already, fed as they are (a
    weighted sample of several corpora, data_prep/sample.py); ``record``: more for ``<out_path>.json``, read once
    the texts are (what the sample holds)."""
    import sentencepiece as spm
    from pathlib import Path

    from conf.files import atomic_write_bytes

    settings = {"model_type": "bpe", "vocab_size": vocab_size, "input_sentence_size": sentences, "seed": seed,
                "num_threads": threads, "byte_fallback": True}
    key = {"settings": settings, **(settings_key or {})}
    sidecar = out_path + ".json"
    if os.path.exists(out_path) and os.path.exists(sidecar):
        try:
            old = json.load(open(sidecar))
        except (OSError, ValueError):
            old = {}
        with open(out_path, "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        if old.get("key") == key and old.get("sha256") == sha:
            log(f"tokenizer: {out_path} was already trained with these settings and inputs; reusing it")
            return False
    if os.path.exists(out_path) and not overwrite:
        raise UserError(f"{out_path}: exists and was not trained from these inputs and settings; "
                        "pass --overwrite to retrain it or use --tokenizer to use it as it is")
    if vocab_size < 260:
        raise UserError(f"--vocab-size {vocab_size}: too small for a byte-fallback model (needs 256 byte pieces "
                        "+ specials; use >= 300)")
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    n_sent = [0]
    failed: list[BaseException] = []

    def counted(it):
        # SentencePiece turns an exception of its sentence iterator into a RuntimeError that names only our
        # frame (e.g. "sources.py(202): _blocks"): keep the original, which names the input file
        try:
            for s in it:
                n_sent[0] += 1
                yield s
        except BaseException as e:
            failed.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(_sentences(texts) if split else texts), model_writer=writer, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            split_digits=True, allow_whitespace_only_pieces=True, split_by_whitespace=True,
            input_sentence_size=sentences, shuffle_input_sentence=True, max_sentence_length=8192,
            num_threads=threads, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    except Exception as e:
        if failed:
            raise failed[0] from None
        if not isinstance(e, RuntimeError):
            raise
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"tokenizer training failed ({msg}){_advice(msg)}") from None
    if failed:                          # in case a SentencePiece version swallows the error and stops reading
        raise failed[0]
    if n_sent[0] == 0:
        raise UserError("tokenizer training: the inputs hold no text")
    proto = writer.getvalue()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out_path), proto)
    meta = {"key": key, "settings": settings, "sha256": hashlib.sha256(proto).hexdigest(), "sentences_seen": n_sent[0]}
    meta.update(record or {})
    atomic_write_bytes(Path(sidecar), (json.dumps(meta, indent=1) + "\n").encode())
    return True


# ---------------------------------------------------------------------------------------------------------------
# Encoding in workers

_W: dict[str, Any] = {}


def worker_process_setup() -> None:
    """In a worker process of a pool: Ctrl-C is the main process's to handle, SIGTERM ends the worker (not the main
    process's handler, inherited by fork), and the worker dies with the main process (Linux)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except Exception:
        pass


def init_worker(proto: bytes, info: dict, dtype: str, bos: bool, in_worker: bool = True) -> None:
    """Process initialiser: load the model from its bytes (the same model in every process)."""
    import sentencepiece as spm
    if in_worker:
        worker_process_setup()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    _W.update(sp=sp, dtype=np.dtype(dtype), bos=info["bos_id"] if bos else -1, eos=info["eos_id"],
              lossless=info["lossless_segments"], drop=info["add_dummy_prefix"])


def encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text, concatenated (uint32), and the number per text."""
    sp = _W["sp"]
    if _W["lossless"]:
        segs: list[str] = []
        counts = []
        for t in texts:
            s = segment(t, SEGMENT_CHARS, _W["drop"]) if len(t) > SEGMENT_CHARS else [t]
            segs += s
            counts.append(len(s))
    else:
        segs, counts = texts, None
    ids = sp.encode(segs, num_threads=1)
    seg_lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.frombuffer(array.array("I", itertools.chain.from_iterable(ids)), dtype=np.uint32)
    if counts is None or len(counts) == len(segs):
        return flat, seg_lens
    ends = np.cumsum(np.asarray(counts, dtype=np.int64))
    csum = np.concatenate([[0], np.cumsum(seg_lens)])
    return flat, np.diff(csum[np.concatenate([[0], ends])])


def encode_batch(batch: tuple[list[str], bytes, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of pieces. ``batch`` = (texts, first flags, last flags) (flags as bytes of 0/1). Returns
    each piece's token stream — BOS (if on) at a document's first piece, its ids, EOS at its last piece — all
    concatenated in the output dtype, and each stream's length."""
    texts, first, last = batch
    flat, lens = encode_texts(texts)
    first_a = np.frombuffer(first, dtype=np.uint8).astype(bool)
    last_a = np.frombuffer(last, dtype=np.uint8).astype(bool)
    bos, eos = _W["bos"], _W["eos"]
    add_bos = first_a if bos >= 0 else np.zeros_like(first_a)
    out_lens = lens + add_bos + last_a
    out = np.empty(int(out_lens.sum()), dtype=_W["dtype"])
    starts = np.concatenate([[0], np.cumsum(out_lens)[:-1]]).astype(np.int64)
    content_starts = starts + add_bos
    # place each piece's ids: destination of content token j of piece i is content_starts[i] + j
    src_starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    dest = np.arange(len(flat), dtype=np.int64) + np.repeat(content_starts - src_starts, lens)
    out[dest] = flat
    if add_bos.any():
        out[starts[add_bos]] = bos
    if last_a.any():
        out[(starts + out_lens - 1)[last_a]] = eos
    return out, out_lens
