"""The routing registry (model.config.ROUTINGS): every trait of a variant lives on its class, the tables that must
repeat them elsewhere (the exported Hugging Face code cannot import the project) agree with the classes, and a
variant registered in a test is picked up by the export, causality and decode matrices without an edit
elsewhere — and passes them."""
from __future__ import annotations

import dataclasses

import pytest

from conf.errors import ConfigError
from model.config import ROUTINGS, ModelConfig, RouterConfig
from model.routing import ExpertChoiceRouting, NoRouting, TokenChoiceRouting
from tests.model.helpers import SHARINGS, tiny
from tests.model.variants import matrix, registered


class SharpExpertChoice(ExpertChoiceRouting):
    """A throwaway variant: expert-choice with a larger default gate scale, run by the export as expert-choice."""
    name = "test_sharp_expert_choice"
    display_name = "sharp expert-choice routing (a test's)"
    default_alpha = 0.5


def test_the_three_routings_are_registered_with_their_traits():
    assert ROUTINGS == {"none": NoRouting, "expert_choice": ExpertChoiceRouting, "token_choice": TokenChoiceRouting}
    assert [c.causal_already for c in ROUTINGS.values()] == [True, False, True]
    assert all(c.export_name == c.name for c in ROUTINGS.values())


def test_an_unknown_routing_is_one_line_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"^routing: 'top_p' is not a routing; choose from none, expert_choice, "
                                          r"token_choice$"):
        tiny(routing="top_p")
    with registered(SharpExpertChoice):
        assert tiny(routing=SharpExpertChoice.name).routing == SharpExpertChoice.name
        with pytest.raises(ConfigError, match="router.func: 'softmax' is not an activation"):
            tiny(routing=SharpExpertChoice.name, router=RouterConfig(func="softmax"))
    with pytest.raises(ConfigError):
        tiny(routing=SharpExpertChoice.name)    # gone again


def test_the_hugging_face_defaults_tables_match_the_config_classes():
    pytest.importorskip("transformers")
    from pretrain.hf import configuration_mor, modeling_mor
    router = {f.name: f.default for f in dataclasses.fields(RouterConfig)}
    assert configuration_mor.ROUTER_DEFAULTS == router    # the variant-dependent ones are None in both
    hf = configuration_mor.MoRConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("name", "router"):
            assert getattr(hf, f.name) == f.default, f.name
    exported = {c.export_name: c for c in ROUTINGS.values() if c.export_name is not None}
    assert set(modeling_mor._ROUTINGS) == set(exported) == set(modeling_mor._DEFAULTS)
    for name, cls in exported.items():
        assert modeling_mor._DEFAULTS[name] == {"alpha": cls.default_alpha, "func": cls.default_func}, name


@pytest.mark.slow
def test_a_variant_registered_in_a_test_is_in_every_matrix_and_passes_it(tmp_path):
    from tests.model.test_causal_routing import CASES, check_causal
    from tests.model.test_decode import check_caches, check_decode
    before = set(matrix())
    with registered(SharpExpertChoice):
        new = {k: v for k, v in matrix().items() if k not in before}
        assert sorted(new) == sorted([f"{SharpExpertChoice.name}-{s}" for s in SHARINGS]
                                     + [f"{SharpExpertChoice.name}-middle_cycle-kv"])
        # The checks themselves run on its middle-cycle cases, with and without KV sharing: under every other
        # sharing the variant runs expert-choice's code, which the matrix tests run under every sharing already.
        run = {k: v for k, v in new.items() if "middle_cycle" in k}
        assert len(run) == 2
        for case, variant in run.items():
            check_causal(variant)
            check_decode(variant)
            check_caches(variant)
        if pytest.importorskip("transformers") and pytest.importorskip("safetensors"):
            from tests.pretrain.test_export_variants import check_export
            for case, variant in run.items():
                check_export(variant, tmp_path / case)
    assert set(matrix()) == before and not any(SharpExpertChoice.name in k for k in CASES)


def test_a_variant_without_an_export_is_refused_by_the_export_in_one_line(tmp_path):
    pytest.importorskip("transformers")
    from model.mor import MoRModel
    from pretrain.export import write_export

    class Unexported(ExpertChoiceRouting):
        name = "test_unexported"
        export_name = None

    with registered(Unexported):
        cfg = tiny(routing=Unexported.name)
        with pytest.raises(ConfigError, match=r"^routing: test_unexported has no Hugging Face implementation yet"):
            write_export(MoRModel(cfg), cfg, tmp_path / "m")
    assert not (tmp_path / "m").exists()
