"""Export a trained run as a Hugging Face model folder: ``python -m pretrain.export RUN_OR_CHECKPOINT OUT_DIR``.

RUN_OR_CHECKPOINT is a run folder (its newest checkpoint that passes its check) or one checkpoint folder, saved under
any layout (TP, PP, DP, ZeRO 0-3, fp32 or bf16): it is merged into one model first (pretrain/training/
consolidate.py). OUT_DIR gets:

    model.safetensors       every weight once, fp32: a shared layer once however many recursion steps reuse it,
                            a tied embedding once (the head reads it); byte-identical for the same checkpoint
    config.json             MoRConfig (model_type "mor"): every field of the run's model config, auto_map for
                            AutoConfig / AutoModelForCausalLM
    configuration_mor.py    the model code, plain PyTorch (no megatron-core, DeepSpeed or this project): loaded with
    modeling_mor.py           AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True);
    layers_mor.py             modeling_mor.py imports the layers and the recursion-wise KV cache from the other two
    cache_mor.py
    generation_config.json  BOS / EOS / padding ids for generate(), max_length = the model's max_seq_len
    tokenizer.model         the run's SentencePiece model, and tokenizer_config.json for AutoTokenizer: it puts the
    tokenizer_config.json     token that started every training document (BOS, or EOS when the data had no BOS)
                              before each text, so AutoTokenizer(text) gives the ids training saw
    mor_run.json            the run's config, step and tokens: what python -m pretrain.import_hf reads back; also
                              the mark of an export (--overwrite replaces only a folder that holds one)
    README.md               the model card: config, training tokens, steps and FLOPs, final metrics, usage

The HF model routes causally (each token decides alone whether it runs each recursion step, as
``MoRModel.forward(causal_routing=True)``), with recursion-wise KV caches in generate().

OUT_DIR must be new or empty. --overwrite replaces an earlier export there — a folder holding mor_run.json and only
the files an export writes — and says what it removed; nothing else is ever replaced. OUT_DIR may not be a run
folder, lie inside one or hold one, nor be the folder exported, lie inside it or above it
(pretrain/training/outdir.py). The folder is written beside OUT_DIR and moved into place whole, so an interrupted
export leaves no half-written model. Needs the ``hf`` extra: pip install -e '.[hf]'.

Exit status: 0 done; 2 a mistake (a missing or damaged checkpoint, a missing tokenizer, an OUT_DIR that may not be
written, transformers or safetensors not installed), said in one line on stderr, with nothing changed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from conf.errors import ConfigError, one_line
from data_prep.shards import sha256_file
from pretrain.export.card import ExportInfo, model_card
from pretrain.training.outdir import check_place

if TYPE_CHECKING:
    import torch

    from model.config import ModelConfig
    from model.mor import MoRModel

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

HF_CODE = Path(__file__).resolve().parent.parent / "hf"
CODE_FILES = ("configuration_mor.py", "layers_mor.py", "cache_mor.py", "modeling_mor.py")
TOKENIZER_FILE = "tokenizer.model"   # the file name SentencePieceBackend reads
OLD_TOKENIZER_FILE = "spiece.model"  # earlier exports' (BertGenerationTokenizer's)
WEIGHTS = "model.safetensors"
RUN_RECORD = "mor_run.json"
FORMAT = "mor-hf-export/1"
# every name an export writes (and earlier ones wrote): what --overwrite may remove, and nothing else
EXPORT_FILES = frozenset({WEIGHTS, "config.json", *CODE_FILES, "generation_config.json", TOKENIZER_FILE,
                          OLD_TOKENIZER_FILE, "tokenizer_config.json", RUN_RECORD, "README.md"})
INSTALL = "pip install -e '.[hf]'"


def require_hf(what: tuple[str, ...] = ("transformers", "safetensors")) -> None:
    """ConfigError (one line) unless the packages of the ``hf`` extra can be imported."""
    import importlib
    for name in what:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"{name} is not installed; the Hugging Face export needs it: {INSTALL}") from None


# ---- what goes in the folder ------------------------------------------------------------------------------------
def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for model.safetensors, by name, fp32 on the CPU, each its own storage. MoRModel's state
    dict already holds a shared layer once (the steps reuse one module) and a tied embedding once (the head borrows
    it); megatron's ``_extra_state`` entries (None) are left out."""
    import torch
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in sorted(model.state_dict().items()):
        if not torch.is_tensor(value):
            continue
        t = value.detach().to("cpu")
        if t.is_floating_point():
            t = t.float()
        ptr = t.untyped_storage().data_ptr()
        # views into a larger buffer (ZeRO-3 partitions), strided tensors and repeated storages get their own copy
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes or ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _sp_tokens(tokenizer: Optional[Path]) -> dict[str, Any]:
    """Special token ids and pieces of a SentencePiece model (empty without one)."""
    if tokenizer is None:
        return {}
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out: dict[str, Any] = {"pieces": sp.get_piece_size()}
    for kind, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id())):
        out[f"{kind}_id"] = i if i >= 0 else None
        out[f"{kind}_piece"] = sp.id_to_piece(i) if i >= 0 else None
    return out


