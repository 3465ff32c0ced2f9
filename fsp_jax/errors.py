"""Errors that callers tell apart by their type, not by their message."""


class ConfigError(ValueError):
  """A setting with a value it does not accept: `key` is its dotted name ('fsp.stage1.lrs'),
  and the message starts with 'config.<key>'."""

  def __init__(self, key: str, message: str):
    super().__init__(message)
    self.key = key


class PairingError(ValueError):
  """A student that cannot be paired with the teacher for a method (their stages, widths or
  features do not fit)."""


def fail(key: str, message: str):
  """Raises ConfigError 'config.<key>: <message>'."""
  raise ConfigError(key, f'config.{key}: {message}')
