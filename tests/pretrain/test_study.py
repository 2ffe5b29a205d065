"""python -m pretrain.study: each model's steps follow the FLOPs counter (model/flops.py) to within one step of the
budget, the plan a dry run prints, one-line mistakes, and one tiny study end to end through the sweep machinery's
local executor: four models trained, study.png/.md/.json with one row per model, a rerun that skips them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.flops import training_flops
from pretrain.study.cli import main
from pretrain.study.spec import load_study, plan
from tests.pretrain.fixtures import make_shards

ROOT = Path(__file__).resolve().parents[2]
# The tiny CPU MoR of conf/run/tiny_cpu.yaml on 32-token synthetic sequences: a step takes milliseconds.
TINY = {"model.vocab_size": 512, "model.max_seq_len": 64, "data.num_workers": 0, "parallel.micro_batch_size": 2,
        "train.log_every": 1, "train.eval_batches": 2, "logging.wandb": "disabled",
        "eval.downstream_tasks": ["piqa", "arc_easy"], "eval.downstream_limit": 2}
MODELS = {"vanilla": {"model.routing": "none", "model.sharing": "none", "model.num_recursions": 1},
          "recursive": {"model.routing": "none"},
          "mor_ec": {"model.routing": "expert_choice"},
          "mor_tc": {"model.routing": "token_choice"}}
CPU = {"tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1, "timeout_min": 10}
FLOPS = 6.2e8   # vanilla: 4 steps of 2 × 32 tokens; the MoR models: 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic shards whose manifest names a real 512-piece tokenizer, which in-loop downstream evaluation reads
    (the tokens themselves are the synthetic counting pattern)."""
    import gzip

    import sentencepiece as spm

    from data_prep.shards import Manifest
    root = tmp_path_factory.mktemp("study_data")
    with gzip.open(ROOT / "data_prep" / "corpus" / "sotu-1900-2021.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split(". ")), model_prefix=str(root / "tok"),
                                   vocab_size=512, model_type="bpe", minloglevel=2, byte_fallback=True)
    folder = make_shards(root / "shards", vocab=512, seq_len=32, train=256, val=16)
    m = Manifest.load(folder)
    m.tokenizer.update(path=str(root / "tok.model"), eos_id=2, bos_id=1)
    m.save(folder)
    return folder


