"""The package builds without setuptools warnings and carries every config a run needs (presets, run files,
sweeps): a wheel install must find ``python -m pretrain.train tiny_cpu`` as a checkout does."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("conf", "model", "pretrain", "data_prep")


def test_wheel_builds_quietly_with_every_yaml(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and egg-info in the checkout. No build isolation:
    # the venv's own setuptools, nothing fetched.
    src = tmp_path / "src"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "corpus"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    noise = [line for line in log.splitlines() if "Warning" in line or "absent from the" in line]
    assert not noise, "\n".join(noise)

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for d in ("model", "run", "sweep")
                for p in (ROOT / "conf" / d).glob("*.yaml")}
    # every module at any depth: pretrain/ has subpackages (training/, sweep/, ...), a forgotten one breaks installs
    expected |= {p.relative_to(ROOT).as_posix() for name in PACKAGES for p in (ROOT / name).rglob("*.py")
                 if "__pycache__" not in p.parts}
    assert {"conf/run/tiny_cpu.yaml", "conf/model/tiny_mor_ec.yaml", "conf/sweep/tiny_lr.yaml",
            "pretrain/training/trainer.py", "pretrain/sweep/spec.py", "conf/files.py"} <= expected
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"


@pytest.mark.slow
def test_editable_install_is_quiet_and_imports_from_the_checkout(tmp_path):
    """What `make setup` does (pip install -e, with pip's isolated build and today's setuptools), into a throw-away
    venv without dependencies: no setuptools warning or notice, and the packages come from the source folder."""
    src = tmp_path / "src"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "corpus"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True,
                   timeout=120)
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                          "--no-deps", "-e", str(src)], capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    noise = [line for line in log.splitlines()
             if ("Warning" in line or "!!" in line or "absent from the" in line) and "Location" not in line]
    assert not noise, "\n".join(noise)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import conf; print(conf.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(src / "conf" / "__init__.py"), where.stderr
