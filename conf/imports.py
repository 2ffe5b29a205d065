"""megatron-core's import without torch.compile's start-up cost.

megatron-core decorates a dozen fused element-wise functions with ``torch.compile`` while it is imported (its
``jit_fuser``), which imports TorchDynamo and Inductor: about 2 s of CPU in every process that imports it — each
rank of every run, every evaluation and export — although nothing here calls those functions unless it compiles.
``defer_compile_in_megatron()`` (model/__init__.py and pretrain/__init__.py call it, before anything imports
megatron) makes the decoration lazy while ``megatron.core`` is imported: a decorated function is compiled, exactly
as ``torch.compile`` would have, at its first call. Nothing else changes, and nothing is imported until megatron-core
is: this module reads only the standard library, so a ``--help`` stays fast.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

MEGATRON = "megatron.core"


def lazily(compile_fn):
    """``torch.compile`` with the compiling (and the import of its machinery) moved to the first call."""
    def deferred(model=None, **options):
        if model is None:                      # used as @torch.compile(...): a decorator factory
            return lambda fn: deferred(fn, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **options)
            return compiled(*args, **kwargs)
        call.deferred_compile = True
        return call
    return deferred


class _Loader(importlib.abc.Loader):
    """megatron.core's own loader, run with ``torch.compile`` deferred."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):               # resources, source, code: as the wrapped loader answers
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import torch
        real = torch.compile
        torch.compile = lazily(real)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = real


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != MEGATRON:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def defer_compile_in_megatron() -> None:
    """From now on, importing megatron-core leaves its compiled functions to be compiled at their first call.
    Without effect where megatron-core is imported already."""
    if MEGATRON not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
