"""The located tree the loader builds from YAML and overrides: every value remembers where it was set, and the
one-line message helpers that name it."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass
class Entry:
    value: Any  # a plain YAML value (lists are leaves), or a Tree for a mapping
    where: str  # "file:line" or "override 'k=v'": where this key was last set


Tree = dict[str, Entry]


def display(path: Path) -> str:
    """Path as the user would type it: relative to the working directory when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(options)})"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def plain_to_tree(value: dict[Any, Any], where: str) -> Tree:
    return {str(k): Entry(plain_to_tree(v, where) if isinstance(v, dict) else v, where) for k, v in value.items()}


def tree_to_plain(value: Any) -> Any:
    """A located tree (or a value holding one) back to plain dicts, for keys typed ``dict`` or ``Any``."""
    if isinstance(value, dict):
        return {k: tree_to_plain(e.value if isinstance(e, Entry) else e) for k, e in value.items()}
    if isinstance(value, list):
        return [tree_to_plain(v) for v in value]
    return value


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