def hf_config(cfg: ModelConfig, sp: dict[str, Any], doc_start: Optional[int]):
    """The MoRConfig of ``cfg``, with the tokenizer's special ids: BOS is the token that started every training
    document (``doc_start``), not the SentencePiece model's BOS, which data without BOS never shows the model."""
    from conf import config_to_dict
    from model.routing import routing_class
    from pretrain.hf.configuration_mor import MoRConfig
    eos = sp.get("eos_id")
    fields = config_to_dict(cfg)
    routing = routing_class(cfg)
    if routing.export_name is None:
        raise ConfigError(f"routing: {cfg.routing} has no Hugging Face implementation yet (its export_name is "
                          "unset; model/routing/__init__.py says what adding one takes); it cannot be exported")
    if routing.export_name != cfg.routing:   # run by another variant's code: its router defaults, resolved here
        settings = routing.settings(cfg)
        fields["router"] = {**fields["router"], "alpha": settings["alpha"], "func": settings["func"],
                            "z_loss_coef": settings["z_loss_coef"]}
        fields["routing"] = routing.export_name
    config = MoRConfig(**fields, bos_token_id=doc_start, eos_token_id=eos,
                       pad_token_id=sp.get("pad_id") if sp.get("pad_id") is not None else eos,
                       doc_start_token_id=doc_start, dtype="float32", architectures=["MoRForCausalLM"])
    config.auto_map = {"AutoConfig": "configuration_mor.MoRConfig",
                       "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM"}
    return config


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def _config_json(config) -> str:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    if d.get("id2label") == {0: "LABEL_0", 1: "LABEL_1"} or d.get("id2label") == {"0": "LABEL_0", "1": "LABEL_1"}:
        d.pop("id2label"), d.pop("label2id", None)   # a classifier's defaults, nothing of this model
    return _json(d)


def _tokenizer_config(sp: dict[str, Any], doc_start: Optional[int], max_len: int) -> dict[str, Any]:
    # SentencePieceBackend is transformers' plain SentencePiece tokenizer: it encodes with the model file itself, so
    # ids are exactly sentencepiece's, offline, without a conversion to the `tokenizers` library (whose converted
    # Llama-style tokenizers do not reproduce SentencePiece's whitespace and normalisation rules). Its
    # special_tokens_pattern "bos" puts bos_token before every text, as (doc_start) came before every training
    # document; it is this class's add_bos_token, which it does not read. split_special_tokens: a text that spells
    # a special piece ("</s>") is encoded as text, as data_prep encoded the training data. Padding (left, for
    # generation) uses EOS.
    start = None if doc_start is None else (sp["bos_piece"] if doc_start == sp.get("bos_id") else sp["eos_piece"])
    return {"tokenizer_class": "SentencePieceBackend", "special_tokens_pattern": "none" if start is None else "bos",
            "bos_token": start, "eos_token": sp.get("eos_piece"), "unk_token": sp.get("unk_piece"),
            "pad_token": sp.get("pad_piece") or sp.get("eos_piece"), "split_special_tokens": True,
            "model_max_length": max_len, "padding_side": "left", "clean_up_tokenization_spaces": False}


