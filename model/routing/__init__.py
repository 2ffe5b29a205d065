"""Mixture-of-Recursions routing, one module per variant behind the interface of ``base.Routing``.

    none.py            no router: vanilla and plain recursive models
    expert_choice.py   each recursion step keeps its top-k tokens (hierarchical filtering)
    token_choice.py    each token picks its depth once

The registry is ``model.config.ROUTINGS`` (name -> class); a class's traits (display name, whether its training
routing is already causal, its router activations and defaults, its export name) are read from there by config
validation, validation, the export, the study report, the serving benchmark and the tests' variant matrices.

Adding a variant touches at most four source files: its module here (a ``Routing`` subclass with its traits), a
``register`` line below, and, to export it (``export_name``), the Hugging Face code that runs its causal rule —
pretrain/hf/modeling_mor.py (its entry in ``_ROUTINGS`` and ``_DEFAULTS``) and pretrain/hf/layers_mor.py (its
router module). Add a preset in conf/model to train it by name. Options of its own go into RouterConfig.
"""
from __future__ import annotations

from model.config import ROUTINGS, ModelConfig
from model.routing.base import Op, Routing, RouterHead, StateSpec, Stream
from model.routing.expert_choice import ExpertChoiceRouting
from model.routing.none import NoRouting
from model.routing.token_choice import TokenChoiceRouting


def register(cls: type[Routing]) -> type[Routing]:
    """Add a variant to the registry under ``cls.name`` (a class decorator too)."""
    if not cls.name or cls.name in ROUTINGS and ROUTINGS[cls.name] is not cls:
        raise ValueError(f"routing {cls.name!r}: no name, or the name of another variant")
    ROUTINGS[cls.name] = cls
    return cls


for _cls in (NoRouting, ExpertChoiceRouting, TokenChoiceRouting):
    register(_cls)


def routing_class(cfg: ModelConfig) -> type[Routing]:
    """The class of ``cfg.routing``: for what needs no instance (program, FLOPs, defaults, traits)."""
    return ROUTINGS[cfg.routing]


def build_routing(cfg: ModelConfig) -> Routing:
    return routing_class(cfg)(cfg)


__all__ = ["ROUTINGS", "ExpertChoiceRouting", "NoRouting", "Op", "Routing", "RouterHead", "StateSpec", "Stream",
           "TokenChoiceRouting", "build_routing", "register", "routing_class"]
