"""The one exception for a user's mistake in a config; every package may raise it (conf is the bottom layer)."""


class ConfigError(ValueError):
    """A user mistake in a config: the message is one line naming the key (and file, when known)."""
