"""Train a model: ``python -m pretrain.train CONFIG [key=value ...]``.

CONFIG is a run file (conf/run/*.yaml, or a path). Overrides use dotted keys, e.g.
``train.steps=200 model.num_recursions=4 parallel.tensor_parallel=2 checkpoint.resume=none``.
A ``model=PRESET`` (or a path) that replaces the run file's model, without a ``name=``, also renames the run to
RUN-PRESET (e.g. 1b7_mor_ec-tiny_mor_ec), so that it never writes into the run file's own run folder.
Run it as one process, under ``torchrun --nproc-per-node N``, or through the slurm/ launchers: the layout comes
from the environment; ranks end with their launcher. Exit codes: 0 done, 75 preempted (saved; requeue me),
3 stopped on a non-finite loss, 74 no space left for a checkpoint (the earlier ones intact), 2 a configuration
mistake (also: the run folder is in use by another launch; saved on a time-limit warning that came too early to
requeue, see pretrain/training/preempt.py), 4 another rank died or stopped answering in a collective (a lost node;
after at most parallel.collective_timeout_s): start the run again and it resumes from its newest checkpoint.
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import sys
import warnings

from pretrain.checkpoint import faults
from pretrain.training import preempt

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
# megatron imports its norms lazily at a pipeline's first step and says so; the model uses its own RMSNorm
warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm")


LOST_PEER_EXIT_CODE = 4


def _rank() -> str:
    """This process's global rank as its launcher gave it (torchrun's RANK, srun's SLURM_PROCID), before any
    process group exists."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


def _is_rank0() -> bool:
    return _rank() == "0"


def run_name_override(path: str, overrides: list[str]) -> str | None:
    """``name=RUN-MODEL`` when a ``model=`` override replaces the run file's model and no ``name=`` is given."""
    import yaml

    from conf import load_config
    from pretrain.config import RunConfig
    given = {}
    for text in overrides:
        key, _, value = text.partition("=")
        given[key.strip()] = value
    if "name" in given or "model" not in given:
        return None
    try:
        model = yaml.safe_load(given["model"])
    except yaml.YAMLError:
        return None                       # load_config reports it, with the override's text
    if not isinstance(model, str):        # a mapping merges into the run file's model: it stays that run's
        return None
    run_file = load_config(path, [], schema=RunConfig)
    if load_config(path, [f"model={model}"], schema=RunConfig).model == run_file.model:
        return None
    stem = os.path.basename(model.rstrip("/"))
    for suffix in (".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    return f"name={run_file.name}-{stem}"


def main(argv: list[str] | None = None) -> int:
    faults.point("startup.main")
    # A scheduler's warning during start-up must not kill us: we save instead. The launcher starts us with the
    # warnings blocked, so one that came before this line is pending and arrives here.
    preempt.catch_early()
    preempt.die_with_launcher()
    parser = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("config", help="run file (conf/run/NAME.yaml) or a path to one")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from conf import cli_errors, load_config, run_file
    from pretrain.config import RunConfig
    from pretrain.training.trainer import run

    with cli_errors(rank0=_is_rank0()):
        path = str(run_file(args.config))
        overrides = list(args.overrides)
        name = run_name_override(path, overrides)
        if name is not None:
            overrides.append(name)
            if _is_rank0():
                print(f"run name: {name.partition('=')[2]} (set name=... to choose another)", flush=True)
        cfg = load_config(path, overrides, schema=RunConfig)
        try:
            rc = run(cfg)
        except RuntimeError as e:
            if not _lost_peer(e):
                raise
            from pretrain.parallel.layout import node_name
            print(f"error: rank {_rank()} on {node_name()}: a collective failed, so another rank has died or stopped "
                  f"answering ({_gist(e)}); this launch ends here. Start the run again (on the "
                  "same or other nodes): it resumes from its newest checkpoint that verifies",
                  file=sys.stderr, flush=True)
            return LOST_PEER_EXIT_CODE
    reason = preempt.no_requeue_reason()
    if rc == preempt.REQUEUE_EXIT_CODE and reason:
        if _is_rank0():
            print(reason, file=sys.stderr, flush=True)
        return preempt.TOO_SHORT_EXIT_CODE
    return rc


# The words torch's process groups use when a peer is gone: gloo's transport errors (a closed or reset connection,
# a timed-out wait) and NCCL's.
_PEER_GONE = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "Timed out waiting",
              "NCCL communicator was aborted", "NCCL error")


def _gist(e: RuntimeError) -> str:
    """The error without the C++ source location gloo puts first, on one line."""
    return re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))[:160]


def _lost_peer(e: RuntimeError) -> bool:
    dist = sys.modules.get("torch.distributed")
    backend_error = getattr(dist, "DistBackendError", None) if dist is not None else None
    return (backend_error is not None and isinstance(e, backend_error)) or any(w in str(e) for w in _PEER_GONE)


def exit_now(rc: int) -> None:
    """End the process without the interpreter's teardown of every module: after a save on a signal the scheduler
    kills what is left seconds later (Slurm's KillWait, 30 s by default), and freeing the objects of a process that
    imported torch, DeepSpeed, megatron and wandb took 5-60 s on a busy node, so jobs that had saved ended by
    SIGKILL instead of 75. The exit handlers (the process group's, logging's) still run and output is flushed."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    code = main()
    if preempt.signalled():
        exit_now(code)
    sys.exit(code)
