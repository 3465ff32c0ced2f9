"""Errors that callers tell apart by their type, not by their message, and what checks that
raise them test values for."""


class ConfigError(ValueError):
  """A setting with a value it does not accept: `key` is its dotted name ('fsp.stage1.lrs'),
  and the message starts with 'config.<key>'."""

  def __init__(self, key: str, message: str):
    super().__init__(message)
    self.key = key


class PairingError(ValueError):
  """A student that cannot be paired with the teacher for a method (their stages, widths or
  features do not fit)."""


def is_integer(value) -> bool:
  """An int that is not a bool (which Python counts as one)."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  """An int or float that is not a bool."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def fail(key: str, message: str):
  """Raises ConfigError 'config.<key>: <message>'."""
  raise ConfigError(key, f'config.{key}: {message}')


def first_line(error: BaseException, limit: int | None = None, empty: str | None = None) -> str:
  """The first line of an error's message (at most `limit` characters); for an empty message,
  `empty` (default: the error's type name)."""
  text = str(error).strip()
  if not text:
    return type(error).__name__ if empty is None else empty
  return text.splitlines()[0][:limit]
