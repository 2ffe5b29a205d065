"""The loader a run reads each split with, from its config: one data set (``data.path``, a TokenLoader) or a
mixture (``data.sources``: a MixtureLoader for training, each source's own TokenLoader for validation)."""
from __future__ import annotations

from typing import Optional

from conf.errors import ConfigError
from pretrain.data.loader import TokenLoader
from pretrain.data.mixed_loader import MixtureLoader, phases_of
from pretrain.parallel.layout import grad_accumulation_steps


def split_loader(cfg, split: str, *, dp_rank: int, dp_size: int, readers: Optional[int] = None,
                 source: Optional[str] = None):
    """The loader a run (``cfg``: pretrain.config.RunConfig) reads ``split`` with: ``train`` shuffles forever with
    the run's seed and workers (a MixtureLoader over data.sources when the run has them); any other split is read
    once, in order, in this process — of ``source`` for a mixture. A folder that cannot be read is a ConfigError
    naming data.path or the source."""
    train = split == "train"
    data = cfg.data
    try:
        if data.sources and train:
            return MixtureLoader({n: s.path for n, s in data.sources.items()}, phases_of(data),
                                 micro_per_step=grad_accumulation_steps(cfg.parallel, dp_size) * dp_size,
                                 micro_batch_size=cfg.parallel.micro_batch_size, seed=data.seed, dp_rank=dp_rank,
                                 dp_size=dp_size, num_workers=data.num_workers, readers=readers or data.readers or None,
                                 allow_mix_change=data.allow_mix_change)
        folder = data.sources[source].path if data.sources else data.path
        return TokenLoader(folder, split=split, micro_batch_size=cfg.parallel.micro_batch_size,
                           seed=data.seed if train else 0, dp_rank=dp_rank, dp_size=dp_size,
                           num_workers=data.num_workers if train else 0, shuffle=train,
                           epochs=None if train else 1,
                           readers=(readers or data.readers or None) if train else None)
    except ValueError as e:
        if data.sources:
            msg = str(e)
            raise ConfigError(f"data.{msg}" if msg.startswith("sources.") else f"data.sources.{source}: {msg}") \
                from None
        raise ConfigError(f"data.path: {e}") from None
