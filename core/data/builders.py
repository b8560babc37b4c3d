"""Local TFDS datasets, written as array_record without TensorFlow.

Two builders: the embedded standard-library corpus (configs `code` and
`prose`) and local plain-text/JSONL files. Each dataset lives in a data dir
named by the fingerprint of what it was built from, under the ablax cache
(`$ABLAX_CACHE` or ~/.cache/ablax), next to a manifest.json that a run records.
Building takes a file lock, so parallel processes (pytest -n, several hosts
on one file system) build once and the others wait and reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from core import progress
from core.data import embedded
from core.data.errors import DataError

FILE_FORMAT = "array_record"
_FEATURES = {"text": tfds.features.Text(), "path": tfds.features.Text()}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
  """The ablax cache: `cache_dir`, else $ABLAX_CACHE, else ~/.cache/ablax."""
  if cache_dir is None:
    cache_dir = os.environ.get("ABLAX_CACHE") or Path.home() / ".cache" / "ablax"
  return Path(cache_dir).expanduser().resolve()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class _TextBuilder(tfds.core.GeneratorBasedBuilder):
  """A text dataset whose documents are handed to the constructor (only when building)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, documents: dict[str, list[dict]] | None = None, **kwargs):
    self._documents = documents
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self, description=self.__doc__, features=tfds.features.FeaturesDict(_FEATURES)
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._documents is None:
      raise DataError(
        f"{self.name} is not built in {self.data_dir}; build it with its prepare "
        "function (core.data.builders)"
      )
    # TFDS refuses an empty split; a split with no documents is simply absent.
    return {split: self._generate_examples(docs) for split, docs in self._documents.items() if docs}

  def _generate_examples(self, docs):
    config = self.builder_config.name if self.builder_config else ""
    for i, doc in enumerate(progress.track(docs, f"building {self.name}/{config}")):
      yield i, {"text": doc["text"], "path": doc["path"]}

  # TFDS announces every build as a download of "Unknown size"; nothing is downloaded here.
  def _log_download_bytes(self) -> None:
    print(
      f"building the local dataset {self.name} in {self.data_dir} (once; later runs reuse it)",
      file=sys.stderr,
      flush=True,
    )

  def _log_download_done(self) -> None:
    pass


class _QuietVariantFolder(logging.Filter):
  """Drops TFDS's warning that the folder being built has no dataset_info.json yet: the
  build is what writes it."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "has no dataset_info.json" not in str(record.getMessage())


logging.getLogger("absl").addFilter(_QuietVariantFolder())


class EmbeddedCorpus(_TextBuilder):
  """The Python standard library as text: `code` (source files) and `prose` (docstrings, comments, pydoc topics)."""

  name = "ablax_stdlib"
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=d, description=f"{d} documents") for d in embedded.DOMAINS
  ]


class LocalTextFiles(_TextBuilder):
  """Plain-text files (one document per file) or JSONL files (one document per line)."""

  name = "ablax_local_files"


def _prepare(builders: list[tfds.core.DatasetBuilder], data_dir: Path, manifest: dict) -> None:
  tfds.disable_progress_bar()
  for builder in builders:
    if not builder.is_prepared():
      # TFDS prints its progress to stdout; keep stdout for what commands print (e.g. --json).
      with contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare(file_format=FILE_FORMAT)
  tmp = data_dir / "manifest.json.tmp"
  tmp.write_text(json.dumps(manifest, indent=1))
  os.replace(tmp, data_dir / "manifest.json")


@functools.lru_cache(maxsize=16)
def scan_embedded(files: tuple[str, ...] | None = None, root: str | None = None) -> dict:
  """embedded.scan, once per process: a running interpreter's library does not change under it."""
  return embedded.scan(files, root)


def embedded_data_dir(manifest: dict, cache_dir: str | os.PathLike | None = None) -> Path:
  return cache_root(cache_dir) / "tfds" / f"embedded-{manifest['fingerprint'][:16]}"


def prepare_embedded(
  cache_dir: str | os.PathLike | None = None,
  files: Sequence[str] | None = None,
  root: str | os.PathLike | None = None,
) -> tuple[Path, dict]:
  """Builds the embedded corpus once (or finds it built); returns (data_dir, manifest).

  Args:
    cache_dir: the ablax cache (see cache_root).
    files: a subset of the library's files, relative to root (default: all; tests
      pass a few).
    root: the library folder (default: this interpreter's stdlib).
  """
  manifest = scan_embedded(
    None if files is None else tuple(files), None if root is None else str(root)
  )
  data_dir = embedded_data_dir(manifest, cache_dir)
  done = data_dir / "manifest.json"
  if done.is_file():
    return data_dir, json.loads(done.read_text())
  with file_lock(data_dir.parent / f"{data_dir.name}.lock"):
    if done.is_file():
      return data_dir, json.loads(done.read_text())
    documents, skipped = embedded.collect(manifest)
    manifest = dict(
      manifest,
      skipped=skipped,
      documents={d: {s: len(v) for s, v in documents[d].items()} for d in documents},
    )
    builders = [
      EmbeddedCorpus(documents=documents[d], config=d, data_dir=str(data_dir))
      for d in embedded.DOMAINS
    ]
    _prepare(builders, data_dir, manifest)
  return data_dir, manifest


