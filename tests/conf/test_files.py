"""conf.files: the project's one atomic write — the whole new file or the old one, never a part, nothing left over."""
from __future__ import annotations

import os

import pytest

from conf.files import atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old\n")
    atomic_write_bytes(str(path), b"new\n")        # a str path works as well as a Path
    assert path.read_bytes() == b"new\n"
    atomic_write_text(path, "é\n")
    assert path.read_bytes() == "é\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "latest"
    atomic_write_text(path, "step-000010\n")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        atomic_write_text(path, "step-000020\n")
    assert path.read_text() == "step-000010\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
