"""What the fork server of tests/forked.py imports at its start, for every process it forks to have it already.

The environment first: OpenMP and MKL read it when torch loads them, DeepSpeed when it is imported. Then megatron-core
as the project imports it (conf/imports.py: its torch.compile calls deferred), and what a training run imports
after it. Nothing here runs a torch operation or starts a thread: the children must start with fresh thread pools.
"""
import os
import warnings

from conf.imports import defer_compile_in_megatron
from tests.forked import PRELOAD_ENV

os.environ.update(PRELOAD_ENV)
defer_compile_in_megatron()

# What they warn while imported would reach the test's output (the server's stderr is the test process's), not a
# child's: tests of start-up output start fresh interpreters.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch's optimizers import it at their first step)
    import megatron.core  # noqa: F401
    import deepspeed  # noqa: F401
