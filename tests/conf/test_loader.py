"""Tests for conf.loader: presets, inherit, overrides, strict typing and located one-line errors."""
from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

import conf
from conf import PRESET_DIR, ConfigError, cli_errors, config_to_dict, dump_yaml, list_presets, split_cli
from model.config import ModelConfig

REPO = Path(__file__).resolve().parents[2]
# Most of these tests load model presets; conf/ knows no schema of its own, so they name the model's.
load_config = functools.partial(conf.load_config, schema=ModelConfig)
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
SCALES = ["tiny", "135m", "360m", "730m", "1b7"]
VARIANTS = ["vanilla", "recursive", "mor_ec", "mor_tc", "mor_ec_kvshare"]


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in tmp_path so that error messages name files as 'x.yaml'."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(REPO)
    return REPO


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def line_of(path: Path, key: str) -> int:
    """1-based line on which `key:` is set in a file."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(f"{key}:"):
            return i
    raise AssertionError(f"{key} not in {path}")


# A small schema of our own (get_type_hints needs it at module level).
@dataclass
class Stage:
    steps: int
    lr: float = 1e-3


@dataclass
class Schedule:
    name: str
    stages: list[Stage] = field(default_factory=list)
    note: Optional[str] = None


# ---- presets --------------------------------------------------------------------------------------------------
def test_all_presets_present() -> None:
    assert sorted(p.stem for p in PRESETS) == sorted(f"{s}_{v}" for s in SCALES for v in VARIANTS)
    assert list_presets() == sorted(p.stem for p in PRESETS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_loads_and_validates(path: Path) -> None:
    assert path.read_text().startswith("# "), "each preset starts with a comment saying what it is"
    cfg = load_config(path.stem)
    assert isinstance(cfg, ModelConfig)
    assert cfg.name == path.stem
    assert cfg.validate() is cfg
    assert load_config(path) == cfg  # by path as well as by name
    variant = path.stem.split("_", 1)[1]
    assert (cfg.sharing, cfg.num_recursions) == (("none", 1) if variant == "vanilla" else ("middle_cycle", 3))
    assert cfg.routing == {"mor_ec": "expert_choice", "mor_ec_kvshare": "expert_choice",
                           "mor_tc": "token_choice"}.get(variant, "none")
    assert cfg.kv_sharing is (variant == "mor_ec_kvshare")


@pytest.mark.parametrize("scale,vanilla_layers,mor_layers,d_model,heads,kv_heads,ffn,vocab,seq", [
    ("135m", 30, 32, 576, 9, 3, 1536, 49152, 2048),
    ("360m", 32, 32, 960, 15, 5, 2560, 49152, 2048),
    ("730m", 26, 26, 1536, 24, 8, 4096, 49152, 2048),
    ("1b7", 24, 26, 2048, 32, 32, 8192, 49152, 2048),
    ("tiny", 8, 8, 64, 4, 2, 160, 512, 128),
])
def test_preset_shapes(scale, vanilla_layers, mor_layers, d_model, heads, kv_heads, ffn, vocab, seq) -> None:
    for variant in VARIANTS:
        cfg = load_config(f"{scale}_{variant}")
        assert cfg.n_layers == (vanilla_layers if variant == "vanilla" else mor_layers), variant
        assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden) == (d_model, heads, kv_heads, ffn)
        assert (cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings) == (vocab, seq, True)


# ---- inheritance ----------------------------------------------------------------------------------------------
def test_inherit_merges_and_child_wins(in_tmp: Path) -> None:
    write(in_tmp / "base.yaml", """
        name: base
        n_layers: 8
        d_model: 64
        n_heads: 4
        n_kv_heads: 2
        router:
          alpha: 0.3
          gating: residual
          capacities: [1.0, 0.5, 0.25]
        """)
    write(in_tmp / "child.yaml", """
        inherit: base.yaml
        name: child
        sharing: middle_cycle
        num_recursions: 2
        router:
          alpha: 0.5
          capacities: [1.0, 0.5]
        """)
    cfg = load_config("child.yaml")
    assert cfg.name == "child"
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (8, 64, 4, 2)  # from the parent
    assert cfg.router.alpha == 0.5  # child wins inside a nested mapping ...
    assert cfg.router.gating == "residual"  # ... which merges key by key
    assert cfg.router.capacities == [1.0, 0.5]  # lists are replaced, not merged


def test_inherit_list_later_parent_wins_and_paths_are_relative_to_file(in_tmp: Path) -> None:
    write(in_tmp / "parents/a.yaml", "name: a\nn_layers: 8\n")
    write(in_tmp / "parents/b.yaml", "name: b\nd_model: 64\nn_heads: 4\nn_kv_heads: 4\n")
    write(in_tmp / "runs/deep/c.yaml", "inherit: [../../parents/a.yaml, ../../parents/b.yaml]\nffn_hidden: 128\n")
    cfg = load_config("runs/deep/c.yaml")
    assert (cfg.name, cfg.n_layers, cfg.d_model, cfg.ffn_hidden) == ("b", 8, 64, 128)


def test_inherit_cycle(in_tmp: Path) -> None:
    write(in_tmp / "a.yaml", "inherit: b.yaml\nname: a\n")
    write(in_tmp / "b.yaml", "name: b\ninherit: a.yaml\n")
    assert error_of("a.yaml") == "b.yaml:2: inherit: cycle a.yaml -> b.yaml -> a.yaml"
    write(in_tmp / "self.yaml", "inherit: self.yaml\n")
    assert error_of("self.yaml") == "self.yaml:1: inherit: cycle self.yaml -> self.yaml"


def test_inherit_missing_parent(in_tmp: Path) -> None:
    write(in_tmp / "a.yaml", "name: a\ninherit: nope.yaml\n")
    assert error_of("a.yaml") == "a.yaml:2: inherit: file not found: nope.yaml"


def test_section_selects_sub_mapping(in_tmp: Path) -> None:
    write(in_tmp / "run.yaml", """
        steps: 1000
        model:
          n_layers: 8
          d_model: 64
          n_heads: 4
          n_kv_heads: 4
        """)
    cfg = load_config("run.yaml", ["n_layers=4"], section="model")
    assert (cfg.n_layers, cfg.d_model) == (4, 64)
    # Without the section the run-level key is an unknown model key; a file lacking the section is used whole.
    assert error_of("run.yaml").startswith("run.yaml:1: steps: unknown key")
    write(in_tmp / "flat.yaml", "n_layers: 6\n")
    assert load_config("flat.yaml", section="model").n_layers == 6


# ---- overrides ------------------------------------------------------------------------------------------------
def test_overrides_change_values_and_nested_values() -> None:
    cfg = load_config("tiny_mor_ec", ["num_recursions=2", "n_layers=6", "router.alpha=1",
                                      "router.capacities=[1,0.5]", "name=exp 1", "router.z_loss_coef=1e-5"])
    assert (cfg.num_recursions, cfg.n_layers, cfg.name) == (2, 6, "exp 1")
    assert cfg.router.alpha == 1.0 and isinstance(cfg.router.alpha, float)  # int accepted for float, converted
    assert cfg.router.capacities == [1.0, 0.5] and all(isinstance(c, float) for c in cfg.router.capacities)
    assert cfg.router.z_loss_coef == 1e-5  # YAML 1.1 would read 1e-5 as a string
    assert cfg.router.gating == "weighted"  # untouched sibling keeps its default
    assert load_config("tiny_mor_ec").num_recursions == 3  # nothing leaks between loads


def test_override_mapping_merges_and_later_override_wins() -> None:
    cfg = load_config("tiny_mor_ec", ["router={alpha: 0.2, gating: residual}", "router.alpha=0.7"])
    assert (cfg.router.alpha, cfg.router.gating, cfg.router.arch) == (0.7, "residual", "linear")


@pytest.mark.parametrize("override", ["num_recursions", "=3", " =3", "router..alpha=1", ".alpha=1", "alpha.=1"])
def test_malformed_override(override: str) -> None:
    assert error_of("tiny_vanilla", [override]).startswith(f"override {override!r}: malformed override")


def test_override_with_invalid_yaml_value() -> None:
    assert error_of("tiny_vanilla", ["name=[1,"]).startswith("override 'name=[1,': value is not valid YAML")


# ---- unknown keys and types -----------------------------------------------------------------------------------
def test_unknown_top_level_key(in_tmp: Path) -> None:
    write(in_tmp / "x.yaml", "name: x\nn_layers: 8\nn_layer: 4\n")
    assert error_of("x.yaml") == "x.yaml:3: n_layer: unknown key (did you mean 'n_layers'?)"


def test_unknown_nested_key(in_tmp: Path) -> None:
    write(in_tmp / "x.yaml", "inherit: base.yaml\nname: x\nrouter:\n  gating: weighted\n  alpa: 0.2\n")
    write(in_tmp / "base.yaml", "n_layers: 8\n")
    assert error_of("x.yaml") == "x.yaml:5: router.alpa: unknown key (did you mean 'alpha'?)"


def test_unknown_key_in_preset_and_override(in_repo: Path) -> None:
    assert (error_of("tiny_mor_ec", ["router.alpa=1"])
            == "override 'router.alpa=1': router.alpa: unknown key (did you mean 'alpha'?)")
    msg = error_of("tiny_vanilla", ["zzz=1"])
    assert msg.startswith("override 'zzz=1': zzz: unknown key (valid: name, vocab_size,")


def test_wrong_type(in_tmp: Path) -> None:
    write(in_tmp / "x.yaml", "name: x\nn_layers: 8\nn_heads: fifteen\n")
    assert error_of("x.yaml") == "x.yaml:3: n_heads: expected int, got str 'fifteen'"
    assert error_of("tiny_vanilla", ["name=123"]) == "override 'name=123': name: expected str, got int 123"
    assert (error_of("tiny_vanilla", ["d_model=64.0"])
            == "override 'd_model=64.0': d_model: expected int, got float 64.0")


def test_bool_is_not_an_int_nor_a_float(in_tmp: Path) -> None:
    write(in_tmp / "x.yaml", "n_layers: true\n")
    assert error_of("x.yaml") == "x.yaml:1: n_layers: expected int, got bool True"
    assert (error_of("tiny_vanilla", ["rope_theta=false"])
            == "override 'rope_theta=false': rope_theta: expected float, got bool False")
    assert (error_of("tiny_vanilla", ["kv_sharing=1"])
            == "override 'kv_sharing=1': kv_sharing: expected bool, got int 1")


def test_literal_bad_value_lists_options(in_tmp: Path) -> None:
    write(in_tmp / "x.yaml", "name: x\nsharing: midle_cycle\n")
    assert error_of("x.yaml") == ("x.yaml:2: sharing: expected one of 'none', 'cycle', 'sequence', 'middle_cycle', "
                                  "'middle_sequence', got str 'midle_cycle' (did you mean 'middle_cycle'?)")
    assert (error_of("tiny_mor_ec", ["router.gating=7"])
            == "override 'router.gating=7': router.gating: expected one of 'weighted', 'residual', got int 7")


def test_optional_list_and_nested_mapping_types(in_tmp: Path) -> None:
    assert load_config("tiny_mor_ec", ["router.alpha=null"]).router.alpha is None
    assert (error_of("tiny_mor_ec", ["router.capacities=[1, a, 0.5]"])
            == "override 'router.capacities=[1, a, 0.5]': router.capacities[1]: expected float, got str 'a'")
    assert (error_of("tiny_mor_ec", ["router.capacities=0.5"])
            == "override 'router.capacities=0.5': router.capacities: expected list of float, got float 0.5")
    write(in_tmp / "x.yaml", "name: x\nrouter: 3\n")
    assert error_of("x.yaml") == "x.yaml:2: router: expected mapping, got int 3"
    assert error_of("tiny_vanilla", ["num_recursions=null"]).endswith("num_recursions: expected int, got null")


# ---- validate() errors, located -------------------------------------------------------------------------------
def test_validate_error_located_at_override(in_repo: Path) -> None:
    assert (error_of("360m_mor_ec", ["n_kv_heads=4"])
            == "override 'n_kv_heads=4': n_kv_heads: n_heads=15 is not divisible by n_kv_heads=4")
    assert (error_of("360m_mor_ec", ["router.temperature=0"])
            == "override 'router.temperature=0': router.temperature: must be > 0")


def test_validate_error_located_at_file_line(in_repo: Path) -> None:
    # num_recursions=4 breaks n_layers (32 = 2 + 30, 30 not a multiple of 4): the key blamed is n_layers, set in
    # the recursive preset, and the message names the override's value.
    rec = PRESET_DIR / "360m_recursive.yaml"
    msg = error_of("360m_mor_ec", ["num_recursions=4"])
    assert msg.startswith(f"conf/model/360m_recursive.yaml:{line_of(rec, 'n_layers')}: n_layers: 32 layers do not "
                          "fit sharing=middle_cycle with num_recursions=4")
    # A key set in an inherited file points at that file.
    van = PRESET_DIR / "360m_vanilla.yaml"
    assert error_of("360m_mor_ec", ["n_heads=16"]) == (
        f"conf/model/360m_vanilla.yaml:{line_of(van, 'n_kv_heads')}: n_kv_heads: n_heads=16 is not divisible by "
        "n_kv_heads=5")


def test_validate_error_for_key_in_tmp_file_and_default(in_tmp: Path) -> None:
    write(in_tmp / "x.yaml", "name: x\nn_heads: 15\nn_kv_heads: 4\n")
    assert error_of("x.yaml") == "x.yaml:3: n_kv_heads: n_heads=15 is not divisible by n_kv_heads=4"
    # n_kv_heads left at its default (5): blame the top file, without a line.
    write(in_tmp / "y.yaml", "name: y\nn_heads: 16\n")
    assert error_of("y.yaml") == "y.yaml: n_kv_heads: n_heads=16 is not divisible by n_kv_heads=5"
    write(in_tmp / "z.yaml", "inherit: x.yaml\nrouting: token_choice\n")
    assert error_of("z.yaml", ["n_kv_heads=5"]).startswith("z.yaml:2: routing: routing needs a sharing strategy")


# ---- other file and name errors -------------------------------------------------------------------------------
def test_unknown_preset_name_suggests_close_ones(in_repo: Path) -> None:
    msg = error_of("360m_mor_ecc")
    assert msg.startswith("unknown preset '360m_mor_ecc'; closest: 360m_mor_ec, ")
    assert msg.endswith("(presets live in conf/model/)") and msg.count(",") == 4  # five names
    assert error_of("no/such/file.yaml") == "no/such/file.yaml: config file not found"


def test_bad_yaml_duplicate_key_and_non_mapping(in_tmp: Path) -> None:
    write(in_tmp / "bad.yaml", "name: x\nrouter:\n  alpha: [1, 2\n")
    assert error_of("bad.yaml").startswith("bad.yaml:4: invalid YAML: ")
    write(in_tmp / "dup.yaml", "name: x\nn_layers: 4\nn_layers: 6\n")
    assert error_of("dup.yaml") == "dup.yaml:3: n_layers: duplicate key (first set at dup.yaml:2)"
    write(in_tmp / "list.yaml", "- 1\n- 2\n")
    assert error_of("list.yaml") == "list.yaml:1: top level must be a mapping of keys"
    write(in_tmp / "empty.yaml", "# nothing\n")
    assert load_config("empty.yaml") == ModelConfig()


def test_custom_schema_required_keys_and_list_of_dataclasses(in_tmp: Path) -> None:
    write(in_tmp / "s.yaml", "name: s\nstages:\n  - {steps: 10}\n  - {steps: 20, lr: 1}\n")
    sched = load_config("s.yaml", schema=Schedule)
    assert sched == Schedule("s", [Stage(10), Stage(20, 1.0)])
    assert error_of("s.yaml", ["stages=[{lr: 1}]"], schema=Schedule) == (
        "override 'stages=[{lr: 1}]': stages[0].steps: missing required key")
    write(in_tmp / "t.yaml", "stages: []\n")
    assert error_of("t.yaml", schema=Schedule) == "t.yaml: name: missing required key"


# ---- dumping --------------------------------------------------------------------------------------------------
def test_config_to_dict_and_dump_yaml_round_trip(in_tmp: Path) -> None:
    cfg = load_config("360m_mor_ec", ["num_recursions=2", "router.capacities=[1, 0.5]", "router.alpha=0.2"])
    d = config_to_dict(cfg)
    assert type(d) is dict and type(d["router"]) is dict
    assert (d["name"], d["num_recursions"], d["router"]["capacities"]) == ("360m_mor_ec", 2, [1.0, 0.5])
    assert "head_dim" not in d  # properties are derived, not saved
    text = dump_yaml(cfg)
    assert text.startswith("name: 360m_mor_ec\n") and "capacities: [1.0, 0.5]" in text
    (in_tmp / "dumped.yaml").write_text(text)
    assert load_config("dumped.yaml") == cfg


# ---- command-line helpers -------------------------------------------------------------------------------------
def test_cli_errors_subprocess_prints_one_line_and_exits_2() -> None:
    code = ("from conf import cli_errors, load_config\n"
            "from model.config import ModelConfig\n"
            "with cli_errors():\n"
            "    load_config('tiny_mor_ec', ['router.alpa=1'], schema=ModelConfig)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: override 'router.alpa=1': router.alpa: unknown key (did you mean 'alpha'?)\n"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_errors_as_decorator(capsys: pytest.CaptureFixture[str]) -> None:
    @cli_errors()
    def main() -> None:
        load_config("tiny_vanilla", ["n_layers=true"])

    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: override 'n_layers=true': n_layers: expected int, got bool True\n"


def test_cli_errors_leaves_other_exceptions_alone() -> None:
    with pytest.raises(KeyError):
        with cli_errors():
            raise KeyError("not a config error")
    with cli_errors():  # and does nothing when all is well
        assert load_config("tiny_vanilla").n_layers == 8


def test_split_cli() -> None:
    argv = ["--steps", "10", "n_layers=4", "run.yaml", "router.alpha=0.2", "--lr=3e-4", "=3"]
    overrides, others = split_cli(argv)
    assert overrides == ["n_layers=4", "router.alpha=0.2", "=3"]
    assert others == ["--steps", "10", "run.yaml", "--lr=3e-4"]
