"""Import an exported Hugging Face folder as a checkpoint to train on: ``python -m pretrain.import_hf HF_DIR RUN_DIR``.

HF_DIR is a folder written by ``python -m pretrain.export`` (config.json, model.safetensors, mor_run.json, and the
tokenizer). RUN_DIR becomes a run folder holding one checkpoint, RUN_DIR/checkpoints/step-N, in the trainer's own
format (DeepSpeed files, trainer.pt, the checksummed record, ``latest``), and RUN_DIR/run.yaml, the run's config.
Continue training with

    python -m pretrain.train RUN_DIR/run.yaml [key=value ...]

The run config: --run RUN_FILE (conf/run/NAME or a path) with the key=value overrides given here, else the config
of the run that was exported (mor_run.json), else the defaults; its model is always the export's (config.json),
out_dir and name point at RUN_DIR. data.path must name data tokenized with the export's tokenizer (it is checked):
the checkpoint records the data loader's starting position there.

What the checkpoint holds: the weights, and the step and token count of the export (--step to choose another).
The optimizer state starts fresh — AdamW's moment estimates at zero and its step count at 0 — and the data loader
at the start of its first epoch: the export does not carry them. The checkpoint's layout is the run config's
(parallel.*): run this command as one process (a one-process checkpoint) or under torchrun with the run's process
count (each rank loads its tensor-parallel shard and pipeline stage); the trainer resumes it under any layout
(pretrain/checkpoint/reshard.py).

RUN_DIR must be new or empty, outside every other run folder and outside HF_DIR (pretrain/training/outdir.py).
Needs safetensors (the ``hf`` extra: pip install -e '.[hf]'). Exit status: 0 done; 2 a mistake (not an export, a
RUN_DIR that is not empty or lies in a run, data tokenized with another tokenizer), said in one line on stderr.
"""
from __future__ import annotations

import argparse
import functools
import dataclasses
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from conf.errors import ConfigError, one_line
from pretrain.training.outdir import RUN_FILE, check_place

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")

# model keys that change no weight: the kernel a machine can run, the token-choice implementation, the loss's chunks
_MODEL_FREE = ("model.attention_backend", "model.tc_compact", "model.loss_chunk")


def read_model_config(hf_dir: Path):
    """The training ModelConfig of an export's config.json. ConfigError (one line) for anything else."""
    from conf import build_dataclass
    from model.config import ModelConfig, RouterConfig
    path = hf_dir / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{hf_dir}: no config.json; give a folder written by python -m pretrain.export") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot be read ({one_line(e, 120, name=False)})") from None
    if not isinstance(data, dict) or data.get("model_type") != "mor":
        got = data.get("model_type") if isinstance(data, dict) else None
        raise ConfigError(f"{path}: model_type is {got!r}, not 'mor'; give a folder written by "
                          "python -m pretrain.export")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in data.items() if k in names}
    router_names = {f.name for f in dataclasses.fields(RouterConfig)}
    fields["router"] = {k: v for k, v in (data.get("router") or {}).items() if k in router_names}
    return build_dataclass(ModelConfig, fields, where=str(path))


def read_record(hf_dir: Path) -> dict[str, Any]:
    """mor_run.json of an export ({} when absent)."""
    path = hf_dir / "mor_run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot be read ({one_line(e, 120, name=False)})") from None


def read_weights(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: no model.safetensors; give a folder written by python -m pretrain.export")
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise ConfigError(f"{path}: cannot be read ({one_line(e, 120)})") from None


def run_config(hf_dir: Path, run_dir: Path, model_cfg, record: dict[str, Any], run: Optional[str],
               overrides: list[str], say: Callable[[str], None]):
    """The RunConfig of the imported run (see the module docstring)."""
    import yaml

    from conf import config_to_dict, load_config, run_file
    from pretrain.config import RunConfig
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in ("name", "out_dir"):
            raise ConfigError(f"override {text!r}: {key} comes from RUN_DIR; leave it out")
        if key.startswith("model") and key not in _MODEL_FREE:
            raise ConfigError(f"override {text!r}: the model is the export's (config.json); only "
                              f"{', '.join(_MODEL_FREE)} may be set here")
    if run is not None:
        base = config_to_dict(load_config(run_file(run), [], schema=RunConfig))
        differ = sorted(k for k, v in config_to_dict(model_cfg).items() if base["model"].get(k) != v)
        if differ:
            say(f"note: {run}'s model differs from the export's in {', '.join(differ)}; the export's is used")
    elif isinstance(record.get("run"), dict):
        base = record["run"]
    else:
        base = config_to_dict(RunConfig())
    base = dict(base, model=config_to_dict(model_cfg), out_dir=str(run_dir.parent), name=run_dir.name)
    base["checkpoint"] = dict(base.get("checkpoint", {}), resume="auto")
    with tempfile.TemporaryDirectory(prefix="mor-import-") as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(base, sort_keys=False))
        return load_config(path, overrides, schema=RunConfig)


