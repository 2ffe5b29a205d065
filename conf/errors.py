"""The one exception for a user's mistake in a config; every package may raise it (conf is the bottom layer)."""


class ConfigError(ValueError):
    """A user mistake in a config: the message is one line naming the key (and file, when known)."""


def one_line(e: BaseException, limit: "int | None" = 160, *, name: bool = True) -> str:
    """An exception as one short line, for messages that must stay one line: ``KeyError: 'dynamic_loss_scale'``
    (``name`` False: the text alone), whitespace collapsed, at most ``limit`` characters of text (None: all)."""
    text = " ".join(str(e).split())
    text = text if limit is None else text[:limit]
    return f"{type(e).__name__}: {text}" if name else text
