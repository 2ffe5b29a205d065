"""``python -m pretrain.generate`` and pretrain/checkpoint/consolidate.py.

Loading: checkpoints saved by real 2-process runs (tests/pretrain/generate_worker.py: the Trainer, DeepSpeed and
the checkpoint code as they run) under TP = 2, ZeRO-2, ZeRO-3 (fp32 and bf16), TP = 2 × ZeRO-3 and PP = 2 (ZeRO-0
and ZeRO-1) load into one process with every weight and buffer equal to the trained parallel model's, and give
its logits (its loss, through a pipeline) to 1e-5.

The command: --help, one-line errors (exit 2, no traceback), deterministic greedy text that streams, repeatable
seeded sampling; on a tiny run trained here on the sample corpus with a real SentencePiece tokenizer.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.verify import CheckpointError
from pretrain.checkpoint.consolidate import load
from tests.distributed.harness import ROOT, library_chatter, spawn_ranks
from tests.pretrain.fixtures import make_shards

RUN = "conf/run/tiny_cpu.yaml"
TIMEOUT = 900   # generous: the machine may be busy; nothing here is timed
STEPS = 3       # after 2, the loss-free bias of the token-choice runs happens to be back at 0


def _common(tmp: Path, data: Path, name: str) -> list[str]:
    return [f"data.path={data}", f"out_dir={tmp / 'runs'}", f"name={name}", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_every=0", "checkpoint.every=0", "logging.wandb=disabled", "model.max_seq_len=64",
            "data.num_workers=0", "parallel.micro_batch_size=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "data")


def train_layout(tmp: Path, data: Path, name: str, layout: list[str]) -> tuple[dict, Path]:
    """A real 2-process run of ``layout``; (what the trained parallel model computed, the run folder)."""
    args = ["-m", "tests.pretrain.generate_worker", str(tmp), RUN, *_common(tmp, data, name), *layout]
    spawn_ranks(2, args, tmp, timeout=TIMEOUT)
    return torch.load(tmp / "reference.pt"), tmp / "runs" / name


def assert_same_model(ref: dict, run_dir: Path, *, bf16: bool = False) -> None:
    """``bf16``: the run computed in bf16; the loaded model computes in bf16 too (its weights are bf16 values)."""
    got = load(run_dir)
    assert not got.warnings
    assert got.info.path == run_dir / "checkpoints" / f"step-{STEPS:06d}"
    state = {k: v for k, v in got.model.state_dict().items() if torch.is_tensor(v)}
    assert set(state) == set(ref["weights"])
    for name, w in ref["weights"].items():
        assert state[name].dtype == w.dtype and torch.equal(state[name], w), name
    with torch.no_grad():
        if "logits" in ref:
            logits = got.model.to(torch.bfloat16 if bf16 else torch.float32)(ref["tokens"]).logits.float()
            torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
        else:
            loss = got.model(ref["tokens"], ref["labels"]).lm_loss
            torch.testing.assert_close(loss, ref["lm_loss"], rtol=1e-5, atol=1e-6)


TC = ["model=tiny_mor_tc", "model.router.balance=loss_free"]   # token-choice: a bias_steps buffer that moves
EC = ["model=tiny_mor_ec"]                                       # expert-choice, tied embedding
PP = EC + ["parallel.pipeline_parallel=2"]   # a shared layer and the tied embedding on both stages: replicas
LAYOUTS = {
    "tp2": TC + ["parallel.tensor_parallel=2", "parallel.zero_stage=0"],
    "dp2-zero3": TC + ["parallel.zero_stage=3"],
    # ZeRO-3 keeps fp32 masters only: they load rounded to bf16, the weights the run's forward passes used
    "dp2-zero3-bf16": TC + ["parallel.zero_stage=3", "train.precision=bf16"],
    "tp2-zero3": EC + ["parallel.tensor_parallel=2", "parallel.zero_stage=3"],
    "dp2-zero2": EC + ["parallel.zero_stage=2"],
    "pp2": PP + ["parallel.zero_stage=0"],
    "pp2-zero1": PP + ["parallel.zero_stage=1"],
}
# pp2-zero1 also proves the replicas stay equal under ZeRO-1 (they parted when synced after DeepSpeed's wrap)
@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_checkpoint_of_any_layout_loads_as_the_parallel_model_ran(tmp_path, data, name):
    ref, run_dir = train_layout(tmp_path, data, name, LAYOUTS[name])
    if "model=tiny_mor_tc" in LAYOUTS[name]:   # the buffer must have moved, or a skipped buffer would pass unseen
        assert ref["weights"]["router.bias_steps"].abs().sum() > 0
    assert_same_model(ref, run_dir, bf16="train.precision=bf16" in LAYOUTS[name])
    if name == "pp2":
        folder = run_dir / "checkpoints" / f"step-{STEPS:06d}"
        assert len({p.parent for p in folder.rglob("*_model_states.pt")}) == 2
        assert_stages_in_one_folder_are_refused(folder, tmp_path / "one-folder")
        assert_diverged_replicas_are_reported(folder)


def assert_stages_in_one_folder_are_refused(folder: Path, copy: Path) -> None:
    """Pipeline stages that saved into one folder (as the engine did before it gave each stage its own) have
    overwritten each other's files: refused in one line, before any weight is read."""
    from pretrain.checkpoint.consolidate import full_state_dict, read_run
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*_states.pt"))
    for f in sorted(folder.rglob("*_states.pt")):            # stage by stage: the last one's files win
        (copy / "engine").mkdir(exist_ok=True)
        shutil.copy(f, copy / "engine" / f.name)
    with pytest.raises(CheckpointError) as e:
        full_state_dict(copy, read_run(copy)[0])
    msg = str(e.value)
    assert "\n" not in msg and "pipeline_parallel=2" in msg and "overwriting each other" in msg, msg


