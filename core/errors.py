"""The one base class of errors in what a person gave: a config, a file, a flag, a store.

Every such error class derives from `UserError` (ConfigError, DataError,
CheckpointError, GinConfigError, TaskError, ...), so that whatever raises it,
the `ablax` entry point (launch/cli.py) prints its message as one line and
exits 2: the message names the cause and what to change, and a traceback would
only bury it. Bugs are not UserErrors and keep their tracebacks.
"""

from __future__ import annotations

import re

# gin appends these to an exception raised inside a configurable it calls.
_GIN_CALL = re.compile(r"^\s*In call to configurable '[^']*' \(<.*>\)\s*$")


class UserError(Exception):
  """Bad input: the message says what is wrong and what to change."""


def one_line(error: BaseException) -> str:
  """The message of `error` on one line: gin's call notes dropped, its location in brackets.

  'No configurable matching X.\n  In file "a.gin", line 3\n    X.y = 1' becomes
  'No configurable matching X. (In file "a.gin", line 3: X.y = 1)'.
  """
  lines = [
    line.strip()
    for line in str(error).splitlines()
    if line.strip() and not _GIN_CALL.match(line) and line.strip() != "^"
  ]
  if not lines:
    return type(error).__name__
  head, rest = lines[0], lines[1:]
  return f"{head} ({': '.join(rest)})" if rest else head
