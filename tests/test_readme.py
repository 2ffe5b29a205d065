"""Every command in the fenced ```bash blocks of the README files and the docs/ pages works as written.

COMMANDS classifies each one, with the reason:
  RUN   it needs no GPU, no cluster, no data of the user's and little time on a 2-core CPU: it runs, in a scratch
        folder holding links to the checkout's conf/ and data_prep/ (so its relative paths work and what it writes
        stays out of the checkout); a training run gets a small step count through the option it already has.
        It must exit 0 and print no library chatter.
  HELP  it cannot run here: its program's --help must work and list every option the command uses, and its
        key=value overrides (and presets) must load.
  MAKE  `make -n TARGET` must show the target's command without running it.
A command added to a README or a docs/ page fails test_every_command_is_classified until it has a row here. The
front page keeps its two commands in its first screen, and every relative link of these pages leads to a file.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.distributed.harness import library_chatter

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "data_prep/README.md", "slurm/README.md",
        *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
RUN, HELP, MAKE = "run", "help", "make"
TIMEOUT = 900  # generous: the machine may be busy; nothing here is timed


def fenced_commands(doc: Path) -> list[str]:
    """The commands of a file's ```bash blocks: continuation lines joined, comments dropped, re-quoted."""
    out, in_bash, pending = [], False, ""
    for line in doc.read_text(encoding="utf-8").splitlines():
        fence = line.strip()
        if fence.startswith("```"):
            in_bash = fence == "```bash" and not in_bash
            continue
        if not in_bash:
            continue
        line = f"{pending} {line.strip()}" if pending else line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip()
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words:
            out.append(shlex.join(words))
    return out


# ---- checks of key=value overrides and presets, for commands that cannot run ----------------------------------
def _overrides(words: list[str]) -> list[str]:
    return [w for w in words if "=" in w and not w.startswith("-")]


def _train_config(words: list[str], env: dict) -> None:
    """pretrain.train RUN key=value...: the run file and overrides load (data need not exist to load)."""
    from conf import load_config, run_file
    from pretrain.config import RunConfig
    run = words[words.index("pretrain.train") + 1]
    load_config(run_file(run), _overrides(words), schema=RunConfig)


def _slurm_config(words: list[str], env: dict) -> None:
    """sbatch slurm/SCRIPT key=value...: the script's run file (MOR_RUN, else its default) takes the overrides."""
    from conf import load_config, run_file
    from pretrain.config import RunConfig
    script = ROOT / next(w for w in words if w.endswith(".sh"))
    default = re.search(r"^export MOR_RUN=\$\{MOR_RUN:-(\w+)\}$", script.read_text(), re.M).group(1)
    run = env.get("MOR_RUN", default)
    load_config(run_file(run), _overrides(words), schema=RunConfig)


def _presets(words: list[str], env: dict) -> None:
    """The bench's positional model presets exist and load."""
    from conf import load_config
    from model.config import ModelConfig
    module = words[words.index("-m") + 1]
    for w in words[words.index(module) + 1:]:
        if w.startswith("-"):
            break
        name, *overrides = w.split(",")   # model_bench: CONFIG[,key=value...]
        load_config(name, overrides, schema=ModelConfig)


@dataclass(frozen=True)
class Cmd:
    kind: str
    why: str
    shorter: tuple[str, ...] = ()                  # RUN: appended words that cut a long run short
    needs: Optional[str] = None                    # RUN: a command whose output this one reads, run first
    check: Optional[Callable[[list[str], dict], None]] = None   # HELP: loads its overrides / presets


DEMO = "python -m pretrain.tools.demo tiny_mor_tc --steps 100"
SEL_EARLY = ("python data_prep/select.py data_prep/corpus/sotu-1900-2021.jsonl.gz --where 'year<1960' "
             "--out runs/mix/raw/early.jsonl.gz")
SEL_LATE = ("python data_prep/select.py data_prep/corpus/sotu-1900-2021.jsonl.gz --where 'year>=1960' "
            "--out runs/mix/raw/late.jsonl.gz")
