"""The one error type of the data layer."""


class DataError(ValueError):
  """Data that cannot be read as asked; the message says what to do about it."""
