"""Every token of a data mixture accounted for: per source, in total and per phase; each source's epochs; the mix
as trained against the mix as planned.

Each step's record gains, per source ``S``: ``tokens/S`` (real labels trained on so far, all ranks: they add up
to ``tokens`` exactly), ``epochs/S`` (samples read / the source's training samples: the passes over it so far) and
``mix/S`` (its share of the current phase's tokens so far), with ``phase`` (the config phase of the step) and
``phase_tokens/P/S`` (per phase). A source that starts another pass over its data says so in one line. The counts
are kept per segment of the schedule (a phase, or the part of one after a resume changed its weights), travel in
the checkpoint (trainer.pt), and the run's end prints a table of tokens per source against the plan — each
segment's tokens split by its weights, the mix a run with continuous weights would have had.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from pretrain.training.callbacks import Callback


class MixAccounting(Callback):
    def __init__(self, names: list[str]):
        self.names = names
        self.tokens = {n: 0 for n in names}
        self.by_segment: dict[int, dict[str, int]] = {}
        self.segments: list = []          # the schedule's, for the weights and phase of each
        self.last: dict[str, dict[str, float]] = {}   # the latest step's epochs and mix per source

    def step_end(self, trainer, rec: dict[str, Any]) -> None:
        loader = trainer.loader
        consumed = loader.consumed
        self.segments = loader.schedule.segments
        seg = loader.schedule.segment_of(consumed - 1)      # the step just trained
        phase = self.segments[seg].phase
        step_counts = self.by_segment.setdefault(seg, {n: 0 for n in self.names})
        for name, n in zip(self.names, rec.pop("source_tokens")):
            self.tokens[name] += n
            step_counts[name] += n
        by_phase = self.phase_tokens()
        mine = by_phase.get(phase, {})
        step_micro = trainer.engine.micro_batches * trainer.layout.dp
        read = loader.schedule.counts(consumed)                      # the running total: cheap
        now = self._epochs(loader, read)
        before = self._epochs(loader, read - loader.schedule.counts(consumed, consumed - step_micro))
        total = sum(mine.values())
        for i, name in enumerate(self.names):
            rec[f"tokens/{name}"] = self.tokens[name]
            rec[f"epochs/{name}"] = float(now[i])
            rec[f"mix/{name}"] = mine[name] / total if total else 0.0
            if int(now[i]) > int(before[i]) and trainer.is_main:
                trainer.progress.say(f"step {trainer.step}: data: source {name} starts epoch {int(now[i]) + 1} (its "
                                     f"{loader.samples[name]:,} training samples each read {int(now[i])} time(s))")
        rec["phase"] = phase
        self.last = {"epochs": {n: rec[f"epochs/{n}"] for n in self.names},
                     "mix": {n: rec[f"mix/{n}"] for n in self.names}}
        for p, counts in by_phase.items():
            for name, n in counts.items():
                rec[f"phase_tokens/{p}/{name}"] = n

    def phase_tokens(self) -> dict[int, dict[str, int]]:
        """Tokens per source in each config phase (the segments of a phase added)."""
        out: dict[int, dict[str, int]] = {}
        for seg, counts in sorted(self.by_segment.items()):
            mine = out.setdefault(self.segments[seg].phase, {n: 0 for n in self.names})
            for n, c in counts.items():
                mine[n] += c
        return out

    @staticmethod
    def _epochs(loader, batches: np.ndarray) -> np.ndarray:
        """Passes over each source after reading ``batches`` micro-batches of each: samples read / samples held."""
        size = np.array([loader.samples[n] for n in loader.names], dtype=np.float64)
        return batches * loader.micro_batch_size / size

    def train_end(self, trainer) -> None:
        self.segments = trainer.loader.schedule.segments
        if trainer.is_main:
            for line in self.table():
                trainer.progress.say(line)

    def planned(self) -> dict[str, float]:
        """Tokens per source had each segment's tokens been split exactly by its weights."""
        out = {n: 0.0 for n in self.names}
        for seg, counts in self.by_segment.items():
            for n in self.names:
                out[n] += _share(self.segments[seg].weights, n) * sum(counts.values())
        return out

    def table(self) -> list[str]:
        plan, total = self.planned(), sum(self.tokens.values())
        phases = sorted(self.by_segment)
        head = f"{'source':<12} {'weights':<{6 * len(phases) + 2}} {'planned tokens':>15} {'trained tokens':>15} " \
               f"{'trained share':>13} {'vs plan':>8}"
        lines = ["data mix: tokens per source (planned: each phase's tokens split by its weights)", head]
        for n in self.names:
            ws = " → ".join(f"{_share(self.segments[p].weights, n):.2f}" for p in phases)
            diff = (self.tokens[n] - plan[n]) / plan[n] if plan[n] else 0.0
            lines.append(f"{n:<12} {ws:<{6 * len(phases) + 2}} {plan[n]:>15,.0f} {self.tokens[n]:>15,} "
                         f"{self.tokens[n] / max(total, 1):>12.1%} {diff:>+8.2%}")
        lines.append(f"{'total':<12} {'':<{6 * len(phases) + 2}} {sum(plan.values()):>15,.0f} {total:>15,}")
        return lines

    def state(self) -> dict[str, Any]:
        # epochs and the mix are read back from the data position; kept here for whoever reads trainer.pt
        return {"mix_tokens": dict(self.tokens), **{f"mix_{k}": v for k, v in self.last.items()},
                "mix_by_segment": {str(s): dict(c) for s, c in self.by_segment.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        saved: Optional[dict] = state.get("mix_tokens")
        if saved is None:
            return
        self.tokens = {n: int(saved.get(n, 0)) for n in self.names}
        self.by_segment = {int(s): {n: int(c.get(n, 0)) for n in self.names}
                           for s, c in state.get("mix_by_segment", {}).items()}


def _share(weights, name: str) -> float:
    w = dict(weights)
    return float(w.get(name, 0) / sum(w.values()))