MIX_TOK = ("python data_prep/tokenize.py --corpus early=runs/mix/raw/early.jsonl.gz --corpus "
           "late=runs/mix/raw/late.jsonl.gz --weight late=2 --train-tokenizer runs/mix/tokenizer.model --vocab-size "
           "2048 --seq-len 128 --val-fraction 0.05 --samples-per-shard 256 --dedup exact --out runs/mix/data")
COMMANDS: dict[str, Cmd] = {
    "make demo": Cmd(MAKE, "builds .venv and trains for minutes"),
    "make test": Cmd(MAKE, "the whole suite, of which this test is a part"),
    "make test-fast": Cmd(MAKE, "the unit tier, of which this test is a part"),
    "python data_prep/tokenize.py data/raw/ --train-tokenizer data/tok.model --vocab-size 32000 --out data/shards":
        Cmd(HELP, "the user's raw text in data/raw/"),
    "python data_prep/tokenize.py 'dumps/*.jsonl.gz' --tokenizer tok.model --out data/shards --seq-len 2048":
        Cmd(HELP, "the user's dumps and tokenizer"),
    "python -m pretrain.train tiny_cpu data.path=runs/demo/data model.vocab_size=2048":
        Cmd(RUN, "the demo's shards, 300 steps cut to 3", shorter=("train.steps=3",), needs=DEMO),
    "torchrun --nproc-per-node 8 -m pretrain.train 360m_mor_ec data.path=/data/fineweb parallel.zero_stage=2":
        Cmd(HELP, "8 GPUs and a real data set", check=_train_config),
    "python -m pretrain.tools.plot runs/360m_mor_ec": Cmd(HELP, "a 360M run's metrics"),
    "python -m pretrain.tools.inspect 360m_mor_ec": Cmd(RUN, "counts only, a second"),
    "python -m pretrain.tools.inspect 360m_mor_ec num_recursions=4 n_layers=34 router.alpha=0.2":
        Cmd(RUN, "counts only, a second"),
    "python -m pretrain.tools.inspect 360m_mor_tc router.balance=loss_free": Cmd(RUN, "counts only, a second"),
    DEMO: Cmd(RUN, "CPU demo on the sample corpus; its shards serve the tiny_cpu command; 100 steps cut to 3",
              shorter=("--steps", "3")),
    "python -m pretrain.tools.model_bench 360m_vanilla 360m_mor_ec 360m_mor_tc --batch 16 --compile":
        Cmd(HELP, "an H100 benchmark", check=_presets),
    "python -m pretrain.train 360m_mor_ec data.path=DATA train.steps=100 parallel.micro_batch_size=16 "
    "parallel.global_batch_size=16 train.compile=true checkpoint.every=0":
        Cmd(HELP, "a GPU and real data (DATA is the user's)", check=_train_config),
    "python -m pretrain.tools.bench 360m_mor_ec --zero 2 --batch 16 '[--compile]'":
        Cmd(HELP, "an H100 benchmark", check=_presets),
    "python -m pretrain.tools.model_bench 360m_vanilla 360m_mor_ec 360m_mor_tc,tc_capacity=1.25 --batch 16,32 "
    "--compile --baseline anchor.jsonl --baseline-batch 16": Cmd(HELP, "a GPU benchmark", check=_presets),
    "python -m pretrain.tools.bench 360m_mor_ec --zero 2 --batch 16 --compile --baseline anchor.jsonl "
    "--baseline-batch 16": Cmd(HELP, "a GPU benchmark", check=_presets),
    "python -m pretrain.tools.loss_memory tiny_vanilla vocab_size=49152 --batch 4 --seq-len 1024 --chunks 0,2048,512":
        Cmd(HELP, "a minute of CPU; its numbers are in the README"),
    "sbatch slurm/mor_1b7.sh data.path=/data/fineweb": Cmd(HELP, "a GPU cluster", check=_slurm_config),
    "MOR_RUN=1b7_vanilla sbatch slurm/mor_1b7.sh data.path=/data/fineweb":
        Cmd(HELP, "a GPU cluster", check=_slurm_config),
    "sbatch --nodes=2 --time=12:00:00 slurm/mor_360m.sh parallel.zero_stage=2 train.steps=50000":
        Cmd(HELP, "a GPU cluster", check=_slurm_config),
    "sbatch --nodes=2 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=15 slurm/mor_1b7.sh "
    "model=tiny_mor_ec parallel.tensor_parallel=2 data.path=data/sample":
        Cmd(HELP, "a 2-node Slurm cluster (tests/slurm/test_multinode.py submits such jobs)", check=_slurm_config),
    "python -m pretrain.sweep conf/sweep/tiny_lr.yaml --dry-run": Cmd(RUN, "prints the plan, submits nothing"),
    "python data_prep/tokenize.py 'dumps/*.jsonl.gz' wiki.parquet --tokenizer tok.model --out data/shards "
    "--text-field text --seq-len 2048 --val-fraction 0.01 --workers 16": Cmd(HELP, "the user's dumps and tokenizer"),
    "python data_prep/tokenize.py data_prep/corpus --train-tokenizer tok.model --vocab-size 8000":
        Cmd(RUN, "a tokenizer on the sample corpus, seconds"),
    "python -m pretrain.export runs/demo out/demo-hf": Cmd(HELP, "needs the trained run of make demo"),
    "python -m pretrain.import_hf out/demo-hf runs/demo-continued data.path=runs/demo/data":
        Cmd(HELP, "needs the export above"),
    "python -m pretrain.study conf/study/tiny_equal_flops.yaml --dry-run":
        Cmd(RUN, "the plan only, on the demo's shards", needs=DEMO),
    "python -m pretrain.study conf/study/tiny_equal_flops.yaml --executor local":
        Cmd(HELP, "trains four models, 15 min on 2 cores (the README's plot)"),
    "python -m pretrain.study conf/study/360m_equal_flops.yaml --dry-run": Cmd(RUN, "the plan only; no data needed"),
    "python -m data_prep.bench --tokenizer tok.model --repeat 80 --workers 1,2,4,8,12,16":
        Cmd(HELP, "a 16-core benchmark of many minutes"),
    "python -m pretrain.generate runs/demo --prompt 'The state of our Union is' --greedy":
        Cmd(HELP, "needs the trained run of make demo (the demo's own sample takes this path)"),
    "python -m pretrain.generate runs/360m_mor_ec --prompts-file prompts.txt --temperature 0.8 --top-p 0.95 "
    "--seed 1": Cmd(HELP, "a 360M run and the user's prompts"),
    "python -m pretrain.serve.decode_bench tiny_vanilla tiny_mor_ec tiny_mor_ec_kvshare --batch 8 --prompt 32 "
    "--new 96": Cmd(RUN, "tiny random models on the CPU, seconds"),
    "python -m pretrain.serve_bench tiny_vanilla tiny_mor_ec --requests 64 --gen-mean 48 --gen-std 12 --batch 8 "
    "--depths 0.34,0.33,0.33": Cmd(RUN, "tiny random models on the CPU, seconds"),
    "python -m pretrain.serve_bench 360m_vanilla 360m_mor_ec --device cuda --dtype bf16 --batch max":
        Cmd(HELP, "a GPU benchmark", check=_presets),
    "python -m pretrain.fewshot runs/demo --limit 100": Cmd(HELP, "needs the trained run of make demo"),
    "python -m pretrain.fewshot runs/360m_mor_ec --tasks arc_easy,piqa,mmlu --shots 5 --out runs/360m_mor_ec/eval":
        Cmd(HELP, "a 360M run"),
    "python -m data_prep.bench --tokenizer out/bench/mistral.model --repeat 40 --workers 1,8,16":
        Cmd(HELP, "a 16-core benchmark with a downloaded 32k model"),
    SEL_EARLY: Cmd(RUN, "the sample corpus's speeches before 1960, a second"),
    SEL_LATE: Cmd(RUN, "the speeches from 1960 on, a second", needs=SEL_EARLY),
    MIX_TOK: Cmd(RUN, "two corpora, one weighted tokenizer, seconds", needs=SEL_LATE),
    "python -m pretrain.train demo_mix": Cmd(RUN, "the two corpora's mixture, 600 steps cut to 3, its phase "
                                          "moved to step 2 so that the run crosses it",
                                          shorter=("train.steps=3", "data.phases=[{start: 2, weights: {late: 1}}]"),
                                          needs=MIX_TOK),
    "python -m pretrain.plan_layout 1b7_mor_ec --gpus 64 --gpus-per-node 8":
        Cmd(RUN, "the layout planner: shapes and formulas, seconds"),
    "python -m pretrain.plan_layout 360m_mor_ec --gpus 16 --gpu h200 --activation-checkpointing both --top 5":
        Cmd(RUN, "the layout planner: shapes and formulas, seconds"),
    "python -m pretrain.plan_layout 1b7_mor_ec --gpus 64 --tokens-per-s-json bench.jsonl --json":
        Cmd(HELP, "needs a GPU benchmark's output (bench.jsonl)"),
}


