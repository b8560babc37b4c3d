"""Text sources: what a mixture is made of, opened as random-access lists of strings.

A source spec is a small frozen dataclass (gin binds it) or a string shorthand
(handy on the command line):

  'embedded:code', 'embedded:prose'   the embedded standard-library corpus
  'tfds:lm1b', 'tfds:c4/en#text'      a prepared TFDS dataset, '#feature' optional
  'files:corpus/*.txt'                 local text/JSONL files (comma-separated globs)

`spec.open(split)` returns a TextSource: `len()`, `source[i] -> str`, and a
`manifest` for the run record. TFDS datasets are read with `tfds.data_source`
(array_record random access, no TensorFlow). Nothing here downloads: a dataset
that is not prepared is an error that says how to prepare it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from core.data import builders, embedded
from core.data.errors import DataError


class TextSource:
  """One split of one dataset as a random-access sequence of texts."""

  def __init__(self, data_source: Any, feature: str, name: str, manifest: dict):
    self._data = data_source
    self._feature = feature
    self.name = name
    self.manifest = manifest

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> str:
    value = self._data[index][self._feature]
    if isinstance(value, str):  # tfds.testing.mock_data hands str, real data bytes.
      return value
    if not isinstance(value, (bytes, np.bytes_)):
      raise DataError(
        f"{self.name}: feature {self._feature!r} holds {type(value).__name__}, "
        "not text; set feature to a text feature"
      )
    try:
      return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(
        f"{self.name}[{index}].{self._feature}: bytes {e.start}..{e.end} are not "
        f"valid UTF-8 ({e.reason}); the dataset's text feature must be UTF-8"
      ) from None


def _own_split(builder: tfds.core.DatasetBuilder, split: str, name: str) -> None:
  """Our builders leave out empty splits: say so in the data's terms."""
  if split not in builder.info.splits:
    raise DataError(
      f"{name} has no documents in split {split!r} (every file or line was hashed "
      "into the other split); add documents or change validation_percent"
    )


