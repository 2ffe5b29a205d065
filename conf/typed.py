"""Turning a located tree into the caller's dataclasses: strict types (no bool for an int, no silent coercion), and
``validate()`` errors traced back to the file and line, or override, that set the key."""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

from conf.errors import ConfigError
from conf.tree import Tree, describe, one_line, plain_to_tree, suggest, tree_to_plain


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(tp) or tp is dict or origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class Builder:
    """Turns a located tree into dataclasses; keeps the root so validate() errors can be traced to a source."""

    def __init__(self, root: Tree, top_file: str) -> None:
        self.root, self.top_file = root, top_file

    def where_of(self, dotted: str) -> str:
        """Where a dotted key was set; the top file when it was left at its default. A key may itself hold dots
        (``grid: {optim.lr: [...]}``), and inside a list the list's own place is the best there is."""
        parts = re.sub(r"\[\d+\]", "", dotted).split(".")

        def walk(node: Any, i: int, where: str) -> str:
            if i == len(parts) or not isinstance(node, dict):
                return where
            for j in range(len(parts), i, -1):  # the longest key first: "optim.lr" before "optim"
                name = ".".join(parts[i:j])
                if name in node:
                    return walk(node[name].value, j, node[name].where)
            return self.top_file

        return walk(self.root, 0, self.top_file)

    def build(self, cls: type, tree: Tree, prefix: str, where: str) -> Any:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, entry in tree.items():
            if key not in fields:
                raise ConfigError(f"{entry.where}: {prefix}{key}: unknown key{suggest(key, list(fields))}")
            kwargs[key] = self.convert(hints[key], entry.value, f"{prefix}{key}", entry.where)
        for name, f in fields.items():
            if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: {prefix}{name}: missing required key")
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            try:
                validate()
            except ConfigError as e:
                # validate() names the offending key first ("key: message"); point at where that key was set.
                msg = str(e)
                m = re.match(r"([A-Za-z_][\w.]*(?:\[\d+\][\w.]*)*):\s*(.*)", msg, re.S)
                if m is None:
                    raise ConfigError(f"{where}: {one_line(msg)}") from None
                key = prefix + m.group(1)
                raise ConfigError(f"{self.where_of(key)}: {key}: {one_line(m.group(2))}") from None
        return obj

    def convert(self, tp: Any, value: Any, key: str, where: str) -> Any:
        def bad() -> ConfigError:
            return ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {describe(value)}")

        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:  # free-form (a sweep's overrides): any YAML value, checked by whoever reads it
            return tree_to_plain(value)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if not isinstance(value, dict):
                raise bad()
            return self.build(tp, value, f"{key}.", where)
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise bad()
            item = args[1] if args else Any
            return {k: self.convert(item, e.value, f"{key}.{k}", e.where) for k, e in value.items()}
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            if len(options) != 1:
                raise TypeError(f"{key}: unsupported annotation {tp} (only Optional[X] unions)")
            return self.convert(options[0], value, key, where)
        if origin is Literal:
            # type() check too: True == 1 must not satisfy Literal[1], nor 1 satisfy Literal[True].
            if any(value == a and type(value) is type(a) for a in args):
                return value
            close = difflib.get_close_matches(value, [str(a) for a in args], n=1) if isinstance(value, str) else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {key}: expected {_type_name(tp)}, got {describe(value)}{hint}")
        if tp is list or origin is list:
            if not isinstance(value, list):
                raise bad()
            # Lists are leaves of the tree, so mappings inside them are plain dicts: give them the list's location.
            item = args[0] if args else Any
            return [self.convert(item, plain_to_tree(v, where) if isinstance(v, dict) else v, f"{key}[{i}]",
                                 where) for i, v in enumerate(value)]
        # Scalars. bool is a subclass of int in Python, but `n_layers: true` is a mistake, not 1.
        if tp is bool:
            ok = isinstance(value, bool)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif tp is float:
            if isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            ok = isinstance(value, float)
        elif tp is str:
            ok = isinstance(value, str)
        else:  # a schema bug, not a user mistake: fail loudly rather than let a value through unchecked
            raise TypeError(f"{key}: unsupported annotation {tp}")
        if not ok:
            raise bad()
        return value
