"""The trainer's one handle on its checkpoints: resume from the newest good one, save one, know where they are.

The trainer hands over what a checkpoint holds — its engine, a TrainerState, the loader's position — and gets back
what a resume found; the Checkpointer never reads or replaces the trainer's fields. Writing is
pretrain/checkpoint/save.py (atomic, verified, a full disk one line), reading pretrain/checkpoint/resume.py (every
check before any state is loaded, a changed layout or precision through reshard.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from pretrain.checkpoint import verify as ckpt
from pretrain.checkpoint.resume import Resumed, resume
from pretrain.checkpoint.save import save_checkpoint
from pretrain.checkpoint.state import TrainerState
from pretrain.config import RunConfig


class Checkpointer:
    def __init__(self, cfg: RunConfig, layout, run_dir: Path, *, tokenizer_sha256: Optional[str],
                 log: Callable[[str], None] = print):
        self.cfg, self.layout, self.log = cfg, layout, log
        self.dir = Path(run_dir) / "checkpoints"
        self.tokenizer_sha256 = tokenizer_sha256
        self.is_main = layout.rank == 0

    def path_of(self, step: int) -> Path:
        return self.dir / ckpt.checkpoint_name(step)

    def resume(self, engine, loader) -> Optional[Resumed]:
        """Collective. Per checkpoint.resume (auto: the newest one that passes its check, falling back past damaged
        ones; none; a folder): checks it against this run, then loads its weights and optimizer state into
        ``engine`` and its RNG state into this rank. Returns the state to continue from and the training loader
        positioned there (``loader`` itself, or a new one when the checkpoint's data readers differ); None for a
        fresh start. A mismatch is a ConfigError, one line, the same on every rank."""
        return resume(self, engine, loader)

    def save(self, engine, state: TrainerState, loader_state: dict[str, Any], *,
             protect: Optional[int] = None) -> Path:
        """Collective: every rank at the same step. Keeps the newest checkpoint.keep and ``protect``'s step."""
        rank_state = {"rng": ckpt.rng_state(), "loader": loader_state}
        return save_checkpoint(engine, self.dir, state.step, state.to_dict(), rank_state,
                               keep=self.cfg.checkpoint.keep, protect=protect)
