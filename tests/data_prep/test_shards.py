"""shards.tar_bytes (the fast shard writer) gives exactly what tarfile writes for the same members."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from data_prep import shards as S


def _tarfile_reference(split: str, index: int, samples: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, sample in enumerate(samples):
            data = np.ascontiguousarray(sample).tobytes()
            info = tarfile.TarInfo(f"{S.sample_key(split, index, i)}.{S.SUFFIX}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("n,length,dtype", [(0, 65, "<u2"), (1, 65, "<u2"), (37, 2049, "<u2"), (20, 129, "<u4"),
                                            (5, 256, "<u2")])
def test_tar_bytes_equal_tarfile(n, length, dtype):
    rng = np.random.default_rng(n)
    samples = [rng.integers(0, 60000, length).astype(dtype) for _ in range(n)]
    for split, index in (("train", 0), ("val", 123456)):
        assert S.tar_bytes(split, index, samples) == _tarfile_reference(split, index, samples)


def test_mixed_sizes_and_long_keys(tmp_path):
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 9, k).astype("<u2") for k in (10, 10, 300, 10, 1000)]
    assert S.tar_bytes("train", 7, samples) == _tarfile_reference("train", 7, samples)
    entry = S.write_shard(tmp_path / "x.tar", "train", 7, samples)
    back = S.read_shard(tmp_path / "x.tar", np.dtype("<u2"), entry)
    assert all((a == b).all() for a, b in zip(back, samples))
