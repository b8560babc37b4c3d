"""Data sources: the embedded corpus, TFDS datasets by name, local files, gin files, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import gin
import numpy as np
import pytest
import tensorflow_datasets as tfds

from core.data import builders, embedded
from core.data.errors import DataError
from core.data.pipeline import lm_batches
from core.data.sources import Embedded, LocalFiles, Tfds, TextSource
from core.tokenizer import train_tokenizer
from launch import cli, gin_config
from launch.commands import data as data_cmd

# A few small library files: the builder is tested on these, the whole library in a slow test.
STDLIB_FILES = (
  "colorsys.py",
  "keyword.py",
  "bisect.py",
  "this.py",
  "json/__init__.py",
  "json/scanner.py",
  "pydoc_data/topics.py",
)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("ablax_cache"))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  rng = np.random.default_rng(1)
  texts = [
    " ".join("".join(rng.choice(list("etaoinshrdlu"), rng.integers(2, 8))) for _ in range(12))
    for _ in range(300)
  ]
  texts += ["def f(x):\n    return x + 1\n", "Return the value. 12345\n"] * 20
  return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=360)


# -- the embedded corpus ----------------------------------------------------------------


SAMPLE = '''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring.

Second paragraph."""

# A comment block
# on two lines.
import os  # noqa: F401


class Thing:
  """A thing."""

  def run(self):  # pragma: no cover
    """Runs it."""
    return 1  # the answer, almost
