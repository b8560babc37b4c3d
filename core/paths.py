"""Where this checkout is: the code version a run records and the root gin files resolve against."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