def open_embedded(
  domain: str,
  cache_dir: str | os.PathLike | None = None,
  files: Sequence[str] | None = None,
  root: str | os.PathLike | None = None,
) -> tuple[tfds.core.DatasetBuilder, dict]:
  """The prepared builder of one embedded domain and the corpus manifest."""
  if domain not in embedded.DOMAINS:
    raise DataError(f"the embedded corpus has domains {embedded.DOMAINS}, not {domain!r}")
  data_dir, manifest = prepare_embedded(cache_dir, files, root)
  return EmbeddedCorpus(config=domain, data_dir=str(data_dir)), manifest


# -- local files ---------------------------------------------------------------


def expand_paths(patterns: Sequence[str]) -> list[Path]:
  """Files matching the glob patterns (a folder means every file under it), sorted."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  found: set[Path] = set()
  for pattern in patterns:
    pattern = os.path.expanduser(str(pattern))
    if os.path.isdir(pattern):
      found.update(p for p in Path(pattern).rglob("*") if p.is_file())
    else:
      found.update(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not found:
    raise DataError(
      f"no files match {list(patterns)}; check the paths (globs such as "
      "'corpus/*.txt' and folders are accepted)"
    )
  return sorted(p.resolve() for p in found)


def file_format_of(path: Path, file_format: str) -> str:
  if file_format != "auto":
    return file_format
  return "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text"


def _decode(data: bytes, where: str, encoding_errors: str) -> str:
  try:
    return data.decode("utf-8", errors=encoding_errors)
  except UnicodeDecodeError as e:
    raise DataError(
      f"{where}: bytes {e.start}..{e.end} are not valid UTF-8 ({e.reason}). Convert the file to "
      "UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or read it with encoding_errors='replace'"
    ) from None


def read_local_documents(
  paths: Sequence[Path],
  file_format: str = "auto",
  text_field: str = "text",
  validation_percent: int = embedded.VALIDATION_PERCENT,
  encoding_errors: str = "strict",
) -> dict[str, list[dict]]:
  """Documents of local files by split: a text file is one document, a JSONL line is one.

  The split hashes the path relative to the files' common folder (and the line
  number), so moving a corpus does not change which documents are held out.
  """
  docs: dict[str, list[dict]] = {s: [] for s in embedded.SPLITS}
  base = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
  for path in paths:
    data = path.read_bytes()
    key = path.relative_to(base).as_posix()
    if file_format_of(path, file_format) == "text":
      text = _decode(data, str(path), encoding_errors)
      if text.strip():
        docs[embedded.split_of(key, validation_percent)].append({"text": text, "path": str(path)})
      continue
    for n, line in enumerate(data.split(b"\n"), start=1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        record = json.loads(_decode(line, where, encoding_errors))
      except json.JSONDecodeError as e:
        raise DataError(
          f"{where}: not a JSON object ({e.msg}); JSONL files need one JSON object per line"
        ) from None
      if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
          f"{where}: no field {text_field!r} (found {keys}); set text_field to the "
          "field that holds the text"
        )
      text = record[text_field]
      if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
      if text.strip():
        docs[embedded.split_of(f"{key}:{n}", validation_percent)].append(
          {"text": text, "path": where}
        )
  return docs


def prepare_local_files(
  patterns: Sequence[str],
  file_format: str = "auto",
  text_field: str = "text",
  cache_dir: str | os.PathLike | None = None,
  validation_percent: int = embedded.VALIDATION_PERCENT,
  encoding_errors: str = "strict",
) -> tuple[tfds.core.DatasetBuilder, dict]:
  """Builds (once) a TFDS dataset of local text/JSONL files; returns (builder, manifest)."""
  if file_format not in ("auto", "text", "jsonl"):
    raise DataError(f"file_format must be 'auto', 'text' or 'jsonl', got {file_format!r}")
  paths = expand_paths(patterns)
  entries = [
    {
      "path": str(p),
      "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
      "format": file_format_of(p, file_format),
    }
    for p in paths
  ]
  key = {
    "files": entries,
    "text_field": text_field,
    "validation_percent": validation_percent,
    "encoding_errors": encoding_errors,
  }
  fp = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
  manifest = {"kind": "local_files", **key, "fingerprint": fp}
  data_dir = cache_root(cache_dir) / "tfds" / f"local-{fp[:16]}"
  config = tfds.core.BuilderConfig(name=f"f{fp[:16]}")
  done = data_dir / "manifest.json"
  if not done.is_file():
    with file_lock(data_dir.parent / f"{data_dir.name}.lock"):
      if not done.is_file():
        docs = read_local_documents(
          paths, file_format, text_field, validation_percent, encoding_errors
        )
        if not any(docs.values()):
          raise DataError(
            f"the files {[str(p) for p in paths][:5]} hold no text (all empty); "
            "give files with documents in them"
          )
        manifest["documents"] = {s: len(v) for s, v in docs.items()}
        _prepare(
          [LocalTextFiles(documents=docs, config=config, data_dir=str(data_dir))],
          data_dir,
          manifest,
        )
  manifest = json.loads(done.read_text())
  return LocalTextFiles(config=config, data_dir=str(data_dir)), manifest