'''


def test_extract_prose_keeps_docstrings_and_comments_in_order():
  prose = embedded.extract_prose(SAMPLE)
  assert prose == (
    "Module docstring.\n\nSecond paragraph.\n\nA comment block\non two lines.\n\n"
    "A thing.\n\nRuns it.\n\nthe answer, almost"
  )
  assert embedded.extract_prose("x = 1\n") == ""
  # A file that does not parse still gives its comments.
  assert "kept" in embedded.extract_prose("# kept\ndef broken(:\n")


def test_split_is_a_stable_hash_of_the_path():
  keys = [f"pkg/mod{i}.py" for i in range(2000)]
  splits = [embedded.split_of(k) for k in keys]
  assert splits == [embedded.split_of(k) for k in keys]
  assert 0.03 < splits.count("validation") / len(keys) < 0.07
  assert embedded.split_of("x.py", validation_percent=0) == "train"
  assert embedded.split_of("x.py", validation_percent=100) == "validation"


def test_scan_and_collect_a_fake_library(tmp_path):
  root = tmp_path / "lib"
  (root / "pydoc_data").mkdir(parents=True)
  (root / "test").mkdir()
  (root / "good.py").write_text(SAMPLE)
  (root / "latin.py").write_bytes("# -*- coding: latin-1 -*-\n# caf\xe9\nx = 1\n".encode("latin-1"))
  (root / "broken.py").write_bytes(b"# caf\xe9 without a cookie\n")
  (root / "test" / "test_x.py").write_text("# excluded\n")
  (root / "pydoc_data" / "topics.py").write_text(
    "topics = {'assert': 'The assert statement...', 'if': 'The if statement...'}\n"
  )
  files = embedded.default_files(root)
  assert files == ["broken.py", "good.py", "latin.py", "pydoc_data/topics.py"]
  manifest = embedded.scan(files, root, validation_percent=0)
  assert [f["path"] for f in manifest["files"]] == files
  assert manifest["python_version"] and len(manifest["fingerprint"]) == 64
  docs, skipped = embedded.collect(manifest)
  assert [s["path"] for s in skipped] == ["broken.py"] and "decode" in skipped[0]["reason"]
  code = {d["path"]: d["text"] for d in docs["code"]["train"]}
  assert set(code) == {"good.py", "latin.py"} and "café" in code["latin.py"]
  prose = {d["path"]: d["text"] for d in docs["prose"]["train"]}
  assert prose["pydoc_data/topics.py#assert"] == "The assert statement..."
  assert prose["latin.py"] == "café"
  assert "pydoc_data/topics.py" not in code
  # The fingerprint follows the content.
  (root / "good.py").write_text(SAMPLE + "# more\n")
  assert embedded.scan(files, root, validation_percent=0)["fingerprint"] != manifest["fingerprint"]


def test_embedded_errors(tmp_path):
  with pytest.raises(DataError, match="no files"):
    embedded.scan([], tmp_path)
  with pytest.raises(DataError, match="cannot be read"):
    embedded.scan(["missing.py"], tmp_path)
  (tmp_path / "empty.py").write_text("   \n")
  with pytest.raises(DataError, match="empty"):
    embedded.collect(embedded.scan(["empty.py"], tmp_path))
  with pytest.raises(DataError, match="domains"):
    Embedded(domain="poetry").open("train")


def test_embedded_corpus_builds_once_into_tfds(cache):
  data_dir, manifest = builders.prepare_embedded(cache, STDLIB_FILES)
  assert (data_dir / "manifest.json").is_file()
  assert {f["path"] for f in manifest["files"]} == set(STDLIB_FILES)
  assert manifest["documents"]["prose"]["train"] > 50  # the pydoc topics
  # array_record files, readable by name from the data dir.
  assert list(data_dir.rglob("*.array_record-*"))
  code = Embedded(domain="code", cache_dir=cache, files=STDLIB_FILES).open("train")
  texts = [code[i] for i in range(len(code))]
  assert all(isinstance(t, str) for t in texts) and any("def " in t for t in texts)
  assert code.manifest["fingerprint"] == manifest["fingerprint"]
  # A second call finds it built.
  again_dir, again = builders.prepare_embedded(cache, STDLIB_FILES)
  assert again_dir == data_dir and again == manifest


def test_embedded_source_in_a_pipeline(cache, tok):
  files = STDLIB_FILES
  it = lm_batches(
    sources={"code": Embedded("code", cache, files), "prose": Embedded("prose", cache, files)},
    weights={"code": 0.5, "prose": 0.5},
    tokenizer=tok,
    seq_len=64,
    batch_size=2,
    seed=0,
  )
  batch = next(it)
  assert batch["inputs"].shape == (2, 64)
  assert it.manifest["sources"]["code"]["python_version"]
  assert it.manifest["sources"]["code"]["domain"] == "code"


# -- TFDS datasets by name ----------------------------------------------------------------


class TinyWeb(tfds.core.GeneratorBasedBuilder):
  """A small web-like dataset with a non-default text feature."""

  name = "ablax_test_tiny_web"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description="test",
      features=tfds.features.FeaturesDict(
        {"content": tfds.features.Text(), "url": tfds.features.Text(), "rank": np.int32}
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40), "test": self._generate_examples(8)}

  def _generate_examples(self, n):
    for i in range(n):
      yield (
        i,
        {
          "content": f"page {i}: " + "words and more words " * (1 + i % 5),
          "url": f"https://example.org/{i}",
          "rank": i,
        },
      )


@pytest.fixture(scope="session")
def tiny_web(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds.disable_progress_bar()
  TinyWeb(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_prepared_tfds_dataset_by_name(tiny_web, tok):
  source = Tfds(name="ablax_test_tiny_web", feature="content", data_dir=tiny_web).open("train")
  assert len(source) == 40 and source[0].startswith("page ")
  assert (
    source.manifest["version"] == "1.0.0" and source.manifest["fingerprint"]["num_examples"] == 40
  )
  spec = Tfds(
    name="ablax_test_tiny_web",
    feature="content",
    data_dir=tiny_web,
    split_names={"validation": "test"},
  )
  batches = list(
    lm_batches(
      sources={"web": spec},
      tokenizer=tok,
      seq_len=32,
      batch_size=4,
      split="validation",
      num_epochs=1,
    )
  )
  tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  texts = [spec.open("validation")[i] for i in range(8)]
  assert tokens == sum(len(tok.encode(t)) + 2 for t in texts)


def test_prepared_tfds_dataset_is_read_without_its_builder_code(tiny_web):
  # A fresh interpreter has no TinyWeb class: TFDS reads the prepared files by name alone,
  # as it does for a catalogue dataset prepared elsewhere.
  code = (
    "from core.data.sources import Tfds; "
    f"s = Tfds(name='ablax_test_tiny_web', feature='content', data_dir={tiny_web!r})"
    ".open('train'); print(len(s), s[3])"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert re.match(r"40 page \d+: words", out.stdout.strip())


def test_tfds_errors_say_what_to_do(tiny_web, tmp_path):
  with pytest.raises(DataError, match=r"no feature 'text'.*text: \['content', 'url'\]"):
    Tfds(name="ablax_test_tiny_web", data_dir=tiny_web).open("train")
  with pytest.raises(DataError, match=r"'rank' is not text.*\['content', 'url'\]"):
    Tfds(name="ablax_test_tiny_web", feature="rank", data_dir=tiny_web).open("train")
  with pytest.raises(DataError, match="no split 'validation'.*split_names"):
    Tfds(name="ablax_test_tiny_web", feature="content", data_dir=tiny_web).open("validation")
  with pytest.raises(DataError, match="no TFDS dataset named 'no_such_dataset_xyz'"):
    Tfds(name="no_such_dataset_xyz", data_dir=str(tmp_path)).open("train")
  # A real catalogue dataset that is not prepared here: an error, never a download.
  with pytest.raises(DataError, match="not prepared.*never downloads"):
    Tfds(name="lm1b", data_dir=str(tmp_path)).open("train")
  with pytest.raises(DataError, match="not prepared"):
    Tfds(name="c4/en", data_dir=str(tmp_path)).open("train")


def test_tfds_mock_data_gives_str(tok):
  with tfds.testing.mock_data(num_examples=6):
    spec = Tfds(name="lm1b", split_names={"validation": "test"})
    source = spec.open("train")
    assert isinstance(source[0], str)
    batch = next(lm_batches(sources={"lm1b": spec}, tokenizer=tok, seq_len=16, batch_size=2))
  assert batch["inputs"].shape == (2, 16)


def test_text_source_decodes_bytes_and_refuses_the_rest():
  source = TextSource([{"t": "str"}, {"t": b"caf\xc3\xa9"}, {"t": b"\xff"}, {"t": 3}], "t", "x", {})
  assert source[0] == "str" and source[1] == "café"
  with pytest.raises(DataError, match=r"x\[2\].t: bytes 0..1 are not valid UTF-8"):
    source[2]
  with pytest.raises(DataError, match="holds int, not text"):
    source[3]


# -- local files: bad input -------------------------------------------------------------


def test_local_files_errors(tmp_path, cache):
  with pytest.raises(DataError, match="no files match"):
    LocalFiles(paths=(str(tmp_path / "nothing*.txt"),), cache_dir=cache).open("train")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  (tmp_path / "empty" / "b.txt").write_text("  \n")
  with pytest.raises(DataError, match="hold no text"):
    LocalFiles(paths=(str(tmp_path / "empty"),), cache_dir=cache).open("train")
  (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin.txt: bytes 3..4 are not valid UTF-8.*iconv"):
    LocalFiles(paths=(str(tmp_path / "latin.txt"),), cache_dir=cache).open("train")
  replaced = LocalFiles(
    paths=(str(tmp_path / "latin.txt"),),
    cache_dir=cache,
    encoding_errors="replace",
    validation_percent=0,
  ).open("train")
  assert replaced[0] == "caf\ufffd"
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
    LocalFiles(paths=(str(tmp_path / "bad.jsonl"),), cache_dir=cache).open("train")
  (tmp_path / "field.jsonl").write_text('{"body": "ok"}\n')
  with pytest.raises(DataError, match=r"no field 'text' \(found \['body'\]\)"):
    LocalFiles(paths=(str(tmp_path / "field.jsonl"),), cache_dir=cache).open("train")
  assert (
    LocalFiles(
      paths=(str(tmp_path / "field.jsonl"),),
      cache_dir=cache,
      text_field="body",
      validation_percent=0,
    ).open("train")[0]
    == "ok"
  )
  with pytest.raises(DataError, match="no documents in split .validation..*validation_percent"):
    lm_batches(
      sources={
        "x": LocalFiles(
          paths=(str(tmp_path / "field.jsonl"),),
          cache_dir=cache,
          text_field="body",
          validation_percent=0,
        )
      },
      tokenizer=_tiny_tok_path(tmp_path),
      seq_len=8,
      batch_size=1,
      split="validation",
    )


def _tiny_tok_path(tmp_path):
  path = tmp_path / "tiny.model"
  if not path.exists():
    train_tokenizer(["ab cd ef gh ij kl mn op qr st uv wx yz " * 3] * 20, path, vocab_size=300)
  return str(path)


# -- gin files and the CLI ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["embedded", "embedded_staged", "tfds", "local_files"])
def test_gin_files_parse(name):
  params = {
    "tfds": ["core.data.sources.Tfds.name = 'lm1b'"],
    "local_files": ["core.data.sources.LocalFiles.paths = ('x/*.txt',)"],
  }.get(name, [])
  gin_config.parse([f"gin/data/{name}.gin"], params)
  assert gin.query_parameter("core.data.pipeline.lm_batches.seq_len") > 0


def test_local_files_gin_builds_a_pipeline(tmp_path, cache, tok, monkeypatch):
  monkeypatch.setenv("ABLAX_CACHE", cache)
  (tmp_path / "docs").mkdir()
  for i in range(6):
    (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} " * 30)
  gin_config.parse(
    ["gin/data/local_files.gin"],
    [
      f"core.data.sources.LocalFiles.paths = ('{tmp_path / 'docs'}',)",
      "core.data.sources.LocalFiles.validation_percent = 50",
      f"core.data.pipeline.lm_batches.tokenizer = '{tok.path}'",
      "core.data.pipeline.lm_batches.seq_len = 16",
    ],
  )
  from core.data import pipeline

  batches = gin_config.build(pipeline.lm_batches, batch_size=2, seed=0)
  assert next(batches)["inputs"].shape == (2, 16)

  # The bound lm_batches is the one entry point: the trainer calls it with the run's own
  # values (batch size, seed, shard, split, where to resume), and each call gives the same.
  def data(**kwargs):
    return gin_config.build(pipeline.lm_batches, **kwargs)

  _assert_same_batches(data(batch_size=2, seed=0), data(batch_size=2, seed=0))
  state = data(batch_size=2, seed=0).get_state()
  assert data(batch_size=2, seed=0, start_state=state).step == 0
  evaluation = list(data(batch_size=2, seed=0, split="validation", num_epochs=1))
  assert evaluation and evaluation[-1]["inputs"].shape == (2, 16)


def _assert_same_batches(a, b, n=3):
  for _ in range(n):
    x, y = next(a), next(b)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_data_inspect_cli(tmp_path, cache, tok, monkeypatch, capsys):
  monkeypatch.setenv("ABLAX_CACHE", cache)
  (tmp_path / "docs").mkdir()
  for i in range(6):
    (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} " * 30)
  parser = argparse.ArgumentParser()
  data_cmd.add_arguments(parser)
  args = parser.parse_args(
    [
      "inspect",
      "--gin_file",
      "gin/data/local_files.gin",
      "--gin_param",
      f"core.data.sources.LocalFiles.paths = ('{tmp_path / 'docs'}',)",
      "--gin_param",
      "core.data.sources.LocalFiles.validation_percent = 0",
      "--gin_param",
      f"core.data.pipeline.lm_batches.tokenizer = '{tok.path}'",
      "--gin_param",
      "core.data.pipeline.lm_batches.seq_len = 32",
      "--batches",
      "2",
      "--json",
    ]
  )
  assert data_cmd.run(args) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["documents"] == {"files": 6} and summary["tokens"] == 2 * 8 * 32
  assert summary["token_share"] == {"files": 1.0} and "document" in summary["rows"][0]["text"]
  # Bad input is reported by the entry point: one line, exit 2.
  assert (
    cli.main(
      [
        "data",
        "inspect",
        "--gin_file",
        "gin/data/local_files.gin",
        "--gin_param",
        "core.data.sources.LocalFiles.paths = ('/nonexistent/*.txt',)",
      ]
    )
    == 2
  )
  assert "no files match" in capsys.readouterr().err


# -- the real default path (whole standard library, default tokenizer) ----------------------


@pytest.mark.slow
def test_default_embedded_path(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("ABLAX_CACHE", str(tmp_path / "cache"))
  from core.data.default_tokenizer import default_tokenizer

  tok = default_tokenizer()
  assert tok.vocab_size == 4096 and os.path.dirname(tok.path).startswith(str(tmp_path))
  assert default_tokenizer().sha256 == tok.sha256  # cached
  parser = argparse.ArgumentParser()
  data_cmd.add_arguments(parser)
  args = parser.parse_args(["inspect", "--gin_file", "gin/data/embedded.gin", "--json"])
  assert data_cmd.run(args) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["documents"]["code"] > 300 and summary["documents"]["prose"] > 300
  text = "def f(x):\n\treturn x ** 2  # 12345 ☃\n"
  assert tok.decode(tok.encode(text)) == text