def all_commands() -> list[str]:
    return list(dict.fromkeys(c for doc in DOCS if (ROOT / doc).exists() for c in fenced_commands(ROOT / doc)))


def test_every_command_is_classified():
    found = all_commands()
    new = [c for c in found if c not in COMMANDS]
    gone = [c for c in COMMANDS if c not in found]
    assert not new, "README commands with no row in tests/test_readme.py COMMANDS (run, help or make, and why):\n" \
        + "\n".join(new)
    assert not gone, "rows of COMMANDS whose command is no longer in a README:\n" + "\n".join(gone)


def _split(command: str) -> tuple[dict, list[str]]:
    """(environment assignments in front, the words after them)."""
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def _python(words: list[str]) -> list[str]:
    return [sys.executable, *words[1:]] if words[0] == "python" else words


# What this pytest process set for itself (its one-rank world in tests/conftest.py; DS_ACCELERATOR once it
# imported pretrain.parallel.zero) must not leak into the commands it starts: they start from a user's environment.
_OURS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    # wandb disabled: an offline run directory per training run costs seconds and tests nothing here
    return {**env, **extra, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}


# ---- RUN ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    for name in ("conf", "data_prep"):
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)
    return {"dir": folder, "done": {}}


def _run(scratch, command: str) -> subprocess.CompletedProcess:
    if command in scratch["done"]:
        return scratch["done"][command]
    spec = COMMANDS[command]
    if spec.needs:
        need = _run(scratch, spec.needs)
        assert need.returncode == 0, f"{spec.needs} (needed by {command}) failed"
    env, words = _split(command)
    out = subprocess.run(_python(words) + list(spec.shorter), cwd=scratch["dir"], env=_env(env),
                         capture_output=True, text=True, timeout=TIMEOUT)
    scratch["done"][command] = out
    return out


