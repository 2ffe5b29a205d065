"""The house has floors, and imports point down: conf/ at the bottom; model/ and data_prep/ on it, blind to each
other; pretrain/ on top, its rooms in order too (config, data and parallel low; training above them; train and
sweep above training; tools on top, imported by nobody). No two modules import each other.

Imports are read with ``ast`` from every .py file of the four packages — anywhere in the file (inside functions
and ``if TYPE_CHECKING:`` blocks too: a cycle there is still a cycle for the reader), relative ones resolved, and
``importlib.import_module("literal")`` counted as an import. Each failure names the file, the line and the arrow.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("conf", "model", "pretrain", "data_prep")
# What each package may import of the others (itself always).
MAY_IMPORT = {"conf": set(), "model": {"conf"}, "data_prep": {"conf"}, "pretrain": {"conf", "model", "data_prep"}}
# The rooms of pretrain/, low to high: a module may import its own floor and the floors below.
ROOMS = {"pretrain.config": 0, "pretrain.data": 0, "pretrain.parallel": 0, "pretrain.eval": 0, "pretrain.hf": 0,
         "pretrain.checkpoint": 1, "pretrain.training": 2, "pretrain.serve": 2, "pretrain.plan": 2,
         "pretrain.train": 3, "pretrain.sweep": 3, "pretrain.generate": 3, "pretrain.serve_bench": 3,
         "pretrain.plan_layout": 3,
         "pretrain.fewshot": 4, "pretrain.study": 4, "pretrain.export": 4, "pretrain.import_hf": 4, "pretrain.tools": 4}


@dataclass(frozen=True)
class Arrow:
    source: str   # importing module
    target: str   # imported module (or package)
    file: str     # the importing file, relative to the checkout
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.source} -> {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _resolve(name: str, known: set[str]) -> str:
    """A name as the module it is: ``pkg.mod.func`` (from an ``import_module`` string or ``from pkg.mod import
    func``) is ``pkg.mod``."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def imports_of(path: Path, known: set[str], text: str | None = None) -> list[Arrow]:
    """The arrows out of the file at ``path`` (or out of ``text``, as if it were that file)."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    rel = path.relative_to(ROOT).as_posix()
    out = []

    def add(target: str, node: ast.AST) -> None:
        if target.split(".")[0] in PACKAGES and target != source:
            out.append(Arrow(source, target, rel, node.lineno))

    text = path.read_text(encoding="utf-8") if text is None else text
    for node in ast.walk(ast.parse(text, filename=rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_resolve(alias.name, known), node)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import z: relative to this module's package
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod; `from mod import f`, mod
                add(_resolve(f"{base}.{alias.name}", known), node)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module",
                                                                                           "__import__")):
            add(_resolve(node.args[0].value, known), node)
    return sorted(out, key=lambda a: a.line)  # ast.walk goes breadth first; messages read better in file order


def all_arrows() -> list[Arrow]:
    files = source_files()
    known = {module_name(p) for p in files}
    return [a for p in files for a in imports_of(p, known)]


def room_of(module: str) -> str | None:
    return next((r for r in sorted(ROOMS, key=len, reverse=True) if module == r or module.startswith(r + ".")),
                None)


def package_violations(arrows: list[Arrow]) -> list[str]:
    bad = []
    for a in arrows:
        src, dst = a.source.split(".")[0], a.target.split(".")[0]
        if dst != src and dst not in MAY_IMPORT[src]:
            allowed = ", ".join(sorted(MAY_IMPORT[src])) or "nothing"
            bad.append(f"{a}: {src}/ may import {allowed} of the other packages, not {dst}/")
    return bad


def room_violations(arrows: list[Arrow], modules: set[str]) -> list[str]:
    bad = [f"{m.replace('.', '/')}: in no room of pretrain/; add it to ROOMS in {Path(__file__).name}"
           for m in sorted(modules) if m.startswith("pretrain.") and room_of(m) is None]
    for a in arrows:
        src, dst = room_of(a.source), room_of(a.target)
        if src is None or dst is None:  # outside pretrain/, or the bare `pretrain` package (a docstring)
            continue
        if ROOMS[dst] > ROOMS[src]:
            bad.append(f"{a}: {src} (floor {ROOMS[src]}) may not import {dst} (floor {ROOMS[dst]}); "
                       "move the shared piece down")
    return bad


def cycles(arrows: list[Arrow]) -> list[str]:
    first: dict[tuple[str, str], Arrow] = {}
    for a in arrows:
        first.setdefault((a.source, a.target), a)
    return [f"{a} and {first[(b, s)]}: these two modules import each other"
            for (s, b), a in sorted(first.items()) if s < b and (b, s) in first]


def test_packages_import_only_downwards():
    bad = package_violations(all_arrows())
    assert not bad, "\n".join(bad)


def test_pretrain_rooms_import_only_downwards():
    bad = room_violations(all_arrows(), {module_name(p) for p in source_files()})
    assert not bad, "\n".join(bad)


def test_no_two_modules_import_each_other():
    bad = cycles(all_arrows())
    assert not bad, "\n".join(bad)


# Serving, evaluation and export read a checkpoint's weights through pretrain/checkpoint, never through the training
# loop: of pretrain/training they may use the run folder's names (outdir) and its metrics reader only.
READ_WEIGHTS = ("pretrain.serve", "pretrain.generate", "pretrain.serve_bench", "pretrain.fewshot", "pretrain.eval",
                "pretrain.export", "pretrain.import_hf")
FROM_TRAINING = {"pretrain.training.outdir", "pretrain.training.metrics"}


def test_serving_and_export_load_weights_through_checkpoint_not_training():
    bad = [f"{a}: {room_of(a.source)} loads weights through pretrain/checkpoint; of pretrain/training it may use "
           f"{', '.join(sorted(FROM_TRAINING))} only" for a in all_arrows()
           if room_of(a.source) in READ_WEIGHTS and a.target.startswith("pretrain.training")
           and a.target not in FROM_TRAINING]
    assert not bad, "\n".join(bad)
    readers = {room_of(a.source) for a in all_arrows() if a.target.startswith("pretrain.checkpoint")}
    assert {"pretrain.serve", "pretrain.export", "pretrain.import_hf"} <= readers   # the rule is not vacuous


def test_the_scanner_sees_imports_anywhere():
    """Imports inside functions and TYPE_CHECKING blocks, relative and dynamic ones (a text, never written)."""
    probe = ROOT / "pretrain" / "training" / "_probe.py"
    text = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pretrain.sweep.plan import X\n"
            "def f():\n    from . import metrics\n    import importlib\n"
            "    importlib.import_module('pretrain.tools.plot')\n")
    known = {"pretrain.sweep.plan", "pretrain.training.metrics", "pretrain.tools.plot", "pretrain.training._probe"}
    arrows = imports_of(probe, known, text)
    assert [(a.target, a.line) for a in arrows] == [("pretrain.sweep.plan", 3), ("pretrain.training.metrics", 5),
                                                    ("pretrain.tools.plot", 7)]
    assert [m.split(": ")[0] for m in room_violations(arrows, set())] == ["pretrain/training/_probe.py:3",
                                                                         "pretrain/training/_probe.py:7"]


ROUTING_HOME = ("model/routing/", "model/config.py")


def test_routing_is_decided_in_one_place():
    """``grep -rn "routing ==" model pretrain``: which routing a model uses is asked in model/routing/ and
    model/config.py only; everyone else calls what those offer."""
    hits = []
    for pkg in ("model", "pretrain"):
        for path in sorted((ROOT / pkg).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if not path.is_file() or "__pycache__" in path.parts or rel.startswith(ROUTING_HOME):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if "routing ==" in line:
                    hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, "routing compared outside model/routing/ and model/config.py:\n" + "\n".join(hits)


@pytest.mark.parametrize("check", ["package", "room", "cycle"])
def test_each_rule_fails_on_a_planted_arrow(check):
    """A planted bad arrow (never written to disk) is caught, with file, line and arrow in the message."""
    arrows = all_arrows()
    planted = {"package": Arrow("conf.loader", "model.config", "conf/loader.py", 7),
               "room": Arrow("pretrain.training.metrics", "pretrain.tools.plot", "pretrain/training/metrics.py", 9),
               "cycle": Arrow("pretrain.sweep.results", "pretrain.sweep.plan", "pretrain/sweep/results.py", 11)}[check]
    extra = [planted]
    if check == "cycle":
        extra.append(Arrow("pretrain.sweep.plan", "pretrain.sweep.results", "pretrain/sweep/plan.py", 5))
    found = {"package": package_violations, "room": lambda a: room_violations(a, set()), "cycle": cycles}[check]
    msgs = found(arrows + extra)
    assert any(str(planted) in m for m in msgs), msgs
