"""Export a trained run as a Hugging Face model folder: ``python -m pretrain.export RUN_OR_CHECKPOINT OUT_DIR``.

RUN_OR_CHECKPOINT is a run folder (its newest checkpoint that passes its check) or one checkpoint folder, saved under
any layout (TP, PP, DP, ZeRO 0-3, fp32 or bf16): it is merged into one model first (pretrain/training/
consolidate.py). OUT_DIR gets:

    model.safetensors       every weight once, fp32: a shared layer once however many recursion steps reuse it,
                            a tied embedding once (the head reads it); byte-identical for the same checkpoint
    config.json             MoRConfig (model_type "mor"): every field of the run's model config, auto_map for
                            AutoConfig / AutoModelForCausalLM
    configuration_mor.py    the model code, plain PyTorch (no megatron-core, DeepSpeed or this project): loaded with
    modeling_mor.py           AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
    generation_config.json  BOS / EOS / padding ids for generate()
    spiece.model            the run's SentencePiece model, and tokenizer_config.json for AutoTokenizer
    tokenizer_config.json
    mor_run.json            the run's config, step and tokens: what python -m pretrain.import_hf reads back
    README.md               the model card: config, training tokens, steps and FLOPs, final metrics, usage

The HF model routes causally (each token decides alone whether it runs each recursion step, as
``MoRModel.forward(causal_routing=True)``), with recursion-wise KV caches in generate().

OUT_DIR must be empty or missing (--overwrite replaces it); the folder is written beside it and moved into place
whole, so an interrupted export leaves no half-written model. Needs the ``hf`` extra: pip install -e '.[hf]'.

Exit status: 0 done; 2 a mistake (a missing or damaged checkpoint, a missing tokenizer, a non-empty OUT_DIR,
transformers or safetensors not installed), said in one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from conf.errors import ConfigError
from data_prep.shards import sha256_file

if TYPE_CHECKING:
    import torch

    from model.config import ModelConfig
    from model.mor import MoRModel

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

HF_CODE = Path(__file__).resolve().parent / "hf"
CODE_FILES = ("configuration_mor.py", "modeling_mor.py")
TOKENIZER_FILE = "spiece.model"      # the file name BertGenerationTokenizer reads
WEIGHTS = "model.safetensors"
RUN_RECORD = "mor_run.json"
FORMAT = "mor-hf-export/1"
INSTALL = "pip install -e '.[hf]'"


def require_hf(what: tuple[str, ...] = ("transformers", "safetensors")) -> None:
    """ConfigError (one line) unless the packages of the ``hf`` extra can be imported."""
    import importlib
    for name in what:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"{name} is not installed; the Hugging Face export needs it: {INSTALL}") from None


@dataclass
class ExportInfo:
    """What the model card and mor_run.json say about where the model comes from."""
    step: int = 0
    tokens: int = 0
    run: Optional[dict[str, Any]] = None       # the run's config (conf.config_to_dict of pretrain.config.RunConfig)
    source: str = ""                           # the checkpoint folder
    layout: str = ""                           # how it was saved, e.g. "TP=2 PP=1 DP=2 ZeRO-3, bf16"
    seq_len: Optional[int] = None              # the training sequence length (the data's)
    bos: Optional[bool] = None                 # the data starts documents with BOS (else only ends them with EOS)
    tokenizer_sha256: Optional[str] = None
    metrics: dict[str, tuple[int, float]] = field(default_factory=dict)   # name -> (step, value), the last ones


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
    """The MoRConfig of ``cfg``, with the tokenizer's special ids."""
    from conf import config_to_dict
    from pretrain.hf.configuration_mor import MoRConfig
    eos = sp.get("eos_id")
    config = MoRConfig(**config_to_dict(cfg), bos_token_id=sp.get("bos_id"), eos_token_id=eos,
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


def _tokenizer_config(sp: dict[str, Any], max_len: int) -> dict[str, Any]:
    # BertGenerationTokenizer is transformers' plain SentencePiece tokenizer (SentencePieceBackend): it encodes with
    # the model file itself, so ids are exactly sentencepiece's, offline, without conversion. It adds no special
    # token; padding (left, for generation) uses EOS.
    return {"tokenizer_class": "BertGenerationTokenizer", "bos_token": sp.get("bos_piece"),
            "eos_token": sp.get("eos_piece"), "unk_token": sp.get("unk_piece"),
            "pad_token": sp.get("pad_piece") or sp.get("eos_piece"), "sep_token": None,
            "model_max_length": max_len, "padding_side": "left", "clean_up_tokenization_spaces": False}


def _fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def model_card(cfg: ModelConfig, info: ExportInfo, sp: dict[str, Any], doc_start: Optional[int]) -> str:
    """README.md of the export."""
    from model.flops import param_counts, training_flops
    seq_len = info.seq_len or cfg.max_seq_len
    flops = training_flops(cfg, seq_len)
    params = param_counts(cfg)
    variant = {"none": "no router", "expert_choice": "expert-choice routing",
               "token_choice": "token-choice routing"}[cfg.routing]
    kind = ("vanilla transformer" if cfg.sharing == "none" else
            f"recursive transformer, {cfg.sharing} sharing, {cfg.num_recursions} recursions, {variant}"
            + (", recursive KV sharing" if cfg.kv_sharing else ""))
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [mixture-of-recursions, mor, custom_code]", "---", "",
             f"# {cfg.name}", "",
             f"A {kind} (Mixture-of-Recursions, Bae et al., arXiv 2507.10524), trained with mor-pretrain and "
             "exported by `python -m pretrain.export`.", ""]
    lines += ["## Model", "", "| key | value |", "|---|---|"]
    from conf import config_to_dict
    for key, value in config_to_dict(cfg).items():
        if key == "router":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"| {key} | {value} |")
    lines += ["", "| parameters | count |", "|---|---|"]
    lines += [f"| {k} | {_fmt_int(v)} |" for k, v in params.items()]
    lines += ["", "## Training", ""]
    if info.source:
        lines.append(f"- checkpoint: `{info.source}` ({info.layout})")
    lines += [f"- optimizer steps: {info.step:,}", f"- training tokens: {_fmt_int(info.tokens)}",
              f"- sequence length: {seq_len}",
              f"- training FLOPs per token: {flops.training_per_token:.4g} (forward and backward, at the configured "
              "capacities)",
              f"- training FLOPs in all: {flops.training_per_token * info.tokens:.4g}"]
    if info.run:
        o = info.run.get("optim", {})
        lines.append(f"- optimizer: AdamW lr {o.get('lr')}, betas {o.get('betas')}, weight decay "
                     f"{o.get('weight_decay')}, schedule {info.run.get('schedule', {}).get('kind')}")
    if info.metrics:
        lines += ["", "## Final metrics", "", "| metric | step | value |", "|---|---|---|"]
        for name, (step, value) in sorted(info.metrics.items()):
            lines.append(f"| {name} | {step} | {value:.4f} |")
        lines += ["", "`val_loss`: nats per token under training routing (top-k over the sequence); "
                  "`val_loss_causal`: under causal routing, as this model runs; `downstream_avg`: mean few-shot "
                  "accuracy of the in-loop tasks."]
    start = ("BOS" if info.bos else "EOS") if doc_start is not None else None
    prefix = f"[{doc_start}] + " if doc_start is not None else ""
    lines += ["", "## Usage", "",
              "Needs torch, transformers and safetensors (and sentencepiece for the tokenizer); the model code ships "
              "in this folder (`trust_remote_code=True`).", "", "```python",
              "import torch",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "."   # this folder',
              "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)",
              "model.eval()",
              f'ids = torch.tensor([{prefix}tok("The state of our Union is").input_ids])',
              "out = model.generate(ids, max_new_tokens=40, do_sample=False)",
              "print(tok.sp_model.decode(out[0, 1:].tolist()))", "```", ""]
    if start is not None:
        lines.append(f"In the training data every document came after {start} (id {doc_start}, "
                     "`config.doc_start_token_id`): start each prompt with it, as above. The tokenizer adds no "
                     "special token itself.")
    lines += ["Routing is causal: a token runs a recursion step only if it ran the step before and its router says "
              "so (expert-choice), or if its chosen depth reaches it (token-choice); the KV cache holds a step's "
              "keys only for the tokens that ran the step. `tok.sp_model.decode(ids)` decodes exactly "
              "(`tok.decode` shows byte-fallback pieces as `<0x..>`).", "",
              "## Back to training", "",
              "`python -m pretrain.import_hf THIS_FOLDER runs/NAME data.path=DATA` writes a checkpoint that "
              "`python -m pretrain.train runs/NAME/run.yaml` resumes (weights and step; the optimizer state "
              "starts fresh).", ""]
    return "\n".join(lines)


