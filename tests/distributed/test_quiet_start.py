"""Library start-up chatter stays out of a run's output, while other warnings still show.

A 2-rank ZeRO-3 run is the noisiest: DeepSpeed's accelerator probe and CPU op build, torch's deprecation warnings
from ZeRO's collectives, and ZeRO-3's remark on the model's output type.
"""
from __future__ import annotations

import os
import subprocess
import sys

from tests.distributed.harness import ROOT, library_chatter, spawn_ranks
from tests.pretrain.fixtures import make_shards


def test_zero3_run_prints_only_our_lines(tmp_path):
    data = make_shards(tmp_path / "data", vocab=128, seq_len=32, train=64, val=16, per_shard=16)
    spawn_ranks(2, ["-m", "pretrain.train", "tiny_cpu", "model=tiny_mor_ec", "model.vocab_size=128",
                    f"data.path={data}", "parallel.zero_stage=3", "parallel.micro_batch_size=2", "train.steps=2",
                    "train.log_every=1", "checkpoint.every=0", "logging.wandb=disabled", f"out_dir={tmp_path}",
                    "name=quiet"], tmp_path, env={"DS_ACCELERATOR": None},  # as a user's shell has it: unset
                fresh=True)                               # what libraries print while they are imported
    logs = {r: (tmp_path / f"rank{r}.log").read_text() for r in range(2)}
    assert "step      2  loss" in logs[0]            # the run's own lines are there
    for rank, log in logs.items():
        assert not library_chatter(log), f"rank {rank}:\n" + "\n".join(library_chatter(log))


def test_other_warnings_still_show():
    """Only the known messages are silenced: another deprecation, another DeepSpeed warning, ours, all print."""
    code = """
import logging, warnings
from pretrain.parallel import zero
zero._import_deepspeed()
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
warnings.warn("our own deprecation", FutureWarning)
warnings.warn("our own warning")
logging.getLogger("DeepSpeed").warning("another DeepSpeed warning")
logging.getLogger("DeepSpeed").warning("A module has unknown inputs or outputs type (<class 'model.mor.MoROutput'>) x")
"""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**env, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    for shown in ("our own deprecation", "our own warning", "another DeepSpeed warning"):
        assert shown in log, log
    assert "all_gather_into_tensor" not in log and "MoROutput" not in log, log
