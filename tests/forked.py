"""Processes the tests start, forked from an interpreter that has imported torch, megatron-core and DeepSpeed once.

Importing those costs about 4 s of CPU per process, and the suite starts some 150 ranks and runs whose start-up
is not what their test is about: that was a quarter of the suite's CPU time on 2 cores. ``start`` runs
``python ARGV`` in a child of multiprocessing's fork server, which imported them at its own start
(tests/forked_preload.py); the child then does what the interpreter would: working directory, environment,
signal mask, stdout and stderr to the log (stdout block-buffered, stderr line-buffered, as for a file), ``sys.argv``
and ``sys.path[0]``, the script or module as ``__main__``, its exit code (``-N`` for signal N), the exit handlers.

What a forked process does not show is start-up itself: what libraries print while they are imported, and what a
signal does while they are. Tests of that start fresh interpreters (``spawn_ranks(..., fresh=True)``, or their
own ``subprocess.Popen``). The environment that OpenMP and MKL read when they are loaded is fixed (PRELOAD_ENV, what
tests/distributed/harness.py gives every rank); a request for another value gets a fresh interpreter.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys

# Read by OpenMP, MKL and DeepSpeed when they are loaded, so the fork server sets them before importing; a child that
# needs other values cannot be forked from it.
PRELOAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AVX2",
               "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
# Other variables that torch, DeepSpeed or megatron read at import
_READ_AT_IMPORT = ("TORCH", "PYTORCH", "DS_", "OMP_", "MKL_", "NVTE_", "CUDA_", "MEGATRON")

_context = None


def forkable(env: dict[str, str]) -> bool:
    """Whether a process with environment ``env`` can be forked from the fork server: PRELOAD_ENV's values (a
    missing DS_ACCELERATOR is one that pretrain/parallel/zero.py sets to the same), and the other variables read at
    import as the server read them."""
    if any(env.get(k, v if k == "DS_ACCELERATOR" else None) != v for k, v in PRELOAD_ENV.items()):
        return False
    return all(env.get(k) == os.environ.get(k) for k in env if k.startswith(_READ_AT_IMPORT) and k not in PRELOAD_ENV)


def _fork_server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["tests.forked_preload"])
    return _context


class Forked:
    """The handle of a forked process, with the part of ``subprocess.Popen``'s that the tests use."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, log: str):
        self._proc = _fork_server().Process(target=_child, args=(list(argv), dict(env), str(cwd), str(log),
                                                                 signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                                            name=" ".join(argv[:2]))
        self._proc.start()
        self.pid = self._proc.pid
        self.args = argv

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(argv: list[str], env: dict[str, str], cwd, log) -> Forked:
    """``python *argv`` (a script and its arguments, or ``-m module ...``) with exactly ``env``, in ``cwd``, output
    to the file ``log``; forked from the fork server (check ``forkable(env)`` first)."""
    return Forked(argv, env, cwd, log)


def _stream(fd: int, errors: str) -> io.TextIOWrapper:
    """The interpreter's own stream on ``fd`` (a file): stdout block-buffered, stderr by line, both unbuffered
    under PYTHONUNBUFFERED."""
    if os.environ.get("PYTHONUNBUFFERED"):
        return io.TextIOWrapper(open(fd, "wb", buffering=0, closefd=False), encoding="utf-8", errors=errors,
                                write_through=True)
    return io.TextIOWrapper(open(fd, "wb", closefd=False), encoding="utf-8", errors=errors, line_buffering=fd == 2)


def _child(argv: list[str], env: dict[str, str], cwd: str, log: str, mask) -> None:
    """In the forked child: become ``python *argv``. Returns or raises SystemExit as that would end;
    multiprocessing turns it into the exit code."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout, sys.stderr = _stream(1, "strict"), _stream(2, "backslashreplace")
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        # sys.path is the test process's (multiprocessing passes it on), which holds PYTHONPATH's entries too
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        atexit._run_exitfuncs()          # as the interpreter's exit would; multiprocessing ends with os._exit
        sys.stdout.flush()
        sys.stderr.flush()
