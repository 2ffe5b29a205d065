"""A scheduler's signal during start-up is kept, not fatal; on a restart the metrics file forgets the steps that
are trained again, so it holds every step once; the one metrics reader skips a torn last line (a run killed
mid-write) and stops on a damaged one, and the plot draws a killed run."""
from __future__ import annotations

import json
import os
import signal

import pytest

from conf.errors import ConfigError
from pretrain.training import preempt
from pretrain.training.metrics import MetricsLog, read_metrics


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


def test_read_metrics_skips_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path.write_bytes('{"step": 1, "loss": 2.0}\n{"step": 2, "note": "é"}'.encode()[:-3])  # cut inside "é"
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    # the same cut in the middle of the file is damage, not a kill: one line naming the file and the line
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ConfigError) as info:
        read_metrics(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: not a metrics record") and "\n" not in msg, msg
    path.write_text('[1, 2]\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ConfigError, match=r":1: not a metrics record \(a JSON list, not an object\)"):
        read_metrics(path)


def test_plot_draws_a_run_killed_mid_write(tmp_path, capsys):
    from pretrain.tools.plot import main
    recs = [{"step": s, "loss": 3.0 / s, "rec1/kept_frac": 0.6, "rec1/gate_mean": 0.4} for s in range(1, 6)]
    recs.insert(3, {"step": 3, "val_loss": 1.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo')
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_plot_keeps_train_val_and_downstream_records_of_a_step_and_draws_three_panels(tmp_path):
    """A downstream record (in-loop evaluation) is its own kind: it neither replaces nor is replaced by the training
    and validation records of its step. The middle panel draws what validation logs per recursion step (sampling
    accuracy, causal kept fraction), not the training kept fraction (flat under expert-choice); the last adds each
    task's chance level and the average's when known."""
    import matplotlib.pyplot as plt

    from pretrain.tools.plot import chance_level, figure, load_records, plot
    down = {"downstream_avg": 0.4, "downstream_piqa": 0.55, "downstream_piqa_acc": 0.5,
            "downstream_hellaswag": 0.25, "downstream_hellaswag_acc": 0.24, "downstream_items": 50}
    recs = [{"step": s, "loss": 3.0 / s, "r1/kept_frac": 0.6, "r1/gate_mean": 0.4} for s in (1, 2, 3, 4)]
    recs += [{"step": s, "val_loss": 2.0 / s, "val_r1_sampling_acc": 0.9, "val_r1_causal_kept": 0.5} for s in (2, 4)]
    recs += [{"step": s, **down} for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = load_records(tmp_path / "metrics.jsonl")
    assert len(records) == len(recs)
    # kinds sort as downstream, train, val within a step
    assert [r for r in records if r["step"] == 2] == [{"step": 2, **down}, recs[1], recs[4]]
    assert chance_level([r for r in records if "downstream_avg" in r]) == (1 / 2 + 1 / 4) / 2
    assert chance_level([{"downstream_avg": 0.3, "downstream_arc_easy": 0.3, "downstream_arc_easy_acc": 0.3}]) is None
    fig = figure(records, "run")
    try:
        assert [ax.get_title() for ax in fig.axes] == ["run", "routing per recursion step (validation)",
                                                       "downstream accuracy"]
        labels = [line.get_label() for line in fig.axes[1].get_lines()]
        assert labels == ["r1 sampling accuracy", "r1 causal kept fraction"], labels
        labels = [line.get_label() for line in fig.axes[2].get_lines()]
        assert labels == ["average", "hellaswag", "piqa", "chance: hellaswag (0.25)", "chance: piqa (0.50)",
                          "average at chance (0.375)"], labels
    finally:
        plt.close(fig)
    # no per-step validation statistics (vanilla, or before the first validation): no routing panel
    fig = figure([r for r in records if "val_loss" not in r], "run")
    try:
        assert [ax.get_title() for ax in fig.axes] == ["run", "downstream accuracy"]
    finally:
        plt.close(fig)
    out = plot(tmp_path, tmp_path / "curves.png")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_mixture_gets_a_panel_of_its_sources(tmp_path):
    """Per source: its validation loss and its share of the tokens trained so far (right axis)."""
    import matplotlib.pyplot as plt

    from pretrain.tools.plot import figure
    recs = [{"step": s, "loss": 3.0 / s, "tokens": 100 * s, "tokens/web": 70 * s, "tokens/code": 30 * s}
            for s in (1, 2, 3, 4)]
    recs += [{"step": s, "val_loss": 2.0 / s, "val_loss/web": 2.1 / s, "val_loss/code": 1.9 / s} for s in (2, 4)]
    fig = figure(recs, "run")
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[:2] == ["run", "data mixture: per source"], titles
        panel, share = fig.axes[1], fig.axes[2]
        assert [ln.get_label() for ln in panel.get_lines()] == ["code: validation loss", "web: validation loss"]
        lines = {ln.get_label(): list(ln.get_ydata()) for ln in share.get_lines()}
        assert lines == {"code: share of tokens so far": [0.3] * 4, "web: share of tokens so far": [0.7] * 4}
    finally:
        plt.close(fig)