def _ids(kind: str) -> list[str]:
    return [c.replace("'", "") for c, s in COMMANDS.items() if s.kind == kind]


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, s in COMMANDS.items() if s.kind == RUN], ids=_ids(RUN))
def test_command_runs(scratch, command):
    out = _run(scratch, command)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{command}: exit {out.returncode}\n{log[-3000:]}"
    assert not library_chatter(log), f"{command}: library chatter in its output:\n" + \
        "\n".join(library_chatter(log))


# ---- HELP -----------------------------------------------------------------------------------------------------
def _programs(words: list[str]) -> list[tuple[list[str], list[str]]]:
    """(the --help command, the options to find in its text) for each program a command line starts."""
    if words[0] == "torchrun":
        m = words.index("-m")
        return [(["torchrun", "--help"], words[1:m]), *_programs(["python", *words[m:]])]
    if words[0] == "sbatch":
        script = next(i for i, w in enumerate(words) if w.endswith(".sh"))
        return [(["sbatch", "--help"], words[1:script]), (["bash", words[script], "--help"], words[script + 1:])]
    if words[0] == "python":
        n = 3 if words[1] == "-m" else 2
        return [(_python(words[:n]) + ["--help"], words[n:])]
    raise AssertionError(f"no --help rule for {words[0]!r}")


