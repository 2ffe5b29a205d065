"""What every routing variant implements, and the pieces the variants share.

A variant is an ``nn.Module`` (``MoRModel.router``) that owns all of its routing, so the model, the pipeline
program and the FLOPs counter never branch on ``cfg.routing``:

    config     settings                  alpha, activation and z-loss with the variant's defaults filled in
    program    entry_ops / step_ops      the routing ops around the recursion steps (classmethods: no instance)
               state_after               the state a routing op leaves behind, with shapes, for pipeline stages
               kept_tokens               tokens per step this forward pass keeps (sizes that state)
    forward    run_op(op, state, stats)  run one routing op: select, write back, add losses and statistics
               stream(step, state)       which tokens a layer inside recursion step r runs, at which positions
    FLOPs      step_tokens, router_params, router_flops
    training   begin_step / end_step     once per optimizer step: warm-ups, loss-free balancing
    inference  continues(step, h)        the rule one token applies alone, without seeing the rest of the sequence

The forward state is a ``model.state.ForwardState``: its carried tensors, by name, are ``h`` (the residual stream,
B x T x d) and ``aux`` (router losses so far), the model's, and the variant's own keys; its typed fields (whether
it routes causally, the inference cache, ...) never cross a pipeline stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.state import ForwardState

# key -> (shape, is_integer): the state alive between two ops of the program.
StateSpec = dict[str, tuple[tuple[int, ...], bool]]


@dataclass(frozen=True)
class Op:
    """One op of the forward program: a layer application, or a routing op of the model's variant."""
    kind: str             # "layer", or a variant's routing op (ec_route, ec_merge, tc_route, tc_begin, tc_end)
    step: int = -1        # recursion step (0-based); -1 outside the recursions
    layer: int = -1       # unique layer index, for "layer" ops
    closes: bool = False  # closes a recursion step: stays on the pipeline stage that runs the step's last layer
    pos: int = -1         # "layer" ops: position in the unrolled stack (each has its own KV cache at inference)
    kv_from: int = -1     # recursive KV sharing: attend to the keys/values of the layer op at this position


@dataclass
class Stream:
    """The tokens the layers of one recursion step run on."""
    key: str                                  # the state entry the layers read and write ("h", "x", "y")
    positions: Optional[torch.Tensor] = None  # (B, n) RoPE positions; None: the rows' own positions 0..n-1
    key_active: Optional[torch.Tensor] = None  # (B, n) bool: the keys attention may read; None: all
    index: Optional[torch.Tensor] = None      # (B, n): run on these rows of state[key], scatter the result back


ROUTER_INIT_STD = 0.02


class RouterHead(nn.Module):
    """Linear(d, out) or a small MLP, init N(0, 0.02); always evaluated in fp32.

    fp32 even when the model's parameters are bf16 or autocast is on: in bf16 the gates at initialisation take
    only a few distinct values and most candidates tie with the k-th score, so top-k tie-breaking rather than the
    router would pick the tokens (and differently under another parallel layout).
    """

    def __init__(self, d_model: int, out: int, arch: str, std: float = ROUTER_INIT_STD):
        super().__init__()
        if arch == "linear":
            self.net = nn.Linear(d_model, out, bias=False)
        else:
            self.net = nn.Sequential(nn.Linear(d_model, d_model, bias=False), nn.GELU(),
                                     nn.Linear(d_model, out, bias=False))
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)

    def forward(self, h: torch.Tensor, temperature: float) -> torch.Tensor:
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float() / temperature
            for m in self.net.modules() if isinstance(self.net, nn.Sequential) else [self.net]:
                if isinstance(m, nn.Linear):
                    x = F.linear(x, m.weight.float(), None if m.bias is None else m.bias.float())
                elif isinstance(m, nn.GELU):
                    x = F.gelu(x)
            return x


def head_params(cfg: ModelConfig, out: int) -> int:
    """Parameters of one RouterHead with ``out`` outputs."""
    d = cfg.d_model
    return d * out if cfg.router.arch == "linear" else d * d + d * out


