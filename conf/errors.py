"""The one exception for a user's mistake in a config; every package may raise it (conf is the bottom layer)."""


class ConfigError(ValueError):
    """A user mistake in a config: the message is one line naming the key (and file, when known).

    ``every_rank``: every process of a distributed launch finds the same mistake (a layout the world cannot run),
    so entry points print it from rank 0 only: one line in a job's log, not one per rank."""

    def __init__(self, *args, every_rank: bool = False):
        super().__init__(*args)
        self.every_rank = every_rank


def one_line(e: BaseException, limit: "int | None" = 160, *, name: bool = True) -> str:
    """An exception as one short line, for messages that must stay one line: ``KeyError: 'dynamic_loss_scale'``
    (``name`` False: the text alone), whitespace collapsed, at most ``limit`` characters of text (None: all)."""
    text = " ".join(str(e).split())
    text = text if limit is None else text[:limit]
    return f"{type(e).__name__}: {text}" if name else text