def _split_source(
  builder: tfds.core.DatasetBuilder,
  split: str,
  feature: str,
  name: str,
  manifest: dict,
  check_split: bool = True,
) -> TextSource:
  splits = list(builder.info.splits)
  if check_split and split not in splits:
    raise DataError(
      f"{name} has no split {split!r} (it has {splits}); map it with "
      f"split_names={{'{split}': '<one of {splits}>'}}"
    )
  features = builder.info.features
  names = list(features.keys()) if hasattr(features, "keys") else []
  text_features = [k for k in names if isinstance(features[k], tfds.features.Text)]
  if feature in names and feature not in text_features:
    raise DataError(
      f"{name}: feature {feature!r} is not text ({type(features[feature]).__name__}); "
      f"its text features are {text_features}"
    )
  if feature not in names:
    raise DataError(
      f"{name} has no feature {feature!r}; its features are {names} (text: "
      f"{text_features}); set feature to one of them"
    )
  return TextSource(builder.as_data_source(split=split), feature, f"{name}/{split}", manifest)


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A domain of the embedded standard-library corpus ('code' or 'prose').

  `files` (relative to the stdlib, or to `root`) restricts the corpus, for tests.
  """

  domain: str
  cache_dir: str | None = None
  files: tuple[str, ...] | None = None
  root: str | None = None

  def open(self, split: str) -> TextSource:
    builder, manifest = builders.open_embedded(self.domain, self.cache_dir, self.files, self.root)
    _own_split(builder, split, f"embedded:{self.domain}")
    return _split_source(
      builder, split, "text", f"embedded:{self.domain}", dict(manifest, domain=self.domain)
    )


@dataclasses.dataclass(frozen=True)
class Tfds:
  """A prepared TFDS dataset by name ('lm1b', 'c4/en', 'c4/en:3.1.0').

  Attributes:
    name: TFDS name, optionally with config and version.
    feature: the text feature.
    data_dir: where it was prepared (default: TFDS's, $TFDS_DATA_DIR or ~/tensorflow_datasets).
    split_names: our split -> the dataset's, e.g. {'validation': 'test'} for lm1b.
  """

  name: str
  feature: str = "text"
  data_dir: str | None = None
  split_names: Mapping[str, str] | None = None

  def builder(self) -> tfds.core.DatasetBuilder:
    try:
      return tfds.builder(self.name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      pass
    # Catalogue text datasets (c4, wiki40b...) register only once their module is imported.
    import tensorflow_datasets.text  # noqa: F401  pylint: disable=g-import-not-at-top

    try:
      return tfds.builder(self.name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise DataError(
        f"no TFDS dataset named {self.name!r}: it is not a registered builder and not found "
        f"prepared in data_dir={self.data_dir or '(TFDS default)'}; check the name "
        "(tfds.list_builders(with_community_datasets=False)) or give the data_dir it was "
        "prepared in"
      ) from None

  def open(self, split: str) -> TextSource:
    builder = self.builder()
    mocked = _tfds_is_mocked()
    if not builder.is_prepared() and not mocked:
      raise DataError(
        f"TFDS dataset {self.name!r} is not prepared in {builder.data_dir}. ablax never "
        "downloads during a run; prepare it once (needs the network) with "
        f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{self.name}', "
        f"data_dir='{self.data_dir or '...'}').download_and_prepare(file_format='array_record')\"` "
        "or set data_dir to where it is prepared"
      )
    file_format = getattr(builder.info, "file_format", None)
    if (
      not mocked
      and file_format is not None
      and str(getattr(file_format, "value", file_format)) != "array_record"
    ):
      raise DataError(
        f"TFDS dataset {self.name!r} in {builder.data_dir} is stored as {file_format}, which needs "
        "TensorFlow to read; re-prepare it with file_format='array_record' (or convert it with "
        "`tfds convert_format --out_file_format=array_record`)"
      )
    dataset_split = dict(self.split_names or {}).get(split, split)
    manifest = {
      "kind": "tfds",
      "name": builder.info.full_name,
      "version": str(builder.info.version),
      "data_dir": str(builder.data_dir),
      "feature": self.feature,
      "split": dataset_split,
      "fingerprint": _tfds_fingerprint(builder, dataset_split),
    }
    return _split_source(
      builder, dataset_split, self.feature, f"tfds:{self.name}", manifest, check_split=not mocked
    )


def _tfds_is_mocked() -> bool:
  """True inside tfds.testing.mock_data, whose datasets are generated, never prepared."""
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, "__name__", "").startswith("mock_")


def _tfds_fingerprint(builder: tfds.core.DatasetBuilder, split: str) -> dict:
  info = builder.info.splits[split] if split in builder.info.splits else None
  return {
    "num_examples": int(info.num_examples) if info else None,
    "num_bytes": int(info.num_bytes) if info else None,
    "shard_lengths": list(info.shard_lengths) if info else None,
  }


@dataclasses.dataclass(frozen=True)
class LocalFiles:
  """Local files: plain text (one document per file) or JSONL (one per line).

  Attributes:
    paths: globs or folders.
    file_format: 'auto' (by extension: .jsonl/.ndjson are JSONL), 'text' or 'jsonl'.
    text_field: the JSONL field with the text.
    validation_percent: share of files (text) or lines (JSONL) held out, by a hash.
    encoding_errors: 'strict' (undecodable bytes are an error) or 'replace'.
    cache_dir: the ablax cache, where the built dataset is kept.
  """

  paths: tuple[str, ...]
  file_format: str = "auto"
  text_field: str = "text"
  validation_percent: int = embedded.VALIDATION_PERCENT
  encoding_errors: str = "strict"
  cache_dir: str | None = None

  def open(self, split: str) -> TextSource:
    paths = (self.paths,) if isinstance(self.paths, (str, os.PathLike)) else tuple(self.paths)
    builder, manifest = builders.prepare_local_files(
      paths,
      self.file_format,
      self.text_field,
      self.cache_dir,
      self.validation_percent,
      self.encoding_errors,
    )
    name = "files:" + ",".join(map(str, paths))
    _own_split(builder, split, name)
    return _split_source(builder, split, "text", name, manifest)


SourceSpec = Embedded | Tfds | LocalFiles


def parse_source(spec: str | SourceSpec) -> SourceSpec:
  """A source spec from its string shorthand (see the module docstring); specs pass through."""
  if not isinstance(spec, str):
    if not hasattr(spec, "open"):
      raise DataError(
        f"a source is a spec object or a string such as 'embedded:code', got {spec!r}"
      )
    return spec
  kind, sep, rest = spec.partition(":")
  if not sep or not rest:
    raise DataError(
      f"source {spec!r}: write 'embedded:code', 'embedded:prose', 'tfds:NAME[#feature]' "
      "or 'files:GLOB[,GLOB]'"
    )
  if kind == "embedded":
    return Embedded(domain=rest)
  if kind == "tfds":
    name, _, feature = rest.partition("#")
    return Tfds(name=name, feature=feature or "text")
  if kind == "files":
    return LocalFiles(paths=tuple(p for p in rest.split(",") if p))
  raise DataError(f"source {spec!r}: unknown kind {kind!r}; use embedded:, tfds: or files:")


def open_sources(
  sources: Mapping[str, Any] | Sequence[Any] | str, split: str
) -> dict[str, TextSource]:
  """Opens a name -> spec mapping (a single spec or a list gets names from the specs)."""
  if isinstance(sources, (str, Embedded, Tfds, LocalFiles)):
    sources = [sources]
  if not isinstance(sources, Mapping):
    sources = {_default_name(s): s for s in sources}
  if not sources:
    raise DataError("no sources given; e.g. sources={'code': 'embedded:code'}")
  return {str(name): parse_source(spec).open(split) for name, spec in sources.items()}


def _default_name(spec: Any) -> str:
  spec = parse_source(spec)
  if isinstance(spec, Embedded):
    return spec.domain
  if isinstance(spec, Tfds):
    return spec.name
  return "files"
