"""The embedded default corpus: the running interpreter's own standard library.

Every machine with Python has it, so runs, tests and tutorials work offline. Two
domains: `code` (whole source files) and `prose` (each file's docstrings and
comments, plus the documentation topics CPython ships in pydoc_data/topics.py,
one document per topic). A file goes to train or validation by a hash of its
relative path, whole, so no file is in both; a topic counts as a file of its
own, `pydoc_data/topics.py#<topic>`.

`scan` hashes the files into a manifest (paths, hashes, Python version) whose
fingerprint names the built dataset, so a different interpreter or file set
never reuses another's data; `collect` reads the documents. builders.py builds
them once into a local TFDS dataset (array_record).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import platform
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Sequence

from core.data.errors import DataError

DOMAINS = ("code", "prose")
SPLITS = ("train", "validation")
VALIDATION_PERCENT = 5
# Bump when the extraction below changes, so cached datasets are rebuilt.
EXTRACTION_VERSION = 1
TOPICS = "pydoc_data/topics.py"
# Folders that are not the library proper: test suites, third-party packages, caches.
_EXCLUDED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Comments that are directives to tools, not prose.
_PRAGMAS = ("!", " -*-", "-*-", " noqa", " type:", " pragma", " fmt:", " pylint:")


def stdlib_root() -> Path:
  return Path(sysconfig.get_paths()["stdlib"]).resolve()


def default_files(root: Path | None = None) -> list[str]:
  """Relative paths of the library's .py files (tests and site-packages excluded), sorted."""
  root = Path(root) if root is not None else stdlib_root()
  files = [p.relative_to(root).as_posix() for p in root.rglob("*.py")]
  return sorted(f for f in files if not _EXCLUDED_PARTS.intersection(f.split("/")[:-1]))


def split_of(key: str, validation_percent: int = VALIDATION_PERCENT) -> str:
  """'validation' for about validation_percent % of keys, chosen by a hash of the key."""
  bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
  return "validation" if bucket < validation_percent else "train"


def read_source(data: bytes, path: str) -> str:
  """Decodes a Python source file by its coding cookie (PEP 263)."""
  try:
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding)
  except (SyntaxError, UnicodeDecodeError, LookupError) as e:
    raise DataError(f"{path}: cannot decode ({e})") from None


def extract_prose(source: str) -> str:
  """The docstrings and comments of a Python source, in file order, as paragraphs."""
  pieces: list[tuple[int, str]] = []
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    tree = None
  if tree is not None:
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
          line = node.body[0].lineno if node.body else 0
          pieces.append((line, doc.strip()))
  block: list[str] = []
  block_line = 0
  last_line = -2
  try:
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
      if tok.type != tokenize.COMMENT:
        continue
      text = tok.string[1:]
      if text.startswith(_PRAGMAS) or not text.strip():
        continue
      line = tok.start[0]
      if line != last_line + 1 and block:
        pieces.append((block_line, "\n".join(block)))
        block = []
      if not block:
        block_line = line
      block.append(text[1:] if text.startswith(" ") else text)
      last_line = line
  except (tokenize.TokenError, SyntaxError, IndentationError):
    pass  # A file tokenize cannot finish still gave us the comments before the error.
  if block:
    pieces.append((block_line, "\n".join(block)))
  pieces.sort(key=lambda p: p[0])
  return "\n\n".join(text for _, text in pieces)


def _topics(data: bytes) -> dict[str, str]:
  """The topics dict of pydoc_data/topics.py, read without importing it."""
  tree = ast.parse(data)
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
      getattr(t, "id", None) == "topics" for t in node.targets
    ):
      value = ast.literal_eval(node.value)
      return {str(k): str(v) for k, v in value.items()}
  return {}


def scan(
  files: Sequence[str] | None = None,
  root: str | Path | None = None,
  validation_percent: int = VALIDATION_PERCENT,
) -> dict:
  """The manifest of a file set: Python version, each file's sha256 and split, a fingerprint.

  Cheap (it hashes, it does not parse), so it is how a cached dataset is found.

  Args:
    files: paths relative to `root` (default: every library file, default_files()).
    root: the library folder (default: this interpreter's stdlib).
    validation_percent: share of files in the validation split.
  """
  root = Path(root).resolve() if root is not None else stdlib_root()
  files = sorted(set(files)) if files is not None else default_files(root)
  if not files:
    raise DataError(
      f"the embedded corpus has no files (root {root}); pass files=None for the "
      "whole standard library"
    )
  entries = []
  for rel in files:
    try:
      data = (root / rel).read_bytes()
    except OSError as e:
      raise DataError(f"embedded corpus file {rel} cannot be read under {root}: {e}") from None
    entries.append(
      {
        "path": rel,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "split": split_of(rel, validation_percent),
      }
    )
  manifest = {
    "kind": "embedded_stdlib",
    "python_version": platform.python_version(),
    "python_implementation": platform.python_implementation(),
    "python_executable": sys.executable,
    "stdlib_root": str(root),
    "extraction_version": EXTRACTION_VERSION,
    "validation_percent": validation_percent,
    "files": entries,
  }
  manifest["fingerprint"] = fingerprint(manifest)
  return manifest


def collect(manifest: dict) -> tuple[dict, list[dict]]:
  """Reads the documents of a scanned file set.

  Returns:
    (documents, skipped): documents[domain][split] is a list of {'text', 'path'}
    dicts; skipped lists the files that could not be decoded, with the reason.
  """
  root = Path(manifest["stdlib_root"])
  percent = manifest["validation_percent"]
  docs = {d: {s: [] for s in SPLITS} for d in DOMAINS}
  skipped = []
  for entry in manifest["files"]:
    rel, split = entry["path"], entry["split"]
    data = (root / rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
      raise DataError(
        f"{root / rel} changed while the embedded corpus was being built; build again"
      )
    try:
      source = read_source(data, rel)
    except DataError as e:
      skipped.append({"path": rel, "reason": str(e)})
      continue
    if rel == TOPICS:
      for name, text in sorted(_topics(data).items()):
        key = f"{rel}#{name}"
        if text.strip():
          docs["prose"][split_of(key, percent)].append({"text": text, "path": key})
      continue
    if source.strip():
      docs["code"][split].append({"text": source, "path": rel})
    prose = extract_prose(source)
    if prose:
      docs["prose"][split].append({"text": prose, "path": rel})
  if not any(docs[d][s] for d in DOMAINS for s in SPLITS):
    raise DataError(
      f"the embedded corpus is empty: none of the {len(manifest['files'])} files "
      f"under {root} had readable text"
    )
  return docs, skipped


def fingerprint(manifest: dict) -> str:
  """A hash of what the corpus is made of (not of where it was found)."""
  key = {
    k: manifest[k]
    for k in (
      "python_version",
      "python_implementation",
      "extraction_version",
      "validation_percent",
      "files",
    )
  }
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
