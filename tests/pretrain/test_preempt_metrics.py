"""A scheduler's signal during start-up is kept, not fatal; on a restart the metrics file forgets the steps that
are trained again, so it holds every step once."""
from __future__ import annotations

import json
import os
import signal

from pretrain.training import preempt
from pretrain.training.metrics import MetricsLog


def test_signal_during_startup_counts_at_the_first_step():
    old = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    try:
        preempt.catch_early()
        os.kill(os.getpid(), signal.SIGUSR1)            # would kill the process with the default action
        flag = preempt.PreemptionFlag().install()
        assert flag.received == signal.SIGUSR1
        flag.uninstall()
        assert preempt.PreemptionFlag().install().received is None      # consumed once
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_restart_drops_records_past_the_resumed_step(tmp_path):
    lines = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)] + [{"step": 5, "val_loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "lo')
    log = MetricsLog(tmp_path, wandb_mode="disabled", project="p", name="n", config={}, start_step=5)
    assert log.dropped == 4                              # steps 6, 7, 8 and the torn last line
    log.log({"step": 6, "loss": 0.5})
    log.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"step": 5, "val_loss": 2.0} in records
    fresh = MetricsLog(tmp_path / "new", wandb_mode="disabled", project="p", name="n", config={})
    assert fresh.dropped == 0
    fresh.close()
