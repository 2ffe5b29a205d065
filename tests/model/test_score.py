"""Loglikelihood scoring (model/inference/score.py): each request's score equals a direct sum of token
log-probabilities from a plain forward pass with causal routing over that request alone, whatever the batch,
padding and order; a multiple-choice accuracy computed from the scores equals one computed by hand."""
from __future__ import annotations

import pytest
import torch

from model.inference.score import score
from model.mor import MoRModel
from tests.model.helpers import tiny


def _model(**kw) -> MoRModel:
    torch.manual_seed(0)
    return MoRModel(tiny(init_std=0.1, max_seq_len=32, **kw)).eval()


def _direct(model: MoRModel, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = (context + continuation)[-(model.cfg.max_seq_len + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), causal_routing=True).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    n = len(continuation)
    rows = lp[len(ids) - 1 - n:]
    total = sum(float(rows[j, t]) for j, t in enumerate(ids[-n:]))
    return total, all(int(rows[j].argmax()) == t for j, t in enumerate(ids[-n:]))


def _requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(7):
        c = torch.randint(0, 128, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        k = torch.randint(0, 128, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        out.append((c, k))
    out.append((list(range(40)), [5, 6]))     # longer than max_seq_len: keeps the last tokens
    return out


@pytest.mark.parametrize("kind", [dict(routing="expert_choice"), dict(routing="token_choice", kv_sharing=True),
                                  dict(sharing="none")], ids=["ec", "tc-kv", "vanilla"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_equal_direct_sums_of_log_probabilities(kind, batch_size):
    model = _model(**kind)
    requests = _requests()
    got = score(model, requests, batch_size=batch_size)
    for (context, continuation), s in zip(requests, got):
        total, greedy = _direct(model, context, continuation)
        assert s.logprob == pytest.approx(total, abs=1e-4)
        assert s.greedy == greedy and s.tokens == len(continuation)


def test_a_greedy_continuation_is_flagged():
    model = _model(routing="expert_choice")
    context = [3, 1, 4, 1, 5]
    with torch.no_grad():
        nxt = int(model(torch.tensor([context]), causal_routing=True).logits[0, -1].argmax())
    assert score(model, [(context, [nxt])])[0].greedy
    assert not score(model, [(context, [(nxt + 1) % 128])])[0].greedy


def test_multiple_choice_accuracy_by_hand():
    """Four items of three choices: the chosen answer is the highest score; accuracy = share of items right."""
    model = _model(routing="expert_choice")
    g = torch.Generator().manual_seed(5)
    items = [(torch.randint(0, 128, (6,), generator=g).tolist(),
              [torch.randint(0, 128, (2,), generator=g).tolist() for _ in range(3)], gold) for gold in (0, 1, 2, 0)]
    scores = score(model, [(c, choice) for c, choices, _ in items for choice in choices], batch_size=5)
    by_hand = []
    for i, (c, choices, gold) in enumerate(items):
        direct = [_direct(model, c, choice)[0] for choice in choices]
        by_hand.append(max(range(3), key=lambda j: direct[j]) == gold)
        picked = max(range(3), key=lambda j: scores[3 * i + j].logprob)
        assert picked == max(range(3), key=lambda j: direct[j])
    acc = sum(max(range(3), key=lambda j: scores[3 * i + j].logprob) == gold
              for i, (_, _, gold) in enumerate(items)) / len(items)
    assert acc == sum(by_hand) / len(by_hand)


def test_bad_requests_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="empty continuation"):
        score(model, [([1, 2], [])])
    with pytest.raises(ValueError, match="needs at least one token before it"):
        score(model, [([], [1, 2])])


def test_a_continuation_longer_than_the_window_is_scored_on_what_fits():
    model = _model(routing="expert_choice")
    context, continuation = [1, 2, 3], list(range(10, 50))        # 43 tokens, max_seq_len 32
    got = score(model, [(context, continuation)])[0]
    window = (context + continuation)[-33:]
    total, _ = _direct(model, window[:1], window[1:])
    assert got.tokens == 32 and got.logprob == pytest.approx(total, abs=1e-4)
