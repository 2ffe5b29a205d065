"""In-loop downstream evaluation (pretrain/training/downstream.py): a real 2-process run (data-parallel, ZeRO-3)
logs the few-shot accuracies that ``pretrain.fewshot``'s one-process scorer gets from the same checkpoint, and
config mistakes are one line before anything trains.

The engine-level scores under PP = 2, TP = 2 and DP = 2 are compared with one process request by request in
tests/distributed/test_validation_layouts.py; here the whole path runs: the tokenizer, the package's tasks, the
callback, metrics.jsonl and the log line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conf import load_config
from conf.errors import ConfigError
from pretrain.config import RunConfig
from pretrain.eval.fewshot import evaluate
from pretrain.eval.tasks import load_task
from pretrain.checkpoint.consolidate import load
from pretrain.training.downstream import record
from tests.distributed.harness import spawn_ranks
from tests.pretrain.fixtures import make_shards, with_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RUN = "conf/run/tiny_cpu.yaml"
TASKS, LIMIT, VOCAB = ["arc_easy", "piqa", "lambada", "mmlu"], 3, 384


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic shards whose manifest names a real SentencePiece model (the tasks' text needs one)."""
    tmp = tmp_path_factory.mktemp("down")
    return with_tokenizer(make_shards(tmp / "data", vocab=VOCAB, seq_len=64), VOCAB)


def _args(tmp: Path, data: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", f"out_dir={tmp / 'runs'}", "name=down", f"model.vocab_size={VOCAB}",
            "model.max_seq_len=128", "train.steps=2", "train.eval_every=0", "checkpoint.every=0",
            "logging.wandb=disabled", "parallel.micro_batch_size=4", "eval.downstream_every=2",
            f"eval.downstream_limit={LIMIT}", f"eval.downstream_tasks=[{','.join(TASKS)}]",
            "eval.downstream_batch_size=4", *extra]


@pytest.mark.slow
def test_a_two_process_run_logs_what_the_one_process_scorer_gets(tmp_path, data):
    spawn_ranks(2, ["-m", "pretrain.train", RUN, *_args(tmp_path, data, "parallel.zero_stage=3")], tmp_path,
                timeout=600)
    run = tmp_path / "runs" / "down"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = [r for r in logged if "downstream_avg" in r]
    assert len(got) == 1 and got[0]["step"] == 2
    # the reference: the checkpoint saved at the end, merged into one process, scored through the KV cache
    import sentencepiece as spm
    model = load(run).model
    sp = spm.SentencePieceProcessor(model_file=str(data.parent / "tok.model"))
    results = evaluate(model, sp, sp.eos_id(), [load_task(t, 0, LIMIT) for t in TASKS], batch_size=5)
    want = {"step": 2, **record(results)}
    assert set(got[0]) == set(want) and want["downstream_items"] == LIMIT
    for key, value in want.items():
        assert got[0][key] == pytest.approx(value, abs=1e-9), key
    out = "".join(p.read_text() for p in tmp_path.glob("rank*.log"))
    assert "downstream avg" in out and "causal routing" in out


@pytest.mark.parametrize("override,message", [
    ("eval.downstream_tasks=[arc_easy,boolq]", "eval.downstream_tasks: unknown task 'boolq'"),
    ("eval.downstream_shots=3", "eval.downstream_shots: arc_easy comes with 0 or 5 shots, not 3"),
    ("eval.downstream_limit=0", "eval.downstream_limit: must be >= 1"),
    ("eval.downstream_every=-1", "eval.downstream_every: must be >= 0"),
])
def test_config_mistakes_are_one_line(tmp_path, data, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(RUN, [*_args(tmp_path, data), override], schema=RunConfig)


@pytest.mark.slow
def test_a_run_whose_tokenizer_is_missing_stops_before_training(tmp_path, data):
    folder = tmp_path / "data"
    make_shards(folder, vocab=VOCAB, seq_len=64)   # its manifest names the tokenizer "synthetic": no file
    code = spawn_ranks(1, ["-m", "pretrain.train", RUN, *_args(tmp_path, folder)], tmp_path, check=False,
                       timeout=300)
    log = "".join(p.read_text() for p in tmp_path.glob("rank*.log"))
    assert code == [2], log
    assert "eval.downstream_every: the data manifest" in log and "Traceback" not in log
    assert not (tmp_path / "runs" / "down" / "checkpoints").exists()