def write_export(model: MoRModel, cfg: ModelConfig, out: Path, *, tokenizer: Optional[Path] = None,
                 info: Optional[ExportInfo] = None, overwrite: bool = False) -> Path:
    """Write the export of ``model`` (a single-process MoRModel with config ``cfg``) into ``out``: built in a
    folder beside it, then moved into place. ``tokenizer``: the run's SentencePiece model (none: no tokenizer
    files). Raises ConfigError for a non-empty ``out`` without ``overwrite``."""
    require_hf()
    from safetensors.torch import save_file
    info = info or ExportInfo()
    out = Path(out)
    check_out_dir(out, overwrite)
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
        gen = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                               pad_token_id=config.pad_token_id)
        (tmp / "generation_config.json").write_text(gen.to_json_string())
        for name in CODE_FILES:
            shutil.copyfile(HF_CODE / name, tmp / name)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            (tmp / "tokenizer_config.json").write_text(_json(_tokenizer_config(sp, cfg.max_seq_len)))
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
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; give a folder to write the model into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: not empty; give an empty or new folder, or --overwrite to replace it")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` (empty, or --overwrite) goes only after."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ---- from a run ---------------------------------------------------------------------------------------------------
def _check_tokenizer(path: Path, want: Optional[str], vocab: int, where: str) -> str:
    import sentencepiece as spm
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{where} {path}: not a readable SentencePiece model "
                          f"({' '.join(str(e).split())[:120]})") from None
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
        return int(Manifest.load(Path(run.data.path)).seq_len)
    except (FileNotFoundError, ValueError, OSError):
        return None


def export_run(path: Path, out: Path, *, overwrite: bool = False, tokenizer: Optional[Path] = None,
               say: Callable[[str], None] = lambda line: None) -> Path:
    """Export the run or checkpoint at ``path`` into ``out``. Raises ConfigError (one line) for every mistake,
    before anything is written."""
    require_hf()
    check_out_dir(Path(out), overwrite)
    from conf import config_to_dict
    from pretrain.training import checkpoint as ckpt
    from pretrain.training.checkpoint import CheckpointError
    from pretrain.training.consolidate import load_model, open_checkpoint
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
    write_export(loaded.model, info.run.model, Path(out), tokenizer=Path(tok), info=meta, overwrite=overwrite)
    say(f"exported {info.path} (step {info.step}, saved as {loaded.layout}) to {out}")
    return Path(out)


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", type=Path,
                   help="a run folder (runs/NAME) or one of its checkpoints (runs/NAME/checkpoints/step-NNNNNN)")
    p.add_argument("out", metavar="OUT_DIR", type=Path, help="the folder to write (empty or new)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR even when it is not empty")
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


if __name__ == "__main__":
    sys.exit(main())
