"""Hugging Face export and import (pretrain/export.py, pretrain/import_hf.py, pretrain/hf/).

One tiny MoR trained 2 steps (a module fixture) is exported, loaded with transformers' Auto classes and compared
with the training project's own model: logits under causal routing, greedy generation token for token (with the
recursion-wise cache and without), the tokenizer's ids, and the way back (export -> import -> export gives the same
weights file, and the trainer resumes from the imported checkpoint). Random models of every variant (no training)
are compared the same way, KV cache contents included.

Exports of tensor-parallel, pipeline or ZeRO-3 checkpoints go through the same pretrain.training.consolidate.load,
tested under those layouts in tests/pretrain/test_generate.py and tests/distributed/.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here may reach for the network

import pytest
import torch

from model.config import RouterConfig
from model.inference import KVCache, Sampling, generate, prefill
from model.mor import MoRModel
from tests.distributed.harness import spawn_ranks
from tests.model.helpers import tiny
from tests.pretrain.fixtures import make_shards, with_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[2]
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
def test_the_export_holds_the_checkpoints_model_and_its_card(run, exported):
    from safetensors import safe_open

    from pretrain.training.consolidate import load
    loaded = load(run)
    names = sorted(exported.iterdir())
    assert {p.name for p in names} >= {"model.safetensors", "config.json", "configuration_mor.py", "modeling_mor.py",
                                       "generation_config.json", "spiece.model", "tokenizer_config.json",
                                       "mor_run.json", "README.md"}
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
    assert config["eos_token_id"] == 2 and config["doc_start_token_id"] == 2   # the data has no BOS
    card = (exported / "README.md").read_text()
    record = json.loads((exported / "mor_run.json").read_text())
    assert record["step"] == 2 and record["tokens"] > 0 and f"optimizer steps: {record['step']}" in card
    assert "training FLOPs per token" in card and "val_loss_causal" in card and "trust_remote_code=True" in card
    for name in ("modeling_mor.py", "configuration_mor.py"):   # nothing of the training project, nor megatron
        text = (exported / name).read_text()
        assert "megatron" not in text.replace("no megatron-core", "") and "import deepspeed" not in text
        assert "from model" not in text and "from pretrain" not in text and "from conf" not in text


def test_auto_model_logits_match_causal_routing(run, exported):
    from pretrain.training.consolidate import load
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
    from pretrain.generate import encode_prompts, open_generator
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


def test_auto_tokenizer_gives_the_runs_ids(exported, data):
    import sentencepiece as spm
    from transformers import AutoTokenizer
    sp = spm.SentencePieceProcessor(model_file=str(data.parent / "tok.model"))
    for trust in (True, None):
        tok = AutoTokenizer.from_pretrained(exported, trust_remote_code=trust)
        assert tok(SENTENCE).input_ids == sp.encode(SENTENCE)
        assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
        assert tok.sp_model.decode(tok(SENTENCE).input_ids) == sp.decode(sp.encode(SENTENCE))


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


def test_a_non_empty_out_dir_is_refused_in_one_line(run, tmp_path, capsys):
    from pretrain.export import main
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        main([str(run), str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert (out / "notes.txt").read_text() == "keep me" and sorted(os.listdir(out)) == ["notes.txt"]


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


# ---- every variant, random weights ---------------------------------------------------------------------------------
VARIANTS = {
    "vanilla_untied": dict(sharing="none", tie_embeddings=False),
    "recursive_cycle": dict(routing="none", sharing="cycle"),
    "ec_middle_cycle_aux_kvshare": dict(routing="expert_choice", sharing="middle_cycle", kv_sharing=True,
                                        router=RouterConfig(aux_router=True)),
    "ec_sequence_residual_tanh": dict(routing="expert_choice", sharing="sequence",
                                      router=RouterConfig(gating="residual", func="tanh")),
    "ec_middle_sequence_mlp_no_full_step": dict(routing="expert_choice", sharing="middle_sequence",
                                                router=RouterConfig(arch="mlp", capacities=[0.8, 0.5, 0.3])),
    "tc_middle_cycle_loss_free": dict(routing="token_choice", sharing="middle_cycle",
                                      router=RouterConfig(balance="loss_free", bias_update_rate=0.05)),
    "tc_cycle_sigmoid_kvshare": dict(routing="token_choice", sharing="cycle", kv_sharing=True,
                                     router=RouterConfig(func="sigmoid")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_exports_to_the_same_model(variant, tmp_path):
    from pretrain.export import write_export
    kw = dict(VARIANTS[variant])
    cfg = tiny(kw.pop("routing", "none"), kw.pop("sharing"), init_std=0.1, **kw)
    model = MoRModel(cfg).eval()
    if cfg.routing == "token_choice" and cfg.router.balance == "loss_free":
        model.router.bias_steps.copy_(torch.tensor([3, -2, 0]))
    out = write_export(model, cfg, tmp_path / "m")
    hf = _auto(out)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        want = model(tokens, causal_routing=True).logits
        got = hf(tokens).logits
    assert (got - want).abs().max().item() < 1e-5
    # prefill + greedy decoding through each model's own cache: the same tokens, the same cached tokens per layer
    prompts = [tokens[0, :9].tolist(), tokens[1, :5].tolist()]
    want_new = generate(model, prompts, 10, sampling=Sampling(temperature=0.0))
    for p, w in zip(prompts, want_new):
        out_ids = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)
        assert out_ids[0, len(p):].tolist() == w
    MoRCache = sys.modules[type(hf).__module__].MoRCache    # the class of the folder's own code
    ref_cache = KVCache(cfg, 1, 32)
    with torch.no_grad():
        prefill(model, ref_cache, [tokens[0, :20].tolist()])
        cache = MoRCache()
        hf(tokens[:1, :20], past_key_values=cache, use_cache=True)
    ours = {pos: int(n[0]) for pos, n in cache.cached_tokens().items()}
    theirs = {pos: int(buf.count[0]) for pos, buf in ref_cache.buffers.items()}
    assert ours == theirs
    if cfg.routing == "expert_choice" and not cfg.kv_sharing:   # recursion-wise: later steps cache fewer
        assert min(ours.values()) < 20