def assert_diverged_replicas_are_reported(folder: Path) -> None:
    """A replica that differs between stages (the pipeline keeps them equal) is named in a warning."""
    from pretrain.checkpoint.consolidate import full_state_dict, read_run
    last = sorted(folder.rglob("mp_rank_00_model_states.pt"))[-1]     # the last stage's file
    saved = torch.load(last, weights_only=False)
    shared = next(n for n in saved["module"] if n.startswith("layers.") and n.endswith("qkv.weight"))
    saved["module"][shared] = saved["module"][shared] + 0.5
    torch.save(saved, last)
    _, _, warnings = full_state_dict(folder, read_run(folder)[0])
    assert len(warnings) == 1 and shared in warnings[0] and "0.5" in warnings[0], warnings


# ---- the command, on a tiny run with a real tokenizer ----------------------------------------------------------------
def _corpus_lines(n: int) -> list[str]:
    with gzip.open(ROOT / "data_prep" / "corpus" / "sotu-1900-2021.jsonl.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(5), f)]
    return [s for d in docs for s in d.split(". ") if s.strip()][:n]   # sentences: SentencePiece skips long lines


def _tokenizer(path: Path, vocab: int, lines: list[str]) -> Path:
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
                                   vocab_size=vocab, model_type="bpe", minloglevel=2)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A tiny MoR trained for a few steps on the sample corpus (checkpoints at steps 2 and 4), its tokenizer, and
    two tokenizers that are not the run's (one with more pieces than the model's vocabulary)."""
    tmp = tmp_path_factory.mktemp("gen")
    subprocess.run([sys.executable, str(ROOT / "data_prep" / "tokenize.py"), str(ROOT / "data_prep" / "corpus"),
                    "--out", str(tmp / "data"), "--train-tokenizer", str(tmp / "tok.model"), "--vocab-size", "512",
                    "--seq-len", "64", "--val-fraction", "0.05"], check=True, capture_output=True, timeout=TIMEOUT)
    args = [f"data.path={tmp / 'data'}", f"out_dir={tmp / 'runs'}", "name=tiny", "model.vocab_size=512",
            "model.max_seq_len=64", "train.steps=4", "train.eval_every=0", "checkpoint.every=2",
            "logging.wandb=disabled", "parallel.micro_batch_size=4"]
    spawn_ranks(1, ["-m", "pretrain.train", RUN, *args], tmp, timeout=TIMEOUT)
    lines = _corpus_lines(2000)
    return {"run": tmp / "runs" / "tiny", "other": _tokenizer(tmp / "other.model", 300, lines),
            "bigger": _tokenizer(tmp / "bigger.model", 600, lines)}


class Writes(io.StringIO):
    """stdout that remembers every write, and that it was flushed after it."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []
        self.flushed: list[int] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)

    def flush(self) -> None:
        self.flushed.append(len(self.writes))


