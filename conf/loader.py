"""Load YAML configs (with ``inherit`` and ``key=value`` overrides) into validated, typed dataclasses.

Every key remembers where it was last set (``file:line`` or ``override 'k=v'``), so that every mistake, from an
unknown key to an impossible combination reported by ``validate()``, comes back as one line pointing at its source.

The loader knows no schema of its own: the caller passes the dataclass. A dataclass-typed key given as a string
names a file of the folder named like the key, ``model: 360m_mor_ec`` → ``conf/model/360m_mor_ec.yaml``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from conf.errors import ConfigError
from conf.tree import Entry, Tree, describe, display, one_line, plain_to_tree
from conf.typed import Builder

CONF_DIR = Path(__file__).resolve().parent
PRESET_DIR = CONF_DIR / "model"   # where a bare name given to load_config is looked up
RUN_DIR = CONF_DIR / "run"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (PyYAML follows YAML 1.1, which needs a dot: ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


# ---- reading files ------------------------------------------------------------------------------------------
def _tree_from_node(loader: _Loader, node: yaml.MappingNode, fname: str, prefix: str) -> Tree:
    # Merge keys (<<: *anchor) are expanded in place first so their lines point at the anchor's definition.
    loader.flatten_mapping(node)
    tree: Tree = {}
    for key_node, value_node in node.value:
        where = f"{fname}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{where}: {prefix or 'top level'}: mapping keys must be plain names")
        key = key_node.value
        # safe_load would silently keep the last of two equal keys; that is almost always an editing slip.
        if key in tree:
            raise ConfigError(f"{where}: {prefix}{key}: duplicate key (first set at {tree[key].where})")
        if isinstance(value_node, yaml.MappingNode):
            tree[key] = Entry(_tree_from_node(loader, value_node, fname, f"{prefix}{key}."), where)
        else:
            tree[key] = Entry(loader.construct_object(value_node, deep=True), where)
    return tree


def _read_yaml(path: Path) -> Tree:
    fname = display(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{fname}: cannot read config: {e.strerror or e}") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # empty file
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{fname}:{node.start_mark.line + 1}: top level must be a mapping of keys")
        return _tree_from_node(loader, node, fname, "")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{fname}{line}: invalid YAML: {one_line(getattr(e, 'problem', None) or e)}") from None
    finally:
        loader.dispose()


def _merge(base: Tree, top: Tree) -> Tree:
    """Deep merge: ``top`` wins; mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, entry in top.items():
        old = out.get(key)
        if old is not None and isinstance(old.value, dict) and isinstance(entry.value, dict):
            out[key] = Entry(_merge(old.value, entry.value), entry.where)
        else:
            out[key] = entry
    return out


def _load_file(path: Path, stack: tuple[Path, ...] = ()) -> Tree:
    path = path.resolve()
    tree = _read_yaml(path)
    inherit = tree.pop("inherit", None)
    if inherit is None:
        return tree
    parents = inherit.value if isinstance(inherit.value, list) else [inherit.value]
    if not parents or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(f"{inherit.where}: inherit: expected a file name or a list of names, "
                          f"got {describe(inherit.value)}")
    merged: Tree = {}
    for parent in parents:  # later parents win over earlier ones, the file itself over all of them
        ppath = (path.parent / parent).resolve()
        if ppath == path or ppath in stack:
            chain = " -> ".join(display(p) for p in (*stack, path, ppath))
            raise ConfigError(f"{inherit.where}: inherit: cycle {chain}")
        if not ppath.is_file():
            raise ConfigError(f"{inherit.where}: inherit: file not found: {display(ppath)}")
        merged = _merge(merged, _load_file(ppath, (*stack, path)))
    return _merge(merged, tree)


def _names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def list_presets() -> list[str]:
    return _names(PRESET_DIR)


def _looks_like_path(path_or_name: str | os.PathLike[str]) -> bool:
    text = os.fspath(path_or_name)
    return isinstance(path_or_name, os.PathLike) or "/" in text or os.sep in text or text.endswith((".yaml", ".yml"))


def _resolve(path_or_name: str | os.PathLike[str], folder: Path = PRESET_DIR) -> Path:
    text = os.fspath(path_or_name)
    # Anything that looks like a path is one; a bare word is a preset under ``folder`` (conf/model/ by default).
    if _looks_like_path(path_or_name):
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{text}: config file not found")
        return path
    path = folder / f"{text}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(text, _names(folder), n=5, cutoff=0.0)
        raise ConfigError(f"unknown preset {text!r}; closest: {', '.join(close) or '(none)'} "
                          f"(presets live in {display(folder)}/)")
    return path


