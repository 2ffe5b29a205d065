"""Every key of a run's config is classified for resume (pretrain/checkpoint/config_keys.py), found by walking the
dataclasses themselves — every field, recursively into nested dataclasses (ModelConfig's router, ...) — so a key
added anywhere in RunConfig fails here until someone decides what a resume may do with it."""
from __future__ import annotations

import dataclasses
import typing

from conf import config_to_dict, load_config
from pretrain.config import RunConfig
from pretrain.checkpoint import config_keys
from pretrain.checkpoint.resume import batch_change, config_mismatch, data_position_problem


def _dataclass_in(hint) -> type | None:
    """The dataclass a field's type names, also inside Optional[...] / X | None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _leaves(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        inner = _dataclass_in(hints[f.name])
        if typing.get_origin(hints[f.name]) in (dict, list):   # a mapping or list of records is one key
            inner = None
        out += _leaves(inner, f"{prefix}{f.name}.") if inner else [f"{prefix}{f.name}"]
    return out


def test_every_key_of_the_run_config_is_classified_and_none_is_stale():
    leaves = _leaves(RunConfig)
    assert "model.router.alpha" in leaves and "parallel.global_batch_size" in leaves   # the walk goes deep
    missing = [k for k in leaves if k not in config_keys.KEYS]
    assert not missing, f"classify these keys in pretrain/checkpoint/config_keys.py: {missing}"
    stale = sorted(set(config_keys.KEYS) - set(leaves))
    assert not stale, f"no longer keys of RunConfig: {stale}"
    assert all(config_keys.WHY[k] for k in leaves)
    # the walk and the saved form (config_to_dict, what trainer.pt holds) name the same keys
    flat = []

    def walk(d, p=""):
        for k, v in d.items():
            walk(v, f"{p}{k}.") if isinstance(v, dict) and v else flat.append(f"{p}{k}")
    walk(config_to_dict(RunConfig()))
    assert sorted(flat) == sorted(leaves)


def test_keys_that_decide_the_state_must_match_and_precision_is_a_layout_key():
    k = config_keys.kind
    assert k("train.precision") == config_keys.LAYOUT and k("parallel.zero_stage") == config_keys.LAYOUT
    for key in ("parallel.micro_batch_size", "data.seed", "model.d_model", "model.router.capacities",
                "optim.betas", "parallel.seed", "an.unknown.key"):
        assert k(key) == config_keys.MATCH, key
    assert k("parallel.global_batch_size") == config_keys.CHECKED and k("data.readers") == config_keys.CHECKED
    for key in ("train.steps", "optim.lr", "model.loss_chunk", "train.compile", "checkpoint.resume"):
        assert k(key) == config_keys.FREE, key


def test_config_mismatch_names_changed_match_keys_only():
    a = config_to_dict(load_config("conf/run/tiny_cpu.yaml", [], schema=RunConfig))
    b = config_to_dict(load_config("conf/run/tiny_cpu.yaml",
                                   ["train.precision=bf16", "parallel.zero_stage=2", "data.seed=3", "data.readers=4",
                                    "parallel.micro_batch_size=2", "train.steps=7", "model.loss_chunk=0"],
                                   schema=RunConfig))
    assert config_mismatch(a, b) == ["data.seed", "parallel.micro_batch_size"]
    # a key older checkpoints lack compares as the value every run then had
    del a["model"]["router"]["cap_warmup_step"]
    assert config_mismatch(a, b) == ["data.seed", "parallel.micro_batch_size"]


def test_a_changed_effective_batch_is_refused_unless_set_and_the_advice_is_possible():
    unset = {"micro_batch_size": 4, "global_batch_size": None}
    # 1 process → DP=2, unset: 4 → 8 refused; 4 cannot be reached by 4 × 2, so only accepting is offered
    old, new, why = batch_change(unset, 1, 4, None, 2)
    assert (old, new) == (4, 8) and "sequences per optimizer step" in why
    assert "parallel.global_batch_size=8 to accept" in why and "=4 to continue" not in why
    assert "data-parallel sizes that can: 1" in why
    # DP=2 → 1 process, unset: 8 → 4; both ways are possible
    old, new, why = batch_change(unset, 2, 4, None, 1)
    assert (old, new) == (8, 4)
    assert "parallel.global_batch_size=8 to continue exactly" in why and "parallel.global_batch_size=4" in why
    assert batch_change(unset, 2, 4, 8, 1)[2] is None          # set to the old batch: exact
    assert batch_change(unset, 2, 4, 4, 1)[2] is None          # set explicitly: the change is accepted
    assert batch_change({"micro_batch_size": 4, "global_batch_size": 8}, 1, 4, None, 2) == (8, 8, None)


def test_data_position_advice_names_only_layouts_that_can_read_it():
    assert data_position_problem(2, 0, 2, 0) is None and data_position_problem(4, 4, 2, 2) is None
    why = data_position_problem(2, 0, 1, 3)          # workers: 0 (read as 1) or 2 divide 2
    assert "in 2 readers" in why and why.endswith("set data.num_workers to 0 or 2")
    why = data_position_problem(1, 0, 2, 0)          # one reader cannot be shared by 2 ranks: no worker count helps
    assert "in 1 reader," in why and "divides 1: 1 " in why and "set data.num_workers" not in why
    why = data_position_problem(2, 3, 1, 0)          # data.readers set to another number: the order would change
    assert why.startswith("data.readers:") and "data.readers=2" in why