def _option_names(words: list[str]) -> list[str]:
    names = [w.strip("[]").partition("=")[0] for w in words]
    return [n for n in names if n.startswith("-")]


def _program(name: str) -> Optional[str]:
    """A program beside this interpreter (torchrun in the venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.mark.parametrize("command", [c for c, s in COMMANDS.items() if s.kind == HELP], ids=_ids(HELP))
def test_command_help_accepts_its_options(command):
    env, words = _split(command)
    if COMMANDS[command].check:
        COMMANDS[command].check(words, env)
    missing = []
    for help_cmd, used in _programs(words):
        program = help_cmd[0] if help_cmd[0] in (sys.executable, "bash") else _program(help_cmd[0])
        if program is None:
            missing.append(help_cmd[0])
            continue
        out = subprocess.run([program, *help_cmd[1:]], cwd=ROOT, env=_env(env), capture_output=True, text=True,
                             timeout=TIMEOUT)
        text = out.stdout + out.stderr
        assert out.returncode == 0, f"{shlex.join(help_cmd)}: exit {out.returncode}\n{text[-2000:]}"
        for name in _option_names(used):
            assert re.search(rf"(^|[\s,\[]){re.escape(name)}([\s=,\]]|$)", text, re.M), \
                f"{command}: {name} is not among the options of {shlex.join(help_cmd)}"
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed here; the rest of the command checked out")


# ---- MAKE -----------------------------------------------------------------------------------------------------
MAKE_SHOWS = {"make demo": "-m pretrain.tools.demo", "make test": "-m pytest -q -n 2 --waiting-worker tests",
              "make test-fast": "-m pytest -q -n 2 -m unit tests"}


@pytest.mark.parametrize("command,shows", MAKE_SHOWS.items())
def test_make_target_dry_run(command, shows):
    assert COMMANDS[command].kind == MAKE
    if shutil.which("make") is None:
        pytest.skip("make is not installed here")
    out = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(rf"^\S*python {re.escape(shows)}$", out.stdout, re.M), out.stdout


def test_every_make_command_has_a_dry_run():
    assert {c for c, s in COMMANDS.items() if s.kind == MAKE} == set(MAKE_SHOWS)


# ---- the demo's model argument --------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_misspelt_preset_is_one_line_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pretrain.tools.demo", "tiny_mor_xc", "--steps", "1"], cwd=tmp_path,
                         env=_env({}), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown preset 'tiny_mor_xc'" in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be tokenized for a command that stops on its preset"


# ---- the front page and the links between pages ---------------------------------------------------------------
def test_the_front_page_shows_its_two_commands_in_its_first_screen():
    """A new reader sees how to start without scrolling: both commands, each with how long it takes."""
    first = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:40]
    for target in ("make demo", "make test"):
        line = next((ln for ln in first if ln.startswith(f"{target} ")), None)
        assert line is not None, f"README.md: `{target}` is not in a command block of its first 40 lines"
        assert re.search(r"\d+ (s|min)\b|TEST_(FAST_)?TIME", line), f"README.md: `{target}` says no time: {line}"
    assert len(DOCS) > 3, "no docs/*.md pages found"


def test_relative_links_lead_to_files():
    bad = []
    for doc in DOCS:
        path = ROOT / doc
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue   # a URL, or a place in the same page
            if not (path.parent / target.split("#")[0]).exists():
                bad.append(f"{doc}: {target}")
    assert not bad, "links to missing files:\n" + "\n".join(bad)