def run_file(name_or_path: str | os.PathLike[str]) -> Path:
    """The run file a command line names: ``tiny_cpu`` is conf/run/tiny_cpu.yaml, anything that looks like a path
    is that path. An unknown name is one line listing the known runs."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{os.fspath(name_or_path)}: run file not found")
        return path
    path = RUN_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown run {name_or_path!r}; known runs: {', '.join(_names(RUN_DIR)) or '(none)'} "
                          f"(run files live in {display(RUN_DIR)}/; or give a path)")
    return path


def _expand_presets(tree: Tree, schema: type, base: Path) -> Tree:
    """A dataclass-typed key given as a string names a config to load there: ``model: 360m_mor_ec`` (a file of the
    folder named like the key, conf/model/) or ``model: ../model/my.yaml`` (a file, relative to the including
    file). Where conf/ has no such folder the string is left for the builder to reject as a non-mapping."""
    hints = typing.get_type_hints(schema)
    out = dict(tree)
    for key, entry in tree.items():
        tp = hints.get(key)
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            continue
        if isinstance(entry.value, str):
            text, folder = entry.value, CONF_DIR / key
            looks_like_path = "/" in text or text.endswith((".yaml", ".yml"))
            if not looks_like_path and not folder.is_dir():
                continue
            target = (base / text) if looks_like_path and not Path(text).is_absolute() else text
            try:
                out[key] = Entry(_expand_presets(_load_file(_resolve(target, folder)), tp, base), entry.where)
            except ConfigError as e:
                raise ConfigError(f"{entry.where}: {key}: {one_line(str(e))}") from None
        elif isinstance(entry.value, dict):
            out[key] = Entry(_expand_presets(entry.value, tp, base), entry.where)
    return out


# ---- overrides ----------------------------------------------------------------------------------------------
def _apply_override(tree: Tree, text: str) -> Tree:
    where = f"override {text!r}"
    key, eq, raw = text.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError(f"{where}: malformed override, expected key=value (e.g. router.alpha=0.2)")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: value is not valid YAML: {one_line(getattr(e, 'problem', None) or e)}") from None
    # Build {a: {b: value}} and merge it like one more inherited layer, so an override of a mapping merges too.
    leaf = Entry(plain_to_tree(value, where) if isinstance(value, dict) else value, where)
    for part in reversed(parts[1:]):
        leaf = Entry({part: leaf}, where)
    return _merge(tree, {parts[0]: leaf})


# ---- public API ---------------------------------------------------------------------------------------------
def load_config(path_or_name: str | os.PathLike[str], overrides: Sequence[str] = (), *, schema: type,
                section: str | None = None) -> Any:
    """Load a YAML file or preset name, apply ``key=value`` overrides, and return a validated ``schema`` (the
    caller's dataclass, e.g. model.config.ModelConfig or pretrain.config.RunConfig: conf/ knows none of them).

    With ``section``, a top-level mapping under that key (e.g. ``model:`` in a run config) is used when present;
    override keys are then relative to it. Raises ConfigError with a one-line, located message.
    """
    if isinstance(overrides, str):  # a lone "k=v" would otherwise be split into characters
        overrides = [overrides]
    path = _resolve(path_or_name)
    tree = _load_file(path)
    if section is not None and section in tree:
        entry = tree[section]
        if not isinstance(entry.value, dict):
            raise ConfigError(f"{entry.where}: {section}: expected mapping, got {describe(entry.value)}")
        tree = entry.value
    base = path.resolve().parent
    tree = _expand_presets(tree, schema, base)
    for text in overrides:
        tree = _apply_override(tree, text)
        tree = _expand_presets(tree, schema, base)  # an override may name a preset: model=360m_vanilla
    top = display(path.resolve())
    return Builder(tree, top).build(schema, tree, "", top)


def build_dataclass(schema: type, values: dict[str, Any], where: str = "<dict>") -> Any:
    """A validated ``schema`` from a plain nested dict (e.g. one saved with ``config_to_dict``)."""
    tree = plain_to_tree(values, where)
    return Builder(tree, where).build(schema, tree, "", where)


def config_to_dict(obj: Any) -> Any:
    """Plain nested dicts/lists/scalars of a config dataclass (only constructor fields, so it loads back)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    # Field order kept; short lists inline (capacities: [1.0, 0.5]).
    return yaml.safe_dump(config_to_dict(obj), sort_keys=False, default_flow_style=None)


@contextlib.contextmanager
def cli_errors(*, rank0: bool = True) -> Iterator[None]:
    """For entry points (``with cli_errors():`` or ``@cli_errors()``): a ConfigError becomes
    ``error: <message>`` on stderr and exit status 2, the usual status for a usage error, without a traceback.
    ``rank0`` False (a distributed launch's other ranks): an error every rank finds (``every_rank``) exits 2
    without a word, since rank 0 says it."""
    try:
        yield
    except ConfigError as e:
        if rank0 or not e.every_rank:
            print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def split_cli(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split command-line words into (overrides, others).

    An override is a word containing ``=`` that is not an option (does not start with ``-``). Malformed ones such
    as ``=3`` are still returned as overrides so that load_config reports them rather than silently dropping them.
    """
    is_override = [("=" in w and not w.startswith("-")) for w in argv]
    return [w for w, o in zip(argv, is_override) if o], [w for w, o in zip(argv, is_override) if not o]
