"""A process forked from the tests' fork server (tests/forked.py) starts as ``python ARGV`` would: the same argv,
working directory, environment, ``sys.path[0]``, ``__name__``, signal mask, exit handlers and exit code."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests import forked
from tests.distributed.harness import ROOT

SCRIPT = textwrap.dedent("""
    import atexit, os, signal, sys
    atexit.register(lambda: print("exit handler ran", flush=True))
    print("argv", sys.argv[1:])
    print("name", __name__)
    print("cwd", os.getcwd())
    print("path0", sys.path[0])
    print("env", os.environ.get("FORKED_TEST"), os.environ.get("OMP_NUM_THREADS"), "HOME" in os.environ)
    print("blocked", sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    print("to stderr", file=sys.stderr)
    how = sys.argv[1]
    if how == "raise":
        raise ValueError("boom")
    if how == "sleep":
        print("sleeping", flush=True)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        import time
        time.sleep(300)
    sys.exit(int(how))
""")


def _env(unbuffered: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "PYTHONUNBUFFERED")}
    return {**env, **forked.PRELOAD_ENV, "FORKED_TEST": "yes", "PYTHONPATH": str(ROOT),
            **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})}


def _both(tmp_path, argv: list[str], cwd, unbuffered: bool = False) -> tuple[tuple[int, str], tuple[int, str]]:
    """(exit code, output) of ``python argv`` started fresh and forked, with USR1 blocked as the launcher does."""
    env = _env(unbuffered)
    assert forked.forkable(env)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        with open(tmp_path / "fresh.log", "w") as log:
            fresh = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   timeout=300).returncode
        child = forked.start(argv, env, cwd, tmp_path / "forked.log")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    code = child.wait(timeout=300)
    return (fresh, (tmp_path / "fresh.log").read_text()), (code, (tmp_path / "forked.log").read_text())


@pytest.mark.parametrize("how,unbuffered", [("0", False), ("3", True)])
def test_a_forked_script_starts_and_ends_as_a_fresh_one(tmp_path, how, unbuffered):
    """Output order too: stdout block-buffered (stderr's line comes first), or not under PYTHONUNBUFFERED."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    fresh, child = _both(tmp_path, [str(script), how], tmp_path, unbuffered)
    assert child == fresh and fresh[0] == int(how)
    assert fresh[1].startswith("to stderr") != unbuffered, fresh[1]
    assert "exit handler ran" in fresh[1] and "to stderr" in fresh[1] and f"blocked [{int(signal.SIGUSR1)}]" in \
        fresh[1] and "env yes 1 False" in fresh[1], fresh[1]


def test_a_forked_module_runs_as_main_with_its_folder_on_the_path(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(SCRIPT)
    fresh, child = _both(tmp_path, ["-m", "pkg.mod", "5"], tmp_path)
    assert child == fresh and fresh[0] == 5 and "name __main__" in fresh[1], fresh[1]


def test_an_uncaught_exception_and_a_signal_end_it_as_they_end_python(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = _env()
    raised = forked.start([str(script), "raise"], env, tmp_path, tmp_path / "raise.log")
    assert raised.wait(timeout=300) == 1
    text = (tmp_path / "raise.log").read_text()
    assert "ValueError: boom" in text and "exit handler ran" in text, text
    assert "blocked []" in text, text     # the caller's mask, whatever the fork server's was when it started

    sleeper = forked.start([str(script), "sleep"], env, tmp_path, tmp_path / "sleep.log")
    log, deadline = tmp_path / "sleep.log", time.time() + 300
    while "sleeping" not in (log.read_text() if log.exists() else ""):
        assert sleeper.poll() is None and time.time() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.1)
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.1)
    sleeper.kill()
    assert sleeper.wait(timeout=300) == -signal.SIGKILL


def test_an_environment_the_server_was_not_started_with_is_not_forked():
    env = _env()
    assert not forked.forkable({**env, "OMP_NUM_THREADS": "2"})
    assert not forked.forkable({k: v for k, v in env.items() if k != "MKL_CBWR"})
    assert not forked.forkable({**env, "TORCH_LOGS": "+dynamo"}) or os.environ.get("TORCH_LOGS") == "+dynamo"
    assert forked.forkable({k: v for k, v in env.items() if k != "DS_ACCELERATOR"})
