"""Routing options against hand-computed values: router activation, capacity and balancing warm-ups, alpha in the
balancing loss, loss-free balancing, the per-optimizer-step hooks, the inference rule, and the switches that must
stay off until causal inference exists."""
from __future__ import annotations

import math

import pytest
import torch

from conf.errors import ConfigError
from model.config import RouterConfig
from model.mor import MoRModel
from model.program import packed_rows, stage_ranges, state_spec
from model.routing import Op
from model.routing.expert_choice import ExpertChoiceRouting
from model.routing.none import NoRouting
from model.routing.token_choice import TokenChoiceRouting
from model.state import ForwardState
from tests.model.helpers import tiny

E = math.e


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def states(rows: list[list[float]], d: int = 32) -> torch.Tensor:
    """Hidden states (1, T, d) whose first len(row) features are ``rows``: with feature_router() these are the
    router logits."""
    h = torch.zeros(1, len(rows), d)
    h[0, :, :len(rows[0])] = torch.tensor(rows)
    return h


def token_choice(**router) -> TokenChoiceRouting:
    """A token-choice routing whose logits are the first three features of its input."""
    routing = TokenChoiceRouting(tiny(routing="token_choice", router=RouterConfig(**router)))
    with torch.no_grad():
        routing.router.net.weight.zero_()
        routing.router.net.weight[:, :3] = torch.eye(3)
    return routing


def expert_choice(**router) -> ExpertChoiceRouting:
    """An expert-choice routing whose logit at every step is the first feature of its input."""
    routing = ExpertChoiceRouting(tiny(router=RouterConfig(**router)))
    with torch.no_grad():
        for head in routing.routers:
            head.net.weight.zero_()
            head.net.weight[0, 0] = 1.0
    return routing


def close(tensor: torch.Tensor, values) -> bool:
    return torch.allclose(tensor, torch.tensor(values, dtype=torch.float32), rtol=1e-6, atol=1e-7)


# ---- router activation ------------------------------------------------------------------------------------------
def test_expert_choice_tanh_gate_keeps_the_top_k_of_alpha_tanh_and_bce_reads_raw_logits():
    routing = expert_choice(func="tanh")
    h = states([[2.0], [-1.0], [0.5], [3.0]])
    step = routing.select(0, h, k=2)
    assert step.sel.tolist() == [[0, 3]]
    assert close(step.gate, [[0.1 * math.tanh(2.0), 0.1 * math.tanh(3.0)]])
    bce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))
           + math.log1p(math.exp(-3.0))) / 4   # targets 1, 0, 0, 1 on the logits themselves
    assert close(routing.losses(0, step, None)["bce"], 0.001 * bce)


def test_token_choice_sigmoid_scores_each_depth_alone():
    routing = token_choice(func="sigmoid", alpha=0.5)
    out = routing.route(states([[2, 0, 0], [0, 1, 0], [0, 3, 0], [-1, -2, -3]]))
    assert out.depth.tolist() == [[1, 2, 2, 1]]
    assert close(out.gate, [[0.5 * sig(2), 0.5 * sig(1), 0.5 * sig(3), 0.5 * sig(-1)]])
    assert close(out.probs[0, 0], [sig(2), 0.5, 0.5])  # not normalised over depths


# ---- alpha in the balancing loss, loss-free choice ------------------------------------------------------------
def test_token_choice_balance_loss_importance_includes_alpha():
    routing = token_choice(alpha=0.5)
    rows = [[2, 0, 0], [0, 1, 0], [0, 3, 0], [0, 0, 0]]
    out = routing.route(states(rows))
    assert out.depth.tolist() == [[1, 2, 2, 1]]
    p = [softmax(r) for r in rows]
    assert close(out.gate, [[0.5 * p[0][0], 0.5 * p[1][1], 0.5 * p[2][1], 0.5 / 3]])
    importance = [sum(0.5 * pt[i] for pt in p) / 4 for i in range(3)]   # P_i = mean_t alpha * p_t,i
    f = [0.5, 0.5, 0.0]
    assert close(routing.losses(out)["balance"], 0.1 * 3 * sum(fi * pi for fi, pi in zip(f, importance)))


