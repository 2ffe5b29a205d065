"""The run-level record of a checkpoint (``trainer.pt``): one type, written by the trainer and by import_hf, read
by resume. Per-rank state (RNG, data position) is written beside it as ``trainer-rank-R.pt``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TrainerState:
    step: int                                  # optimizer steps taken
    tokens: int                                # real labels trained on (padding counts nowhere)
    config: dict[str, Any]                     # the run config as saved (conf.config_to_dict)
    tokenizer_sha256: Optional[str]            # of the data's tokenizer: a resume with other data is refused
    world_size: Optional[int]                  # processes that saved it (None: saved before it was recorded)
    skipped: int = 0                           # non-finite steps skipped, in all
    consecutive_skips: int = 0                 # ... in the current stretch of them
    guard_step: Optional[int] = None           # the newest checkpoint before that stretch: pruning keeps it
    imported_from: Optional[str] = None        # the export folder a run was imported from (pretrain/import_hf.py)
    # The callbacks' own entries (pretrain/training/callbacks.py: e.g. the spike monitor's loss_ema), kept at the
    # top level of the file, as checkpoints have always had them.
    callbacks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "callbacks"}
        if self.imported_from is None:
            del out["imported_from"]
        return {**out, **self.callbacks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerState":
        names = {f.name for f in dataclasses.fields(cls)} - {"callbacks"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**{"skipped": 0, "consecutive_skips": 0, "guard_step": None, "world_size": None, **known},
                   callbacks={k: v for k, v in d.items() if k not in names})