def write_export(model: MoRModel, cfg: ModelConfig, out: Path, *, tokenizer: Optional[Path] = None,
                 info: Optional[ExportInfo] = None, overwrite: bool = False,
                 say: Callable[[str], None] = lambda line: None) -> Path:
    """Write the export of ``model`` (a single-process MoRModel with config ``cfg``) into ``out``: built in a
    folder beside it, then moved into place. ``tokenizer``: the run's SentencePiece model (none: no tokenizer
    files). Raises ConfigError where ``out`` may not be written (``check_out_dir``); ``say`` gets the line that
    tells what an ``overwrite`` removed."""
    require_hf()
    from safetensors.torch import save_file
    info = info or ExportInfo()
    out = Path(out)
    earlier = check_out_dir(out, overwrite, [Path(info.source)] if info.source else [])
    sp = _sp_tokens(tokenizer)
    doc_start = None
    if sp:
        doc_start = sp["bos_id"] if info.bos and sp["bos_id"] is not None else sp["eos_id"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(hf_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = hf_config(cfg, sp, doc_start)
        (tmp / "config.json").write_text(_config_json(config))
        shutil.copymode(tmp / "config.json", tmp / WEIGHTS)   # safetensors makes its file private (0600)
        from transformers import GenerationConfig
        # max_length: generate() stops at the longest sequence the model was trained on (modeling_mor.py also
        # caps max_new_tokens there, which transformers would let run past it)
        gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                               pad_token_id=config.pad_token_id, max_length=cfg.max_seq_len)
        (tmp / "generation_config.json").write_text(gen.to_json_string())
        for name in CODE_FILES:
            shutil.copyfile(HF_CODE / name, tmp / name)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            (tmp / "tokenizer_config.json").write_text(_json(_tokenizer_config(sp, doc_start, cfg.max_seq_len)))
        from conf import config_to_dict
        record = {"format": FORMAT, "step": info.step, "tokens": info.tokens, "source": info.source,
                  "layout": info.layout, "seq_len": info.seq_len, "bos": info.bos,
                  "tokenizer_sha256": info.tokenizer_sha256, "doc_start_token_id": doc_start,
                  "model": config_to_dict(cfg), "run": info.run,
                  "metrics": {k: list(v) for k, v in info.metrics.items()}}
        (tmp / RUN_RECORD).write_text(_json(record))
        (tmp / "README.md").write_text(model_card(cfg, info, sp, doc_start))
        for f in tmp.iterdir():   # on disk before the folder is moved into place
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        removed = _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if earlier is not None:
        say(f"replaced the earlier export in {out} (step {earlier.get('step')} of {earlier.get('source') or '?'}): "
            f"removed {removed}")
    return out


# ---- where it goes --------------------------------------------------------------------------------------------
def earlier_export(folder: Path) -> tuple[Optional[dict[str, Any]], str]:
    """(its mor_run.json, "") when ``folder`` holds an export of ours and nothing else; (None, why not) else."""
    try:
        record = json.loads((folder / RUN_RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"it has no {RUN_RECORD}, which every export writes"
    except (OSError, ValueError):
        return None, f"its {RUN_RECORD} cannot be read"
    if not isinstance(record, dict) or not str(record.get("format", "")).startswith(FORMAT.split("/")[0] + "/"):
        return None, f"its {RUN_RECORD} is not an export's record"
    with os.scandir(folder) as entries:
        foreign = sorted(e.name for e in entries if e.name not in EXPORT_FILES or not e.is_file(follow_symlinks=False))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return None, f"it also holds {', '.join(foreign[:3])}{more}, which no export writes"
    return record, ""


def check_out_dir(out: Path, overwrite: bool, sources: Sequence[Path] = ()) -> Optional[dict[str, Any]]:
    """ConfigError (one line, nothing touched) unless the export may be written to ``out``: not a run, inside one
    or holding one, nor overlapping ``sources`` (pretrain/training/outdir.py); new or empty; or, with
    ``overwrite``, an earlier export and nothing else. Returns that export's record (None: nothing to replace)."""
    check_place(out, sources)
    if not out.is_dir() or not any(out.iterdir()):
        return None
    record, why = earlier_export(out)
    if record is None:
        raise ConfigError(f"OUT_DIR {out}: not empty, and not an earlier export ({why}); --overwrite replaces only "
                          "an earlier export: give an empty or new folder")
    if not overwrite:
        raise ConfigError(f"OUT_DIR {out}: not empty: it holds an earlier export (step {record.get('step')}); "
                          "--overwrite replaces it, or give an empty or new folder")
    return record


def _replace(tmp: Path, out: Path) -> str:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` (empty, or an earlier export that
    ``check_out_dir`` accepted) is set aside first and emptied after, file by file: only the names an export
    writes are removed, so a file that appeared there meanwhile stays (in the set-aside folder, which is then
    kept and named). Returns what was removed, in words."""
    if not out.exists():
        tmp.rename(out)
        return "nothing"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    count = size = 0
    with os.scandir(old) as entries:
        for e in entries:
            if e.name in EXPORT_FILES and e.is_file(follow_symlinks=False):
                size += e.stat(follow_symlinks=False).st_size
                os.unlink(e.path)
                count += 1
    words = f"{count} file(s), {size / 1e6:.1f} MB"
    try:
        old.rmdir()
    except OSError:
        words += f"; {old} keeps what appeared there meanwhile"
    return words


# ---- from a run ---------------------------------------------------------------------------------------------------
def _check_tokenizer(path: Path, want: Optional[str], vocab: int, where: str) -> str:
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{where} {path}: not a readable SentencePiece model "
                          f"({one_line(e, 120, name=False)})") from None
    if sp.get_piece_size() > vocab:
        raise ConfigError(f"{where} {path}: {sp.get_piece_size()} pieces, more than the model's vocabulary ({vocab}); "
                          "it is not the tokenizer the run was trained with")
    got = sha256_file(path)
    if want is not None and got != want:
        raise ConfigError(f"{where} {path}: sha256 {got[:16]}… differs from the run's tokenizer ({want[:16]}…); "
                          "use the tokenizer the run was trained with")
    return got


def final_metrics(run_dir: Path, step: int) -> dict[str, tuple[int, float]]:
    """The last val_loss, val_loss_causal and downstream_avg of the run's metrics.jsonl at or before ``step``."""
    from pretrain.training.metrics import read_metrics
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    try:
        records = read_metrics(path)
    except ConfigError:
        return {}
    out: dict[str, tuple[int, float]] = {}
    for rec in records:
        s = rec.get("step")
        if not isinstance(s, int) or s > step:
            continue
        for key in ("val_loss", "val_loss_causal", "downstream_avg"):
            if isinstance(rec.get(key), (int, float)):
                out[key] = (s, float(rec[key]))
    return out


def _seq_len(run) -> Optional[int]:
    from data_prep.shards import Manifest
    try:
        return int(Manifest.load(Path(run.data.primary_path)).seq_len)
    except (FileNotFoundError, ValueError, OSError):
        return None


def export_run(path: Path, out: Path, *, overwrite: bool = False, tokenizer: Optional[Path] = None,
               say: Callable[[str], None] = lambda line: None) -> Path:
    """Export the run or checkpoint at ``path`` into ``out``. Raises ConfigError (one line) for every mistake,
    before anything is written."""
    require_hf()
    check_out_dir(Path(out), overwrite, [Path(path)])
    from conf import config_to_dict
    from pretrain.checkpoint import verify as ckpt
    from pretrain.checkpoint.verify import CheckpointError
    from pretrain.checkpoint.consolidate import load_model, open_checkpoint
    try:
        info = open_checkpoint(Path(path))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    for note in info.notes:
        say(f"checkpoint: {note}")
    tok = tokenizer or info.tokenizer.path
    if tok is None:
        raise ConfigError(f"{info.path}: cannot find the run's tokenizer ({info.tokenizer.why}); pass --tokenizer "
                          "PATH")
    sha = _check_tokenizer(Path(tok), info.tokenizer.sha256, info.run.model.vocab_size,
                           "--tokenizer" if tokenizer else "tokenizer")
    try:
        loaded = load_model(info)
        state = ckpt.read_trainer_state(info.path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    for warning in loaded.warnings:
        say(f"warning: {warning}")
    run_dir = info.path.parent.parent
    meta = ExportInfo(step=info.step, tokens=int(state.get("tokens", 0)), run=config_to_dict(info.run),
                      source=str(info.path), layout=loaded.layout, seq_len=_seq_len(info.run),
                      bos=info.tokenizer.bos, tokenizer_sha256=sha, metrics=final_metrics(run_dir, info.step))
    # the run's own model config (its attention_backend as trained; the HF model always uses SDPA)
    write_export(loaded.model, info.run.model, Path(out), tokenizer=Path(tok), info=meta, overwrite=overwrite,
                 say=say)
    say(f"exported {info.path} (step {info.step}, saved as {loaded.layout}) to {out}")
    return Path(out)


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", type=Path,
                   help="a run folder (runs/NAME) or one of its checkpoints (runs/NAME/checkpoints/step-NNNNNN)")
    p.add_argument("out", metavar="OUT_DIR", type=Path, help="the folder to write (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT_DIR (only a folder holding an export and nothing else)")
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help="the run's SentencePiece .model, when its data manifest no longer names it")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from conf import cli_errors
    with cli_errors():
        export_run(args.path, args.out, overwrite=args.overwrite, tokenizer=args.tokenizer,
                   say=lambda line: print(line, file=sys.stderr, flush=True))
    return 0