def test_loss_free_bias_is_added_to_alpha_p_and_the_gate_stays_unbiased():
    routing = token_choice(alpha=0.5, balance="loss_free")
    routing.bias_steps.copy_(torch.tensor([0, 200, 0]))   # b = (0, 0.2, 0)
    p = softmax([1.0, 0.0, 0.0])                           # alpha * p + b = (0.288, 0.306, 0.106): depth 2
    out = routing.route(states([[1.0, 0.0, 0.0]]))         # p + b = (0.576, 0.412, 0.212) would pick depth 1
    assert out.depth.tolist() == [[2]]
    assert close(out.gate, [[0.5 * p[1]]])


# ---- capacity warm-up ---------------------------------------------------------------------------------------------
def test_capacity_warmup_follows_the_cosine_in_training_only():
    routing = ExpertChoiceRouting(tiny(router=RouterConfig(cap_warmup_step=100)))  # c_r = 1, 2/3, 1/3
    t = 24
    expected = {0: [24, 24, 24],
                25: [24, 22, 21],    # extra = (1 + cos(pi/4))/2 = 0.8536: c = 0.9512, 0.9024
                50: [24, 20, 16],    # extra = 1/2: c = 5/6, 2/3
                100: [24, 16, 8], 150: [24, 16, 8]}
    for step, ks in expected.items():
        routing.begin_step(step)
        assert routing.kept_tokens(t) == ks, step
    routing.eval()
    routing.begin_step(0)
    assert routing.kept_tokens(t) == [24, 16, 8]
    assert ExpertChoiceRouting.max_kept_tokens(routing.cfg, t) == [24, 24, 24]


def test_capacity_warmup_reaches_the_forward_pass():
    model = MoRModel(tiny(router=RouterConfig(cap_warmup_step=100)))
    model.begin_step(50)
    model.trace = []
    x = torch.randint(0, 128, (2, 25))
    out = model(x[:, :-1], x[:, 1:])
    assert [tuple(s["idx"].shape) for s in model.trace] == [(2, 24), (2, 20), (2, 16)]
    assert out.router_stats["r2/kept_frac"].item() == pytest.approx(20 / 24)
    model.eval()
    model.trace = []
    model(x[:, :-1])
    assert [s["idx"].shape[1] for s in model.trace] == [24, 16, 8]