class Routing(nn.Module):
    """The interface. The defaults here are the no-router behaviour (vanilla and plain recursive models)."""

    # A variant's traits: everything else (config validation, validation, export, the study, the serving
    # benchmark, the tests' variant matrices) reads them from the registry (model.config.ROUTINGS).
    name: ClassVar[str]                        # the value of cfg.routing
    display_name: ClassVar[str] = "no router"  # in model cards and reports
    has_router: ClassVar[bool] = False         # False: no router parameters, no routing ops
    # Training routing is already causal (each token decides alone): validation's causal pass would repeat the
    # training-routing pass, so it is skipped (pretrain/training/evaluate.py). Expert-choice's top-k is not.
    causal_already: ClassVar[bool] = True
    router_funcs: ClassVar[tuple[str, ...]] = ()   # the activations router.func may name
    options: ClassVar[frozenset[str]] = frozenset()  # the variant-only config keys it reads (others must stay unset)
    default_alpha: ClassVar[float] = 1.0       # gate scale when router.alpha is unset
    default_z_loss_coef: ClassVar[float] = 0.0
    default_func: ClassVar[Optional[str]] = None  # router activation when router.func is unset
    # The routing of the exported Hugging Face model code (pretrain/hf/modeling_mor.py) that runs this variant's
    # causal rule; None: not exportable yet (the export says so).
    export_name: ClassVar[Optional[str]] = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.nr = cfg.num_recursions
        settings = self.settings(cfg)
        self.alpha, self.func, self.z_coef = settings["alpha"], settings["func"], settings["z_loss_coef"]
        self.temperature = cfg.router.temperature
        self.optimizer_step = 0  # set by begin_step; warm-ups read it in training mode only

    @classmethod
    def settings(cls, cfg: ModelConfig) -> dict:
        """The router settings whose defaults depend on the variant, resolved (pretrain.tools.inspect prints them)."""
        rc = cfg.router
        return {"alpha": rc.alpha if rc.alpha is not None else cls.default_alpha,
                "func": rc.func or cls.default_func,
                "z_loss_coef": rc.z_loss_coef if rc.z_loss_coef is not None else cls.default_z_loss_coef}

    # ---- the program (no instance needed) -------------------------------------------------------------------
    @classmethod
    def entry_ops(cls, cfg: ModelConfig) -> list[Op]:
        """Routing ops between the prelude and the first recursion step."""
        return []

    @classmethod
    def step_ops(cls, cfg: ModelConfig, step: int) -> tuple[list[Op], list[Op]]:
        """Routing ops that open and close recursion step ``step`` (around its layers)."""
        return [], []

    @classmethod
    def state_after(cls, cfg: ModelConfig, op: Op, spec: StateSpec, batch: int, seq_len: int,
                    kept: Sequence[int], causal: bool = False) -> None:
        """Update ``spec`` in place to the state alive after routing op ``op``; ``kept`` as kept_tokens();
        ``causal``: in a forward pass with causal routing."""

    @classmethod
    def stream_len(cls, cfg: ModelConfig, step: int, seq_len: int, kept: Sequence[int], causal: bool) -> int:
        """Rows of the stream the layers of recursion ``step`` run on (sizes shared keys/values between stages)."""
        return seq_len

    @classmethod
    def max_kept_tokens(cls, cfg: ModelConfig, seq_len: int) -> list[int]:
        """The largest kept_tokens() of any forward pass of the run: sizes the pipeline's buffers."""
        return [seq_len] * cfg.num_recursions

    def kept_tokens(self, seq_len: int) -> list[int]:
        """Tokens per sequence that each recursion step keeps in this forward pass (sizes the routing state)."""
        return self.max_kept_tokens(self.cfg, seq_len)

    # ---- FLOPs (model/flops.py) -------------------------------------------------------------------------------
    @classmethod
    def step_tokens(cls, cfg: ModelConfig, seq_len: int, n_steps: int,
                    depth_loads: Optional[Sequence[float]] = None) -> list[float]:
        """Tokens that recursion step r runs on, for each of the ``n_steps`` steps."""
        return [float(seq_len)] * n_steps

    @classmethod
    def router_params(cls, cfg: ModelConfig) -> int:
        return 0

    @classmethod
    def router_flops(cls, cfg: ModelConfig, seq_len: int, step_tokens: Sequence[float]) -> float:
        """Forward FLOPs of the routers over one sequence."""
        return 0.0

    # ---- the forward pass -------------------------------------------------------------------------------------
    def run_op(self, op: Op, s: ForwardState, stats: dict) -> Optional[dict[str, torch.Tensor]]:
        """Run routing op ``op`` on the state ``s`` in place; add per-step statistics (detached scalars) to
        ``stats``. Returns the tensors that MoRModel.trace records for a closed recursion step, if any."""
        raise NotImplementedError(f"routing={self.name} has no routing op {op.kind}")

    def stream(self, step: int, s: ForwardState, compact: bool) -> Stream:
        """The stream a layer of recursion step ``step`` runs on. ``compact`` False: the same tokens as full rows
        with a key mask instead of a gathered subsequence (sequence parallelism scatters whole rows)."""
        return Stream("h")

    # ---- once per optimizer step ------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Before the micro-batches of optimizer step ``step`` (0-based count of steps already taken)."""
        self.optimizer_step = step

    def end_step(self, applied: bool = True) -> dict[str, float]:
        """After the optimizer step (on every rank; may be collective). ``applied`` False: a skipped step."""
        return {}

    # ---- inference --------------------------------------------------------------------------------------------
    def continues(self, step: int, h: torch.Tensor) -> torch.Tensor:
        """Whether each token of ``h`` (..., d) runs recursion step ``step`` (0-based), decided per token."""
        return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)

    # One token at a time, each row at its own step (the serving engine, model/inference/engine.py): the same
    # arithmetic as causal routing in the forward pass, for rows h (n, d) whose steps ``step`` (n,) differ.
    def token_enter(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token routing state taken as the token enters the first recursion (rows of the returned tensors
        follow h's)."""
        return {}

    def token_runs(self, step: torch.Tensor, h: torch.Tensor, st: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(runs (n,) bool, gate (n,)): whether each token, having run the steps before ``step``, runs it."""
        return torch.ones_like(step, dtype=torch.bool), torch.ones_like(step, dtype=torch.float32)

    def token_update(self, step: torch.Tensor, h: torch.Tensor, y: torch.Tensor, st: dict[str, torch.Tensor],
                     gate: torch.Tensor) -> torch.Tensor:
        """The stream after a token ran ``step``: h before, y the block's output."""
        return y


def all_reduce_over_replicas(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the pipeline stages and the data-parallel replicas (no-op in a single process).

    Every stage holds a copy of the routers; summing over the pipeline group too (a stage that runs no router
    contributes zeros) keeps per-step router state such as the loss-free bias identical on every rank.
    """
    from megatron.core import parallel_state as ps  # imported here: flops/inspect import this module without it

    if ps.model_parallel_is_initialized():
        if ps.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(x, group=ps.get_pipeline_model_parallel_group())
        if ps.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(x, group=ps.get_data_parallel_group())
    return x
