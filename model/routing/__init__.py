"""Mixture-of-Recursions routing, one module per variant behind the interface of ``base.Routing``.

    none.py            no router: vanilla and plain recursive models
    expert_choice.py   each recursion step keeps its top-k tokens (hierarchical filtering)
    token_choice.py    each token picks its depth once

Adding a variant: a module with a ``Routing`` subclass, an entry in ``VARIANTS``, its name in
``model.config.Routing`` and ``ROUTER_FUNCS`` (and any validation there), and a preset in conf/model.
"""
from __future__ import annotations

from model.config import ModelConfig
from model.routing.base import Op, Routing, RouterHead, StateSpec, Stream
from model.routing.expert_choice import ExpertChoiceRouting
from model.routing.none import NoRouting
from model.routing.token_choice import TokenChoiceRouting

VARIANTS: dict[str, type[Routing]] = {cls.name: cls for cls in (NoRouting, ExpertChoiceRouting, TokenChoiceRouting)}


def routing_class(cfg: ModelConfig) -> type[Routing]:
    """The class of ``cfg.routing``: for what needs no instance (program, FLOPs, defaults)."""
    return VARIANTS[cfg.routing]


def build_routing(cfg: ModelConfig) -> Routing:
    return routing_class(cfg)(cfg)


__all__ = ["VARIANTS", "ExpertChoiceRouting", "NoRouting", "Op", "Routing", "RouterHead", "StateSpec", "Stream",
           "TokenChoiceRouting", "build_routing", "routing_class"]