def _pipeline_loss(cfg, full: MoRModel, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 0 then stage 1 of a 2-stage split in this process, with ``full``'s weights: (packed, loss)."""
    weights = full.state_dict()
    stages = [MoRModel(cfg, pp_rank=r, pp_size=2) for r in range(2)]
    for stage in stages:
        stage.load_state_dict({k: weights[k] for k in stage.state_dict()})
        stage.begin_step(step)
    packed = stages[0](x[:, :-1], x[:, 1:])
    stages[1].set_input_tensor(packed)
    return packed, stages[1](x[:, :-1], x[:, 1:]).loss


@pytest.mark.parametrize("step", [0, 5])
def test_pipeline_split_equals_the_full_model_during_capacity_warmup(step):
    cfg = tiny(nr=2, n_layers=10, router=RouterConfig(cap_warmup_step=10, capacities=[0.5, 0.25]))
    b, t = 2, 24
    # The cut falls inside recursion step 1, so the kept tokens cross it: 24, 18 of them at steps 0, 5 (12
    # after the warm-up). Each side must size them alike.
    cut = stage_ranges(cfg, 2, t)[0][1]
    assert state_spec(cfg, cut, b, t)["idx"] == ((b, t), True)
    full = MoRModel(cfg)
    full.begin_step(step)
    x = torch.randint(0, 128, (b, t + 1))
    packed, loss = _pipeline_loss(cfg, full, x, step)
    assert packed.shape[0] == packed_rows(cfg, 2, b, t)   # sized for every token kept
    torch.testing.assert_close(loss, full(x[:, :-1], x[:, 1:]).loss, rtol=1e-6, atol=0)


# ---- balancing warm-up --------------------------------------------------------------------------------------------
def test_balancing_warmup_forces_depth_nr_with_the_unbiased_gate_and_holds_the_bias_at_zero():
    routing = token_choice(alpha=0.5, balance="loss_free", bal_warmup_step=3)
    rows = [[2, 0, 0], [0, 1, 0], [0, 3, 0], [0, 0, 0]]
    h = states(rows)
    routing.bias_steps.copy_(torch.tensor([5, -5, 0]))
    routing.begin_step(0)
    out = routing.route(h)
    assert out.depth.tolist() == [[3, 3, 3, 3]]
    assert close(out.gate, [[0.5 * softmax(r)[2] for r in rows]])
    routing.run_op(Op("tc_route"), ForwardState({"h": h, "aux": torch.zeros(())}), {})
    stats = routing.end_step()
    assert routing.bias_steps.tolist() == [0, 0, 0]      # reset, and not moved by the all-depth-3 load
    assert stats["load/d3"] == 1.0 and stats["bias/d1"] == 0.0
    routing.eval()                                       # eval ignores the warm-up
    assert routing.route(h).depth.tolist() == [[1, 2, 2, 1]]
    routing.train()
    routing.begin_step(3)                                # warm-up over: chosen depths, and the bias moves
    routing.run_op(Op("tc_route"), ForwardState({"h": h, "aux": torch.zeros(())}), {})
    routing.end_step()
    assert routing.bias_steps.tolist() == [-1, -1, 1]    # loads (2, 2, 0), mean 4/3


def test_balancing_loss_during_warmup_counts_the_forced_depths():
    routing = token_choice(alpha=0.5, bal_warmup_step=3)
    rows = [[2, 0, 0], [0, 1, 0], [0, 3, 0], [0, 0, 0]]
    routing.begin_step(1)
    out = routing.route(states(rows))
    importance3 = sum(0.5 * softmax(r)[2] for r in rows) / 4   # f = (0, 0, 1)
    assert close(routing.losses(out)["balance"], 0.1 * 3 * importance3)


# ---- once per optimizer step ------------------------------------------------------------------------------------
def one_hot_rows(depths: list[int]) -> list[list[float]]:
    return [[1.0 if i == d - 1 else 0.0 for i in range(3)] for d in depths]


def test_end_step_moves_the_bias_by_the_load_summed_over_micro_batches():
    routing = token_choice(balance="loss_free")
    routing.begin_step(0)
    for depths in ([1, 1, 1, 1, 1, 2], [2, 2, 3, 3, 3, 3]):     # loads (5, 1, 0) then (0, 2, 4)
        routing.run_op(Op("tc_route"), ForwardState({"h": states(one_hot_rows(depths)), "aux": torch.zeros(())}), {})
    stats = routing.end_step()
    # summed (5, 3, 4), mean 4: signs (-1, +1, 0); the last micro-batch alone would give (+1, 0, -1)
    assert routing.bias_steps.tolist() == [-1, 1, 0]
    assert stats == pytest.approx({"bias/d1": -0.001, "bias/d2": 0.001, "bias/d3": 0.0,
                                   "load/d1": 5 / 12, "load/d2": 3 / 12, "load/d3": 4 / 12})
    assert routing.end_step()["load/d1"] == 0.0 and routing.bias_steps.tolist() == [-1, 1, 0]  # accumulator reset


def test_only_training_forwards_with_grad_count_towards_the_load():
    routing = token_choice(balance="loss_free")
    s = {"h": states(one_hot_rows([1, 1, 1, 2])), "aux": torch.zeros(())}
    with torch.no_grad():
        routing.run_op(Op("tc_route"), ForwardState(dict(s)), {})
    routing.eval()
    routing.run_op(Op("tc_route"), ForwardState(dict(s)), {})
    routing.end_step()
    assert routing.bias_steps.tolist() == [0, 0, 0]
    routing.train()
    routing.run_op(Op("tc_route"), ForwardState(dict(s)), {})
    assert routing.end_step(applied=False) == {} and routing.bias_steps.tolist() == [0, 0, 0]  # skipped step
    assert routing.end_step()["load/d1"] == 0.0 and routing.bias_steps.tolist() == [0, 0, 0]  # its load dropped


def test_model_hooks_delegate_to_the_routing():
    model = MoRModel(tiny(routing="token_choice", router=RouterConfig(balance="loss_free")))
    model.begin_step(7)
    assert model.router.optimizer_step == 7
    depth = []
    for _ in range(2):
        x = torch.randint(0, 128, (2, 17))
        model.trace = []
        model(x[:, :-1], x[:, 1:]).loss.backward()
        depth.append(model.trace[0]["depth"])
    counts = torch.bincount(torch.cat(depth).flatten() - 1, minlength=3).float()
    stats = model.end_step()
    assert stats["load/d1"] == pytest.approx((counts[0] / counts.sum()).item())
    assert model.router.bias_steps.tolist() == torch.sign(counts.mean() - counts).long().tolist()
    assert MoRModel(tiny()).end_step() == {} and MoRModel(tiny(sharing="none")).end_step() == {}


# ---- inference rule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", ["sigmoid", "tanh"])
def test_expert_choice_token_continues_iff_its_logit_is_non_negative(func):
    routing = expert_choice(func=func)
    with torch.no_grad():
        routing.routers[0].net.weight.zero_()             # step 0: logit 0 everywhere, G(0) is the threshold
    h = states([[-1.0], [0.0], [2.0], [-0.01]])
    assert routing.continues(1, h).tolist() == [[False, True, True, False]]
    assert routing.continues(0, h).all()


def test_token_choice_token_continues_while_its_depth_exceeds_the_step():
    routing = token_choice(balance="loss_free")
    h1 = states([[2, 0, 0], [0, 1, 0], [0, 0, 3], [0, 0, 0]])   # depths 1, 2, 3, 1
    assert routing.continues(0, h1).all()
    assert routing.continues(1, h1).tolist() == [[False, True, True, False]]
    assert routing.continues(2, h1).tolist() == [[False, False, True, False]]
    routing.bias_steps.copy_(torch.tensor([0, 0, 1000]))        # b_3 = 1: every token to depth 3
    assert routing.continues(2, h1).all()


def test_without_router_every_token_continues():
    assert NoRouting(tiny(routing="none")).continues(2, torch.zeros(2, 5, 32)).tolist() == [[True] * 5] * 2


# ---- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(routing="token_choice", router=RouterConfig(aux_router=True)),
     "router.aux_router: the auxiliary router predicts expert-choice decisions; leave it false for other routings"),
    (dict(router=RouterConfig(aux_router_coef=-1.0)), "router.aux_router_coef: must be >= 0"),
    (dict(nr=1, routing="none", kv_sharing=True), "kv_sharing: recursive KV sharing reuses the first recursion's "),
    (dict(router=RouterConfig(func="softmax")), "router.func: 'softmax' is not an activation of "
                                                "routing=expert_choice; choose from sigmoid, tanh"),
    (dict(routing="token_choice", router=RouterConfig(func="tanh")),
     "router.func: 'tanh' is not an activation of routing=token_choice; choose from softmax, sigmoid"),
    (dict(routing="none", router=RouterConfig(func="sigmoid")), "router.func: "),
    (dict(router=RouterConfig(cap_warmup_step=-1)), "router.cap_warmup_step: must be >= 0"),
    (dict(routing="token_choice", router=RouterConfig(cap_warmup_step=10)), "router.cap_warmup_step: "),
    (dict(router=RouterConfig(bal_warmup_step=10)), "router.bal_warmup_step: "),
])
def test_invalid_routing_options_are_one_line_config_errors(kw, message):
    with pytest.raises(ConfigError) as err:
        tiny(**kw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