def generate(*argv: str) -> tuple[int, Writes, str]:
    """``python -m pretrain.generate ARGV`` in this process: (exit code, stdout, stderr)."""
    from pretrain.serve.generate import main
    out, err = Writes(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out, err.getvalue()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """The real command, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "pretrain.generate", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_explains_every_option_with_an_example():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for option in ("--prompt", "--prompts-file", "--max-new-tokens", "--temperature", "--greedy", "--top-k",
                   "--top-p", "--seed", "--tokenizer", "--device", "--dtype", "RUN_OR_CHECKPOINT"):
        assert option in out.stdout, option
    assert "python -m pretrain.generate runs/" in out.stdout and "Exit status" in out.stdout


@pytest.mark.slow
def test_a_missing_checkpoint_is_one_line_and_exit_2_from_the_real_command(tmp_path):
    out = _cli(str(tmp_path / "no-such-run"), "--prompt", "Hello")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "no-such-run" in out.stderr, out.stderr
    assert out.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "empty-folder", "damaged", "other-tokenizer", "bigger-tokenizer",
                                  "empty-prompt", "blank-prompts-file", "top-p", "temperature",
                                  "greedy-and-temperature", "max-new-tokens"])
def test_mistakes_are_one_line_and_exit_2(run, tmp_path, case):
    good = [str(run["run"]), "--prompt", "The state of our Union is"]
    if case == "damaged":       # a copy of the run where every checkpoint has a truncated file
        good[0] = str(damaged_copy(run["run"], tmp_path / "copy", "step-000002", "step-000004"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n")
    argv, expect = {
        "missing": ([str(tmp_path / "nope"), "--prompt", "x"], "no such file or folder"),
        "empty-folder": ([str(tmp_path / "empty"), "--prompt", "x"], "no checkpoint there"),
        "damaged": (good, "truncated"),
        "other-tokenizer": (good + ["--tokenizer", str(run["other"])], "differs from the run's tokenizer"),
        "bigger-tokenizer": (good + ["--tokenizer", str(run["bigger"])], "more than the model's vocabulary (512)"),
        "empty-prompt": ([str(run["run"]), "--prompt", "  "], "prompt 1 is empty"),
        "blank-prompts-file": ([str(run["run"]), "--prompts-file", str(tmp_path / "blank.txt")], "holds no prompt"),
        "top-p": (good + ["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        "temperature": (good + ["--temperature", "-1"], "--temperature: must be >= 0"),
        "greedy-and-temperature": (good + ["--greedy", "--temperature", "0.7"], "disagree"),
        "max-new-tokens": (good + ["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    }[case]
    code, out, err = generate(*argv)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert out.getvalue() == ""


def damaged_copy(run_dir: Path, copy: Path, *steps: str) -> Path:
    """A copy of ``run_dir`` whose checkpoints ``steps`` each have their model file cut to 100 bytes."""
    shutil.copytree(run_dir, copy)
    for step in steps:
        victim = next((copy / "checkpoints" / step).rglob("*_model_states.pt"))
        victim.write_bytes(victim.read_bytes()[:100])
    return copy


def test_a_damaged_newest_checkpoint_is_passed_over_and_left_in_place(run, tmp_path):
    copy = damaged_copy(run["run"], tmp_path / "copy", "step-000004")
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    code, out, err = generate(str(copy), "--prompt", "The people", "--greedy", "--max-new-tokens", "4")
    assert code == 0, err
    assert "step-000004/engine/mp_rank_00_model_states.pt: 100 bytes" in err and "passing over it" in err, err
    assert "loaded " + str(copy / "checkpoints" / "step-000002") in err, err
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before   # nothing renamed or set aside
    assert out.getvalue().startswith("The people")


def test_greedy_text_is_deterministic_and_streams(run):
    prompt = "The state of our Union is"
    first = generate(str(run["run"]), "--prompt", prompt, "--greedy", "--max-new-tokens", "12")
    second = generate(str(run["run"]), "--prompt", prompt, "--greedy", "--max-new-tokens", "12")
    assert first[0] == second[0] == 0, first[2]
    assert first[1].getvalue() == second[1].getvalue()
    writes = first[1].writes
    assert writes[0] == prompt and writes[-1] == "\n"
    pieces = [w for w in writes[1:-1] if w]
    # the continuation came piece by piece, each flushed as it came, and adds up to the text generated
    assert len(pieces) >= 2 and first[1].flushed[:len(writes) - 1] == list(range(1, len(writes)))
    from model.inference import Sampling
    from pretrain.serve.generate import complete, open_generator
    gen = open_generator(run["run"])
    assert "".join(pieces) == complete(gen, [prompt], 12, Sampling(temperature=0.0))[0]
    assert "step-000004" in first[2] and "tokenizer" in first[2] and not library_chatter(first[2])


@pytest.mark.slow
def test_a_seed_makes_sampling_repeatable(run):
    argv = [str(run["run"]), "--prompt", "The people", "--prompt", "Congress", "--temperature", "1.0",
            "--top-k", "100", "--top-p", "0.95", "--max-new-tokens", "16"]
    a, b, c = (generate(*argv, "--seed", seed)[1].getvalue() for seed in ("7", "7", "8"))
    assert a == b and a != c
    # each completion whole, after its number and prompt (a sampled byte piece may be a newline: no splitlines)
    assert re.match(r"\[[12]\] ", a) and a.endswith("\n") and a.count("\n[") >= 1
    assert re.search(r"(^|\n)\[1\] The people", a) and re.search(r"(^|\n)\[2\] Congress", a)


@pytest.mark.parametrize("option,value,expect", [
    ("--temperature", "nan", "--temperature: must be >= 0 and finite (0: greedy), got nan"),
    ("--temperature", "inf", "--temperature: must be >= 0 and finite (0: greedy), got inf"),
    ("--temperature", "-0.5", "--temperature: must be >= 0 and finite"),
    ("--top-p", "nan", "--top-p: must be in (0, 1], got nan"),
    ("--top-p", "inf", "--top-p: must be in (0, 1], got inf"),
    ("--top-p", "0", "--top-p: must be in (0, 1], got 0.0"),
    ("--top-k", "-1", "--top-k: must be a whole number >= 0"),
    ("--seed", str(2**64), "--seed: must be a whole number in [-2**63, 2**64)"),
], ids=["temperature-nan", "temperature-inf", "temperature-negative", "top-p-nan", "top-p-inf", "top-p-zero",
        "top-k-negative", "seed-too-large"])
def test_a_bad_sampling_value_is_one_line_before_anything_loads(tmp_path, option, value, expect):
    # The run folder does not exist: the sampling values are checked first, so the error is about them.
    code, out, err = generate(str(tmp_path / "no-such-run"), "--prompt", "Hello", option, value)
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert "no-such-run" not in err and out.getvalue() == ""


@pytest.mark.parametrize("field,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                         ("temperature", -1.0), ("top_p", float("nan")), ("top_p", 1.5),
                                         ("top_k", -3), ("top_k", 2.5), ("seed", 2**64)])
def test_sampling_refuses_values_it_cannot_sample_with(field, value):
    from model.inference import Sampling
    with pytest.raises(ValueError, match=f"^{field} must be"):
        Sampling(**{field: value})


def test_a_tiny_temperature_samples_the_most_likely_token():
    """logits / 1e-40 overflow to ±inf in fp32 (a NaN softmax); sampling shifts the largest logit to 0 first."""
    from model.inference.sampling import Sampling, next_tokens
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 10
    assert torch.equal(next_tokens(logits, Sampling(temperature=1e-40, seed=0)), logits.argmax(dim=-1))