def measured_per_step(run_dir: Path, p) -> dict[int, float]:
    """step -> training FLOPs of that step, counted by model/flops.py at the depth loads the step logged: the
    fraction leaving at depth i is kept_i − kept_{i+1} (no routing: every token at the deepest)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" not in rec or "event" in rec:
            continue
        kept = [rec.get(f"r{i}/kept_frac") for i in range(1, p.cfg.model.num_recursions + 1)]
        loads = None if None in kept else [a - b for a, b in zip(kept, kept[1:] + [0.0])]
        if p.routing != "none":
            assert loads is not None, rec
        out[rec["step"]] = training_flops(p.cfg.model, 32, depth_loads=loads).training_per_token * p.tokens_per_step
    return out


def write_study(path: Path, data: Path, **extra) -> Path:
    body = {"run": "tiny_cpu", "out_dir": str(path.parent / "out"), "flops": FLOPS, "evals": 2,
            "overrides": {**TINY, "data.path": str(data)}, "models": MODELS, "slurm": CPU, **extra}
    path.write_text(json.dumps(body, indent=1))  # JSON is YAML: exactly what a user could write
    return path


@pytest.mark.parametrize("world,extra", [(1, {}), (2, {"parallel.global_batch_size": 8})],
                         ids=["one-rank", "dp2-accumulate2"])
def test_steps_follow_the_flops_counter(tmp_path, data, world, extra):
    f = write_study(tmp_path / "s.yaml", data, flops=3.0e10, evals=3,
                    slurm={**CPU, "tasks_per_node": world},
                    overrides={**TINY, "data.path": str(data), **extra})
    plans = plan(load_study(str(f)), str(f))
    assert [p.name for p in plans] == list(MODELS)
    for p in plans:
        # by hand: micro-batch 2 × accumulation × DP × the data's 32 tokens (not max_seq_len's 64)
        tokens = 2 * (8 // (2 * world) if extra else 1) * world * 32
        per_step = training_flops(p.cfg.model, 32).training_per_token * tokens
        assert p.tokens_per_step == tokens and p.flops_per_step == pytest.approx(per_step, rel=1e-12)
        assert abs(p.steps * per_step - 3.0e10) <= per_step / 2          # the nearest whole step to the budget
        assert p.cfg.train.steps == p.steps and p.cfg.train.eval_every == p.steps // 3 == p.eval_every
        assert p.cfg.checkpoint.every == p.eval_every == p.cfg.eval.downstream_every and p.cfg.name == p.name
    vanilla, recursive, ec, tc = plans
    # same unrolled depth: vanilla and recursive cost the same per token; routing makes MoR's steps cheaper
    assert vanilla.steps == recursive.steps < min(ec.steps, tc.steps)
    assert recursive.params < vanilla.params


def test_downstream_false_validates_only(tmp_path, data):
    f = write_study(tmp_path / "s.yaml", data, downstream=False)
    assert all(p.cfg.eval.downstream_every == 0 and p.cfg.train.eval_every == p.eval_every
               for p in plan(load_study(str(f)), str(f)))


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, data, capsys):
    f = write_study(tmp_path / "plan.yaml", data)
    assert main([str(f), "--dry-run", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "study plan: 4 model(s) of tiny_cpu, 6.2e+08 training FLOPs each, 2 evaluation(s)" in out
    assert "executor local" in out and "1 node(s) × 1 task(s)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and ":" not in line}
    head = lines.pop("model")
    assert head == ["model", "params", "FLOPs/token", "tokens/step", "steps", "tokens", "eval", "every", "planned",
                    "FLOPs"]
    assert {name: row[4] for name, row in lines.items()} == {"vanilla": "4", "recursive": "4", "mor_ec": "5",
                                                             "mor_tc": "5"}
    assert lines["vanilla"][3] == "64" and lines["mor_ec"][5] == "320" and lines["mor_ec"][6] == "2"
    assert "  mor_tc: model.routing=token_choice" in out and "would train 4 model(s)" in out
    # token-choice's plan rests on an assumption about its router, and says so; no other model's does
    assert "  mor_tc: planned FLOPs assume uniform depth loads (1/3 of the tokens leave at each of the 3 depths)" \
        in out and out.count("planned FLOPs assume") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change,where,msg", [
    ({"models": {**MODELS, "vanilla": {"model.n_layer": 8}}}, "model vanilla: override 'model.n_layer=8'",
     "model.n_layer: unknown key (did you mean 'n_layers'?)"),
    ({"modles": {}}, ":", "modles: unknown key (did you mean 'models'?)"),
    ({"flops": 0}, ":", "flops: the training-FLOPs budget must be > 0"),
    ({"flops": 1.0e6}, ": flops:", "less than half a training step of model vanilla"),
    ({"evals": 0}, ":", "evals: must be >= 1, got 0"),
    ({"evals": 5}, ": evals:", "model vanilla trains 4 step(s) on this budget, fewer than evals=5"),
    ({"overrides": {**TINY, "train.steps": 10}}, ":", "overrides.train.steps: set by the study"),
], ids=["unknown-model-key", "unknown-study-key", "flops-zero", "budget-below-a-step", "evals-zero",
        "evals-above-steps", "reserved-key"])
def test_a_bad_study_is_one_line_naming_the_file(tmp_path, data, capsys, change, where, msg):
    f = write_study(tmp_path / "bad.yaml", data, **change)
    with pytest.raises(SystemExit) as e:
        main([str(f), "--executor", "local"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {f}") and where in err and msg in err, err
    assert not (tmp_path / "out").exists()


def test_measured_flops_hold_each_logged_load_over_the_steps_since_the_previous_log(tmp_path, data):
    """train.log_every=2 on token-choice's 5 steps: the log at step 2 counts for steps 1-2, the one at step 4 for
    3-4, and step 5 (never logged) keeps step 4's loads; a resumed run's repeated log of a step replaces it."""
    from pretrain.study import report
    f = write_study(tmp_path / "s.yaml", data)
    tc = next(p for p in plan(load_study(str(f)), str(f)) if p.name == "mor_tc")
    assert tc.steps == 5 and tc.eval_every == 2
    kept = {2: [1.0, 0.5, 0.25], 4: [1.0, 0.9, 0.8]}
    lines = [{"step": 2, "loss": 5.0, **{f"r{i + 1}/kept_frac": k for i, k in enumerate([1.0, 0.1, 0.1])}},
             {"step": 2, "loss": 5.0, **{f"r{i + 1}/kept_frac": k for i, k in enumerate(kept[2])}},   # resumed
             {"step": 2, "val_loss": 4.0, "val_loss_causal": 4.1},
             {"step": 4, "loss": 4.0, **{f"r{i + 1}/kept_frac": k for i, k in enumerate(kept[4])}},
             {"step": 4, "val_loss": 3.0, "val_loss_causal": 3.1},
             {"step": 5, "event": "nonfinite_stop", "loss": None}]
    tc.point.run_dir.mkdir(parents=True)
    (tc.point.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    def at(fractions):   # by hand: depth loads f_i = kept_i − kept_{i+1}
        loads = [a - b for a, b in zip(fractions, fractions[1:] + [0.0])]
        return training_flops(tc.cfg.model, 32, depth_loads=loads).training_per_token * tc.tokens_per_step
    row = report.summary([tc])[0]
    assert row["step"] == 4 and row["measured_logs"] == 2
    assert row["measured_train_flops"] == pytest.approx(2 * at(kept[2]) + 2 * at(kept[4]), rel=1e-12)
    assert [pt["measured_flops"] for pt in row["curve"]] == pytest.approx([2 * at(kept[2]),
                                                                          2 * at(kept[2]) + 2 * at(kept[4])])
    # deeper loads than the plan's uniform ones: more FLOPs than planned for the same steps
    assert row["measured_train_flops"] > 4 * tc.flops_per_step
    assert report.MeasuredFlops(tc, kept).at(5) == pytest.approx(2 * at(kept[2]) + 3 * at(kept[4]), rel=1e-12)
    assert report.MeasuredFlops(tc, kept).at(3) == pytest.approx(2 * at(kept[2]) + at(kept[4]), rel=1e-12)


@pytest.mark.slow
def test_a_tiny_study_trains_every_model_to_the_budget_and_draws_it(tmp_path, data):
    f = write_study(tmp_path / "tiny.yaml", data)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOR_FAULT_")}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "pretrain.study", str(f), "--executor", "local", "--poll", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "study.json").read_text())
    rows = {r["model"]: r for r in report["models"]}
    assert list(rows) == list(MODELS) and report["flops"] == FLOPS
    plans = {p.name: p for p in plan(load_study(str(f)), str(f))}
    for name, r in rows.items():
        assert r["done"] and r["step"] == r["steps"] == (4 if name in ("vanilla", "recursive") else 5)
        assert abs(r["planned_train_flops"] - FLOPS) <= r["planned_train_flops"] / r["steps"] / 2
        assert r["val_loss"] > 0 and r["val_loss_causal"] > 0
        assert [pt["step"] for pt in r["curve"]] == [2, 4]           # eval_every = steps // 2
        assert r["curve"][-1]["planned_flops"] == pytest.approx(4 * r["planned_train_flops"] / r["steps"])
        # measured: model/flops.py at the depth loads each step logged (log_every=1), summed over the steps
        per_step = measured_per_step(out / name, plans[name])
        assert sorted(per_step) == list(range(1, r["steps"] + 1))
        assert r["measured_logs"] == (0 if name in ("vanilla", "recursive") else r["steps"])
        assert r["measured_train_flops"] == pytest.approx(sum(per_step.values()), rel=1e-12)
        assert r["curve"][-1]["measured_flops"] == pytest.approx(sum(per_step[s] for s in range(1, 5)), rel=1e-12)
        if name == "mor_tc":   # its router, not the plan's uniform loads, decided what ran
            assert r["measured_train_flops"] != pytest.approx(r["planned_train_flops"], rel=1e-3)
        else:                  # no routing, or expert-choice's capacities: the plan is what runs
            assert r["measured_train_flops"] == pytest.approx(r["planned_train_flops"], rel=1e-12)
        assert [pt["step"] for pt in r["downstream_curve"]] == [2, 4] and r["downstream_items"] == 2
        assert set(r["downstream"]) == {"piqa", "arc_easy"} and 0 <= r["downstream_avg"] <= 1
    assert rows["vanilla"]["val_loss"] == rows["vanilla"]["val_loss_causal"]   # no router: one routing
    md = (out / "study.md").read_text()
    assert "| planned training FLOPs | measured training FLOPs | measured / planned |" in md
    tc = rows["mor_tc"]
    assert f"| {tc['measured_train_flops']:.3g} | {tc['measured_train_flops'] / tc['planned_train_flops']:.3f} |" in md
    assert sum(line.startswith(f"| {name} |") for name in MODELS for line in md.splitlines()) == 4
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mor_tc |" in res.stdout
    # rerunning trains nothing: every run has its final checkpoint
    (out / "study.md").unlink()
    assert main([str(f), "--executor", "local"]) == 0
    assert (out / "study.md").read_text() == md
    print(f"tiny study: {time.time() - t0:.1f} s")
