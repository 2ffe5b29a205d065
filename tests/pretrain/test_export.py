"""Hugging Face export and import (pretrain/export/, pretrain/import_hf.py, pretrain/hf/).

One tiny MoR trained 2 steps (a module fixture) is exported, loaded with transformers' Auto classes and compared
with the training project's own model: logits under causal routing, greedy generation token for token (with the
recursion-wise cache and without, stopping at max_seq_len), the tokenizer's ids (the doc-start piece first),
lm-evaluation-harness's log-likelihoods against pretrain.fewshot's, and the way back (export -> import -> export
gives the same weights file, and the trainer resumes from the imported checkpoint). No output folder may replace
or enter the run (pretrain/training/outdir.py): refusals leave every file of it as it was. Random models of every
variant: tests/pretrain/test_export_variants.py.

Exports of tensor-parallel, pipeline or ZeRO-3 checkpoints go through the same pretrain.checkpoint.consolidate.load,
tested under those layouts in tests/pretrain/test_generate.py and tests/distributed/.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here may reach for the network

import pytest
import torch

from model.inference import Sampling, generate
from tests.distributed.harness import spawn_ranks
from tests.pretrain.fixtures import make_shards, with_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB = 384
SENTENCE = "The state of  our Union is strong — and 1,234 Américans agree.\nNew line?"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Synthetic shards whose manifest names a real SentencePiece model (byte fallback, as data_prep trains)."""
    tmp = tmp_path_factory.mktemp("export")
    return with_tokenizer(make_shards(tmp / "data", vocab=VOCAB, seq_len=64), VOCAB)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A tiny MoR (expert-choice, middle-cycle, 3 recursions) trained 2 steps, validated at the end."""
    tmp = tmp_path_factory.mktemp("export-run")
    args = [f"data.path={data}", f"out_dir={tmp / 'runs'}", "name=tiny", f"model.vocab_size={VOCAB}",
            "model.max_seq_len=128", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
            "checkpoint.every=2", "logging.wandb=disabled", "parallel.micro_batch_size=4"]
    spawn_ranks(1, ["-m", "pretrain.train", "conf/run/tiny_cpu.yaml", *args], tmp, timeout=600)
    return tmp / "runs" / "tiny"


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from pretrain.export import export_run
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    export_run(run, out)
    return out


def _auto(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


# ---- the trained run ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_export_holds_the_checkpoints_model_and_its_card(run, exported):
    from safetensors import safe_open

    from pretrain.checkpoint.consolidate import load
    loaded = load(run)
    names = sorted(exported.iterdir())
    assert {p.name for p in names} == {"model.safetensors", "config.json", "configuration_mor.py", "modeling_mor.py",
                                       "layers_mor.py", "cache_mor.py", "generation_config.json", "tokenizer.model",
                                       "tokenizer_config.json", "mor_run.json", "README.md"}
    assert not list(exported.parent.glob(".*"))          # no temporary folder left beside it
    with safe_open(exported / "model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    expected = sorted(k for k, v in loaded.model.state_dict().items() if torch.is_tensor(v))
    assert keys == expected
    # each shared layer once (middle-cycle, 3 recursions of 2 layers: 4 unique layers), the tied embedding once
    assert sorted({k.split(".")[1] for k in keys if k.startswith("layers.")}) == ["0", "1", "2", "3"]
    assert "embedding.weight" in keys and not any(k.startswith("output_layer") for k in keys)
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "mor" and config["routing"] == "expert_choice" and config["n_layers"] == 8
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mor.MoRForCausalLM"
    # the data has no BOS: every document came after EOS (2), which is the BOS of the export
    assert config["eos_token_id"] == config["doc_start_token_id"] == config["bos_token_id"] == 2
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 2 and gen["max_length"] == config["max_seq_len"] == 128
    card = (exported / "README.md").read_text()
    record = json.loads((exported / "mor_run.json").read_text())
    assert record["step"] == 2 and record["tokens"] > 0 and f"optimizer steps: {record['step']}" in card
    assert "training FLOPs per token" in card and "val_loss_causal" in card and "trust_remote_code=True" in card
    assert 'tok("The state of our Union is", return_tensors="pt").input_ids' in card and "stops at 128" in card
    from pretrain.export import CODE_FILES
    for name in CODE_FILES:   # nothing of the training project, nor megatron
        text = (exported / name).read_text()
        assert "megatron" not in text.replace("no megatron-core", "") and "import deepspeed" not in text
        assert "from model" not in text and "from pretrain" not in text and "from conf" not in text


def test_auto_model_logits_match_causal_routing(run, exported):
    from pretrain.checkpoint.consolidate import load
    ref = load(run).model
    hf = _auto(exported)
    tokens = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        want = ref(tokens, causal_routing=True).logits
        got = hf(tokens).logits
        one = hf(tokens[:1, :17]).logits                     # a prefix alone: causal, so the same logits
    assert (got - want).abs().max().item() < 1e-5
    assert (one - want[:1, :17]).abs().max().item() < 1e-5


def test_greedy_generate_matches_pretrain_generate(run, exported):
    from pretrain.serve.generate import encode_prompts, open_generator
    gen = open_generator(run, device="cpu", dtype="fp32")
    prompts = ["The state of our Union is", "Congress"]
    ids = encode_prompts(gen, prompts)
    want = generate(gen.model, ids, 12, sampling=Sampling(temperature=0.0), eos_id=gen.eos_id)
    hf = _auto(exported)
    for p, w in zip(ids, want):
        for use_cache in (True, False):
            out = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, use_cache=use_cache)
            assert out[0, len(p):].tolist() == w, (use_cache, p)
    # a left-padded batch gives each row what it gets alone
    width = max(len(p) for p in ids)
    batch = torch.tensor([[2] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, w in zip(out[:, width:].tolist(), want):
        assert row[:len(w)] == w
    # generate() stops at max_seq_len (128) tokens in all, as pretrain.generate does, whatever max_new_tokens asks
    # and without it (generation_config.json); EOS is switched off on both sides so that only the length stops them
    hf.generation_config.eos_token_id = None
    long = (ids[0] * 40)[:120]
    want_long = generate(gen.model, [long], 40, sampling=Sampling(temperature=0.0))[0]
    assert len(want_long) == 8
    out = hf.generate(torch.tensor([long]), max_new_tokens=40, do_sample=False)
    assert out.shape[1] == 128 and out[0, 120:].tolist() == want_long
    assert hf.generate(torch.tensor([long + long[:6]]), do_sample=False).shape[1] == 128
    with pytest.raises(ValueError, match="max_seq_len=128"):
        hf.generate(torch.tensor([long * 2]), max_new_tokens=1)


def test_auto_tokenizer_gives_the_runs_ids(exported, data):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    sp = spm.SentencePieceProcessor(model_file=str(data.parent / "tok.model"))
    start = json.loads((exported / "config.json").read_text())["doc_start_token_id"]
    assert start == sp.eos_id() != sp.bos_id()        # the data has no BOS: documents came after EOS
    for trust in (True, None):
        tok = AutoTokenizer.from_pretrained(exported, trust_remote_code=trust)
        # what training saw: the doc-start piece, then SentencePiece's ids (text that spells "</s>" is text)
        for text in (SENTENCE, "a </s> b <s>"):
            assert tok(text).input_ids == [start] + sp.encode(text)
            assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)
        assert (tok.bos_token_id, tok.eos_token_id) == (start, sp.eos_id())
        assert tok.sp_model.decode(tok(SENTENCE).input_ids[1:]) == sp.decode(sp.encode(SENTENCE))


def test_export_import_export_is_byte_identical_and_training_resumes(run, exported, data, tmp_path):
    from conf import load_config
    from pretrain.config import RunConfig
    from pretrain.export import export_run
    from pretrain.import_hf import import_export
    from pretrain.training.trainer import Trainer
    folder = import_export(exported, tmp_path / "again", overrides=[f"data.path={data}"])
    assert folder.name == "step-000002" and (tmp_path / "again" / "run.yaml").is_file()
    back = export_run(tmp_path / "again", tmp_path / "back")
    assert (back / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
    assert (back / "config.json").read_bytes() == (exported / "config.json").read_bytes()
    # the trainer picks it up: same weights, step 2, one more step trains
    cfg = load_config(tmp_path / "again" / "run.yaml", ["train.steps=3"], schema=RunConfig)
    lines: list[str] = []
    trainer = Trainer(cfg, log=lines.append)
    try:
        assert trainer.step == 2 and any("resumed from" in line for line in lines)
        from safetensors.torch import load_file
        weights = load_file(str(exported / "model.safetensors"))
        state = trainer.model.state_dict()
        assert all(torch.equal(state[k].float(), v) for k, v in weights.items())
        assert trainer.fit() == 0 and trainer.step == 3
    finally:
        trainer.close()


@pytest.mark.slow
def test_lm_eval_harness_gives_pretrain_fewshots_loglikelihoods(run, exported, tmp_path, capsys):
    """lm-evaluation-harness's own HF model class (HFLM: its tokenisation with add_bos_token=True, its split of
    context and continuation, its window, its prefix token for an empty context) on the exported folder gives the
    log-likelihoods and greedy flags that pretrain.fewshot computes (pretrain/eval/fewshot.py: encode_task, then
    model/inference/score.py) within 1e-4 relative, through pretrain.tools.lmeval_check."""
    pytest.importorskip("lm_eval")
    from model.inference.score import score
    from pretrain.eval.fewshot import encode_pair, encode_task
    from pretrain.eval.tasks import load_task
    from pretrain.serve.generate import open_generator
    from pretrain.tools import lmeval_check
    gen = open_generator(run, device="cpu", dtype="fp32")
    # (continuations of at most max_seq_len tokens: lm-eval refuses longer ones, and this tokenizer is small)
    tasks = [load_task("arc_easy", 0, 2), load_task("arc_challenge", 5, 1), load_task("winogrande", 0, 1),
             load_task("lambada", 0, 2)]
    rows = [dict(task=t.name, shots=t.shots, doc_id=item.doc_id, choice=j, gold=item.gold, context=c,
                 continuation=k) for t in tasks for item in t.items for j, (c, k) in enumerate(item.pairs)]
    # an empty context (lm-eval's prefix token), and one that ends in whitespace other than a space (it moves to
    # the continuation: all trailing whitespace, as lm-eval strips it)
    extra = [("", "The state"), ("The state of our Union\n", "is strong")]
    rows += [dict(task="extra", shots=0, doc_id=i, choice=0, gold=0, context=c, continuation=k)
             for i, (c, k) in enumerate(extra)]
    pairs = [p for t in tasks for p in encode_task(gen.sp, t, gen.doc_start)]
    pairs += [encode_pair(gen.sp, c, k, gen.doc_start) for c, k in extra]
    for row, (ctx, cont), s in zip(rows, pairs, score(gen.model, pairs)):
        row.update(logprob=s.logprob, greedy=s.greedy, context_tokens=ctx, continuation_tokens=cont)
    assert any(len(r["context_tokens"]) + len(r["continuation_tokens"]) > 129 for r in rows)   # windows too
    # (the ids themselves here; pretrain.fewshot --dump writes their counts, which lmeval_check compares too)
    lm = lmeval_check.open_lm(exported, batch_size=4)
    assert lm.tokenizer.bos_token_id == lm.prefix_token_id == gen.doc_start
    rep = lmeval_check.compare(rows, lm)
    assert rep.requests == len(rows) and rep.same_tokens == rep.requests and rep.same_greedy == rep.requests
    assert rep.max_rel <= 1e-4 and lmeval_check.agrees(rep, 1e-4), lmeval_check.render(rep, 1e-4)
    dump = tmp_path / "dump.jsonl"
    dump.write_text("".join(json.dumps(dict(r, context_tokens=len(r["context_tokens"]),
                                            continuation_tokens=len(r["continuation_tokens"]))) + "\n"
                            for r in rows[:3]))
    assert lmeval_check.main([str(dump), str(exported), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "requests: 3\n" in out and "(context and continuation tokens): 3 of 3" in out
    assert out.rstrip().endswith("agree")
    dump.write_text('{"task": "arc_easy"}\n')
    with pytest.raises(SystemExit) as e:
        lmeval_check.main([str(dump), str(exported)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "lacks shots, doc_id" in err[0]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256, and every folder: what a refused command must leave alone."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def test_no_output_folder_replaces_or_enters_a_run_or_what_it_reads(run, exported, tmp_path, capsys):
    from pretrain.export import main
    from pretrain.import_hf import main as import_main
    runs, ckpt = run.parent, sorted((run / "checkpoints").glob("step-*"))[-1]
    mine = tmp_path / "mine"                    # somebody's folder
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    mixed = tmp_path / "mixed"                  # an earlier export, and a file no export writes
    shutil.copytree(exported, mixed)
    (mixed / "notes.txt").write_text("keep me")
    before = {f: _tree(f) for f in (runs.parent, mine, mixed, exported)}
    cases = [([run, run, "--overwrite"], "the folder being read"),                   # the run itself
             ([run, ckpt, "--overwrite"], "is inside"),                               # one of its checkpoints
             ([run, runs, "--overwrite"], f"holds {run}"),                            # the folder of all runs
             ([ckpt, run, "--overwrite"], f"holds {ckpt}"),                           # above the checkpoint read
             ([ckpt, run / "hf"], f"is inside the run folder {run.resolve()}"),       # a new folder in the run
             ([run, mine, "--overwrite"], "not an earlier export"),                   # foreign files
             ([run, mine], "not an earlier export"),
             ([run, mixed, "--overwrite"], "also holds notes.txt, which no export writes"),
             ([run, exported], "holds an earlier export (step 2); --overwrite replaces it")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
        assert {f: _tree(f) for f in before} == before, argv
    for argv, words in (([exported, run / "again", f"data.path={run}"], "inside the run folder"),
                        ([exported, exported / "run", f"data.path={run}"], "the folder being read"),
                        ([exported, runs / "new", f"data.path={run}"], None)):   # beside the run: allowed
        if words is None:
            from pretrain.training.outdir import check_place, is_run, run_around
            check_place(runs / "new", [exported])
            assert is_run(run) and run_around(ckpt) == run.resolve() and not is_run(runs)   # as the trainer left it
            continue
        with pytest.raises(SystemExit) as e:
            import_main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], (argv, err)
    assert {f: _tree(f) for f in before} == before
    assert not (run / "hf").exists() and not (run / "again").exists() and not (exported / "run").exists()


def test_overwrite_replaces_an_earlier_export_and_says_what_it_removed(run, exported, tmp_path, capsys):
    from pretrain.export import main
    out = tmp_path / "hf"
    shutil.copytree(exported, out)
    (out / "README.md").write_text("an edited card")          # a file of the export, edited: still ours
    assert main([str(run), str(out), "--overwrite"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("replaced")]
    assert len(lines) == 1 and f"replaced the earlier export in {out} (step 2 of " in lines[0], lines
    assert f"removed {len(os.listdir(exported))} file(s)" in lines[0]
    assert _tree(out) == _tree(exported) and sorted(os.listdir(tmp_path)) == ["hf"]   # nothing set aside left


def test_mistakes_are_one_line(run, exported, tmp_path, capsys, monkeypatch):
    from pretrain.export import main
    from pretrain.import_hf import main as import_main
    for argv, words in (([str(tmp_path / "nothing"), str(tmp_path / "o1")], "no such file or folder"),
                        ([str(run), str(tmp_path / "o2"), "--tokenizer", str(tmp_path / "no.model")],
                         "not a readable SentencePiece model")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    with pytest.raises(SystemExit) as e:
        import_main([str(tmp_path), str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no config.json" in err[0]
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep me")
    for argv, words in (([str(exported), str(tmp_path / "used")], "not an empty folder"),
                        ([str(exported), str(tmp_path / "r"), "model.d_model=8"], "the model is the export's")):
        with pytest.raises(SystemExit) as e:
            import_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    monkeypatch.setitem(sys.modules, "safetensors", None)     # as if the hf extra were not installed
    with pytest.raises(SystemExit) as e:
        main([str(run), str(tmp_path / "o3")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "pip install -e '.[hf]'" in err[0]
    for entry in (main, import_main):
        with pytest.raises(SystemExit) as e:
            entry(["--help"])
        assert e.value.code == 0
    capsys.readouterr()