def load_weights(full: dict[str, Any], model, tp_rank: int = 0, tp_size: int = 1) -> None:
    """The TrainEngine's ``init``: the stage starts from ``full`` (a TP = PP = 1 state dict), each rank taking its
    tensor-parallel shard of the tensors its pipeline stage holds."""
    import torch

    from model.tp_shard import shard_state_dict
    shard = shard_state_dict(full, tp_rank, tp_size)
    own = model.state_dict()
    missing = [k for k, v in own.items() if torch.is_tensor(v) and k not in shard]
    if missing:
        raise ConfigError(f"model.safetensors lacks {len(missing)} tensor(s) of the model (e.g. {missing[0]}); "
                          "it does not match its own config.json")
    if tp_size == 1 and getattr(model, "pp_size", 1) == 1:
        extra = sorted(set(shard) - set(own))
        if extra:
            raise ConfigError(f"model.safetensors holds {len(extra)} tensor(s) the model has not (e.g. "
                              f"{extra[0]}); it does not match its own config.json")
    for k, v in own.items():
        if torch.is_tensor(v) and tuple(v.shape) != tuple(shard[k].shape):
            raise ConfigError(f"model.safetensors: {k} has shape {tuple(shard[k].shape)}, the model "
                              f"{tuple(v.shape)}; it does not match its own config.json")
    with torch.no_grad():
        model.load_state_dict({k: shard[k] if torch.is_tensor(v) else v for k, v in own.items()}, strict=True)


def import_export(hf_dir: Path, run_dir: Path, *, run: Optional[str] = None, overrides: Optional[list[str]] = None,
                  step: Optional[int] = None, say: Callable[[str], None] = lambda line: None) -> Path:
    """Write the checkpoint of the export at ``hf_dir`` into the run folder ``run_dir``; returns the checkpoint
    folder. Collective under torchrun. Raises ConfigError (one line) for every mistake, before anything is
    written."""
    from data_prep.shards import sha256_file
    from pretrain.export import OLD_TOKENIZER_FILE, TOKENIZER_FILE, require_hf
    require_hf(("safetensors",))
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir}: no such folder; give a folder written by python -m pretrain.export")
    model_cfg = read_model_config(hf_dir)
    check_place(run_dir, [hf_dir], what="RUN_DIR")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir}: exists and is not an empty folder; import into a new run folder")
    record = read_record(hf_dir)
    step = int(record.get("step", 0)) if step is None else step
    if step < 0:
        raise ConfigError(f"--step: must be >= 0, got {step}")
    cfg = run_config(hf_dir, run_dir, model_cfg, record, run, list(overrides or []), say)
    from conf import config_to_dict, dump_yaml
    from conf.files import atomic_write_text
    from pretrain.data.loader import load_manifest
    from pretrain.data.splits import split_loader
    from pretrain.checkpoint.checkpointer import Checkpointer
    from pretrain.checkpoint.state import TrainerState
    from pretrain.config import computes_in_bf16
    try:
        manifest = load_manifest(Path(cfg.data.primary_path))   # a mixture's sources share one tokenizer
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.path: {e}") from None
    # the tokenizer under its file name, or under the name earlier exports gave it
    tok = next((hf_dir / n for n in (TOKENIZER_FILE, OLD_TOKENIZER_FILE) if (hf_dir / n).is_file()),
               hf_dir / TOKENIZER_FILE)
    want = manifest.tokenizer.get("sha256")
    if tok.is_file() and sha256_file(tok) != want:
        raise ConfigError(f"data.path: {cfg.data.primary_path} was tokenized with another tokenizer than the export's "
                          f"({tok}); the model reads that tokenizer's ids: give data made with it")
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.path: its tokenizer has {manifest.vocab_size} pieces, more than the model's "
                          f"vocabulary ({cfg.model.vocab_size})")
    full = read_weights(hf_dir)

    from megatron.core import parallel_state as ps

    from pretrain.parallel.engine import TrainEngine
    from pretrain.parallel.layout import init_distributed
    layout = init_distributed(cfg.parallel, cfg.model)
    engine = TrainEngine(cfg, layout, bf16=computes_in_bf16(cfg.train.precision, layout.device),
                    init=functools.partial(load_weights, full))
    loader = split_loader(cfg, "train", dp_rank=ps.get_data_parallel_rank(), dp_size=layout.dp)
    state = TrainerState(step=step, tokens=int(record.get("tokens", 0)), config=config_to_dict(cfg),
                         tokenizer_sha256=want, world_size=layout.world, imported_from=str(hf_dir.resolve()))
    checkpoints = Checkpointer(cfg, layout, run_dir, tokenizer_sha256=want, log=say)
    folder = checkpoints.save(engine, state, loader.state_dict())
    if layout.rank == 0:
        atomic_write_text(run_dir / RUN_FILE, dump_yaml(cfg))
        say(f"imported {hf_dir} as {folder} (step {step}; the optimizer state starts fresh). Continue with: "
            f"python -m pretrain.train {run_dir / RUN_FILE}")
    return folder


def _parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m pretrain.import_hf", description=doc[0],
                                epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", metavar="HF_DIR", type=Path, help="a folder written by python -m pretrain.export")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run folder to create (new or empty)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run config overrides, e.g. data.path=DATA")
    p.add_argument("--run", metavar="RUN_FILE", help="a run file (conf/run/NAME or a path) for the run config")
    p.add_argument("--step", type=int, help="the step to record (default: the exported checkpoint's)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from conf import cli_errors
    with cli_errors():
        import_export(args.hf_dir, args.run_dir, run=args.run, overrides=args.overrides, step=args.step,
                      say=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
