"""The one error type of the data layer."""

from core.errors import UserError


class DataError(UserError, ValueError):
  """Data that cannot be read as asked; the message says what to do about it."""
