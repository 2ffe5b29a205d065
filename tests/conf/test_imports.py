"""megatron-core imported with torch.compile deferred (conf/imports.py): no TorchDynamo at start-up, and a decorated
function compiled as torch.compile would have compiled it, once, at its first call."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conf.imports import lazily

ROOT = Path(__file__).resolve().parents[2]


def test_deferred_compile_compiles_once_at_the_first_call_with_the_options_given():
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    deferred = lazily(fake_compile)

    @deferred
    def double(x):
        return 2 * x

    @deferred(dynamic=True)
    def triple(x):
        return 3 * x

    assert calls == [] and double.__name__ == "double" and double.deferred_compile
    assert double(2) == ("compiled", 4) and double(3) == ("compiled", 6)
    assert triple(1) == ("compiled", 3)
    assert calls == [{}, {"dynamic": True}]


def test_importing_the_model_leaves_dynamo_unimported_and_megatrons_fused_functions_deferred():
    code = ("import sys, model, megatron.core.fusions.fused_bias_gelu as f, torch\n"
            "assert 'torch._dynamo' not in sys.modules, 'dynamo imported'\n"
            "assert getattr(f.bias_gelu, 'deferred_compile', False), 'not deferred'\n"
            "assert torch.compile.__module__ == 'torch', 'torch.compile left replaced'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
