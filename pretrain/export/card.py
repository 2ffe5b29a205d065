"""The model card (README.md) of an export, and ExportInfo: what the card and mor_run.json say about the model's
origin."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from model.config import ModelConfig


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


def _fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def model_card(cfg: ModelConfig, info: ExportInfo, sp: dict[str, Any], doc_start: Optional[int]) -> str:
    """README.md of the export."""
    from model.flops import param_counts, training_flops
    seq_len = info.seq_len or cfg.max_seq_len
    flops = training_flops(cfg, seq_len)
    params = param_counts(cfg)
    from model.routing import routing_class
    variant = routing_class(cfg).display_name
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
    skip = 1 if doc_start is not None else 0
    lines += ["", "## Usage", "",
              "Needs torch, transformers and safetensors (and sentencepiece for the tokenizer); the model code ships "
              "in this folder (`trust_remote_code=True`).", "", "```python",
              "import torch",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "."   # this folder',
              "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)",
              "model.eval()",
              'ids = tok("The state of our Union is", return_tensors="pt").input_ids',
              "out = model.generate(ids, max_new_tokens=40, do_sample=False)",
              f"print(tok.sp_model.decode(out[0, {skip}:].tolist()))", "```", ""]
    if start is not None:
        lines.append(f"In the training data every document came after {start} (id {doc_start}, "
                     "`config.doc_start_token_id`), so the tokenizer puts it before every text as its BOS token "
                     "(`add_special_tokens=False` leaves it out): `tok(text).input_ids` are the ids training saw. "
                     "lm-evaluation-harness's `add_bos_token=True` and its loglikelihood prefix use the same token.")
    lines.append(f"`generate()` stops at {cfg.max_seq_len} tokens in all, prompt included (`max_seq_len`, the "
                 "longest sequence the model was trained on), whatever `max_new_tokens` says; a longer prompt is "
                 "refused.")
    lines += ["Routing is causal: a token runs a recursion step only if it ran the step before and its router says "
              "so (expert-choice), or if its chosen depth reaches it (token-choice); the KV cache holds a step's "
              "keys only for the tokens that ran the step. `tok.sp_model.decode(ids)` decodes exactly "
              "(`tok.decode` shows byte-fallback pieces as `<0x..>`).", "",
              "## Back to training", "",
              "`python -m pretrain.import_hf THIS_FOLDER runs/NAME data.path=DATA` writes a checkpoint that "
              "`python -m pretrain.train runs/NAME/run.yaml` resumes (weights and step; the optimizer state "
              "starts fresh).", ""]
    return "\n".join(lines)

