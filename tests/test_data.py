"""Data pipeline: packing, mixtures, determinism, resume, sharding, evaluation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.data import mixture, packing
from core.data.errors import DataError
from core.data.pipeline import lm_batches
from core.data.sources import LocalFiles, parse_source
from core.tokenizer import train_tokenizer

_RNG = np.random.default_rng(0)
_LETTERS = list("etaoinshrdlucmfwypvbgkq")


def _words(n: int) -> str:
  return " ".join("".join(_RNG.choice(_LETTERS, _RNG.integers(2, 8))) for _ in range(n))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """Two small local corpora: 'a' (text files, code-like) and 'b' (JSONL, prose-like)."""
  root = tmp_path_factory.mktemp("corpus")
  (root / "a").mkdir()
  for i in range(24):
    body = "\n".join(f"def f{i}_{k}(x):\n    return x * {k} + {i}" for k in range(1 + i % 7))
    (root / "a" / f"mod{i}.py.txt").write_text(f"# module {i}\n{body}\n")
  lines = [
    json.dumps({"text": f"Document {i}. " + _words(5 + (i * 7) % 40), "id": i}) for i in range(60)
  ]
  (root / "b.jsonl").write_text("\n".join(lines) + "\n")
  return root


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("ablax_cache"))


@pytest.fixture(scope="session")
def tok(corpus, tmp_path_factory):
  texts = [p.read_text() for p in sorted((corpus / "a").iterdir())]
  texts += [json.loads(l)["text"] for l in (corpus / "b.jsonl").read_text().splitlines()]
  texts += [_words(12) for _ in range(200)]
  return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)


@pytest.fixture(scope="session")
def sources(corpus, cache):
  return {
    "a": LocalFiles(paths=(str(corpus / "a"),), validation_percent=25, cache_dir=cache),
    "b": LocalFiles(paths=(str(corpus / "b.jsonl"),), validation_percent=25, cache_dir=cache),
  }


@pytest.fixture
def make(sources, tok):
  def make_batches(**kwargs):
    args = dict(sources=sources, tokenizer=tok, seq_len=32, batch_size=4, seed=0)
    args.update(kwargs)
    return lm_batches(**args)

  return make_batches


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for key in packing.FIELDS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _check_packed(batch):
  """Invariants of packed rows: segments contiguous, positions restart, targets and mask."""
  seg, pos, inp = batch["segment_ids"], batch["positions"], batch["inputs"]
  tgt, mask = batch["targets"], batch["loss_mask"]
  for r in range(seg.shape[0]):
    s = seg[r]
    real = s > 0
    # Padding only at the end of a row; segment ids count up from 1 without gaps.
    assert not np.any(real[np.argmin(real) :]) or real.all()
    ids = s[real]
    if not len(ids):  # a whole padding row (the end of a finite read)
      assert np.all(mask[r] == 0) and np.all(inp[r] == 0)
      continue
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    for k in np.unique(ids):
      where = np.flatnonzero(s == k)
      np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
      np.testing.assert_array_equal(tgt[r, where[:-1]], inp[r, where[1:]])
      assert np.all(mask[r, where[:-1]] == 1) and mask[r, where[-1]] == 0
    assert np.all(mask[r, ~real] == 0) and np.all(inp[r, ~real] == 0) and np.all(pos[r, ~real] == 0)


# -- packing -----------------------------------------------------------------------


def test_pack_documents_literal():
  rows = packing.pack_documents([[1, 2, 3], [4, 5, 6, 7, 8], [9]], seq_len=4)
  np.testing.assert_array_equal(rows["inputs"], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[2, 3, 0, 0], [6, 7, 8, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
  assert rows["inputs"].dtype == np.int32 and rows["loss_mask"].dtype == np.float32
  with pytest.raises(ValueError, match="at least 2"):
    packing.pack_documents([[1]], seq_len=1)


@settings(max_examples=60, deadline=None)
@given(
  docs=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=20), min_size=1, max_size=12),
  seq_len=st.integers(2, 16),
)
def test_packing_invariants(docs, seq_len):
  rows = packing.pack_documents(docs, seq_len)
  _check_packed(rows)
  # Reading the segments in order gives back the documents' tokens, nothing lost or mixed.
  flat = rows["inputs"][rows["segment_ids"] > 0]
  np.testing.assert_array_equal(flat, np.concatenate([np.asarray(d) for d in docs]))
  assert rows["inputs"].shape[0] == -(-sum(map(len, docs)) // seq_len)


# -- mixtures ------------------------------------------------------------------------


def test_schedule_normalizes_and_finds_stages():
  s = mixture.Schedule(["a", "b"], stages=((0, {"a": 7, "b": 3}), (100, {"a": 1, "b": 3})))
  assert s.weights_at(0) == pytest.approx({"a": 0.7, "b": 0.3})
  assert s.weights_at(99) == pytest.approx({"a": 0.7, "b": 0.3})
  assert s.weights_at(100) == pytest.approx({"a": 0.25, "b": 0.75})
  assert mixture.Schedule(["a", "b"]).weights_at(5) == {"a": 0.5, "b": 0.5}
  assert mixture.Schedule(["a", "b"], weights={"a": 1}).weights_at(0) == {"a": 1.0, "b": 0.0}


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"weights": {"c": 1}}, "not sources"),
    ({"weights": {"a": -1, "b": 2}}, ">= 0"),
    ({"weights": {"a": 0, "b": 0}}, "all zero"),
    ({"stages": ((5, {"a": 1}),)}, "step 0"),
    ({"stages": ((0, {"a": 1}), (0, {"b": 1}))}, "same step"),
    ({"weights": {"a": 1}, "stages": ((0, {"a": 1}),)}, "not both"),
  ],
)
def test_schedule_errors(kwargs, match):
  with pytest.raises(DataError, match=match):
    mixture.Schedule(["a", "b"], **kwargs)


def test_pick_source_follows_weights():
  weights = {"a": 0.2, "b": 0.5, "c": 0.3}
  delivered = {n: 0 for n in weights}
  for _ in range(1000):
    delivered[mixture.pick_source(weights, delivered, list(weights))] += 7
  total = sum(delivered.values())
  assert {n: v / total for n, v in delivered.items()} == pytest.approx(weights, abs=0.01)
  assert mixture.pick_source({"a": 0.0, "b": 1.0}, {}, ["a"]) is None


# -- the pipeline -------------------------------------------------------------------


def test_batches_have_the_agreed_shapes_and_invariants(make, tok):
  it = make()
  for batch in _take(it, 6):
    assert set(batch) == set(packing.FIELDS)
    for key, value in batch.items():
      assert value.shape == (4, 32)
      assert value.dtype == (np.float32 if key == "loss_mask" else np.int32)
    _check_packed(batch)
    assert batch["segment_ids"].min() > 0  # training rows are full
    assert batch["inputs"].max() < tok.vocab_size
  assert it.step == 6
  assert json.loads(json.dumps(it.get_state())) == it.get_state()
  assert len(json.dumps(it.get_state())) < 1000


def test_documents_start_with_bos_and_end_with_eos(make, tok):
  batch = next(make(num_epochs=1, split="validation", batch_size=64, seq_len=512))
  starts = batch["positions"] == 0
  firsts = batch["inputs"][starts & (batch["segment_ids"] > 0)]
  assert np.mean(firsts == tok.bos_id) > 0.5  # pieces that start a document
  assert np.sum(batch["inputs"] == tok.eos_id) > 0


def test_same_seed_same_batches_other_seed_other(make):
  _assert_same(_take(make(seed=3), 5), _take(make(seed=3), 5))
  a, b = _take(make(seed=3), 3), _take(make(seed=4), 3)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


@pytest.mark.parametrize("k", [0, 1, 5, 13])
def test_resume_gives_the_uninterrupted_batches(make, k):
  stages = ((0, {"a": 0.8, "b": 0.2}), (7, {"a": 0.2, "b": 0.8}))
  straight = _take(make(stages=stages), k + 6)
  first = make(stages=stages)
  _take(first, k)
  state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
  resumed = make(stages=stages)
  resumed.set_state(state)
  _assert_same(_take(resumed, 6), straight[k:])
  _assert_same(_take(make(stages=stages, start_state=state), 6), straight[k:])


@settings(max_examples=12, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  k=st.integers(0, 12),
  seq_len=st.integers(2, 70),
  batch_size=st.integers(1, 5),
  share=st.floats(0.05, 0.95),
)
def test_resume_property(sources, tok, seed, k, seq_len, batch_size, share):
  def make_it(**kwargs):
    return lm_batches(
      sources=sources,
      tokenizer=tok,
      seq_len=seq_len,
      batch_size=batch_size,
      seed=seed,
      weights={"a": share, "b": 1 - share},
      **kwargs,
    )

  straight = _take(make_it(), k + 3)
  first = make_it()
  _take(first, k)
  _assert_same(_take(make_it(start_state=first.get_state()), 3), straight[k:])


def test_resume_across_epochs(make):
  # A tiny corpus repeats within a few batches; the state carries over epochs too.
  straight = _take(make(seq_len=64, batch_size=8), 40)
  first = make(seq_len=64, batch_size=8)
  _take(first, 25)
  resumed = make(seq_len=64, batch_size=8, start_state=first.get_state())
  _assert_same(_take(resumed, 15), straight[25:])


def _long_document_rows(batch, bos_id):
  """Rows that are wholly a continuation of one document (one segment, not its start)."""
  return int(np.sum((batch["segment_ids"] == 1).all(axis=1) & (batch["inputs"][:, 0] != bos_id)))


def test_interleave_spreads_a_long_document_over_rows(tok, cache, tmp_path):
  # One long document (a fifth of the tokens) among 150 short ones: read in
  # order it fills whole batches, so every variant's train loss jumps in lockstep.
  # Short ones fit in a row, so a row wholly inside one document is the long one's.
  (tmp_path / "long.txt").write_text(_words(1500))
  lines = [json.dumps({"text": _words(2 + i % 4)}) for i in range(1200)]
  (tmp_path / "short.jsonl").write_text("\n".join(lines) + "\n")
  source = LocalFiles(
    paths=(str(tmp_path / "long.txt"), str(tmp_path / "short.jsonl")),
    validation_percent=0,
    cache_dir=cache,
  )

  def long_rows(interleave):
    it = lm_batches(
      sources={"s": source}, tokenizer=tok, seq_len=32, batch_size=8, seed=1, interleave=interleave
    )
    return [_long_document_rows(b, tok.bos_id) for b in _take(it, 100)]

  assert max(long_rows(1)) == 8  # whole batches of one document
  mixed = long_rows(8)
  # One row per batch (two while an epoch boundary has it open twice), all of it read.
  assert max(mixed) <= 2 and sum(mixed) >= 50


def test_interleaved_finite_read_reads_every_token_once(make):
  def tokens(interleave):
    bs = list(make(split="validation", num_epochs=1, seq_len=40, interleave=interleave))
    return np.sort(np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in bs]))

  np.testing.assert_array_equal(tokens(16), tokens(1))
  np.testing.assert_array_equal(tokens(3), tokens(1))


def test_state_of_another_configuration_is_refused(make):
  state = make(seed=1).get_state()
  with pytest.raises(DataError, match="another configuration"):
    make(seed=2).set_state(state)
  with pytest.raises(DataError, match="version"):
    make(seed=1).set_state(dict(state, version=0))


def test_staged_mixture_shares(make):
  stages = ((0, {"a": 0.75, "b": 0.25}), (10, {"a": 0.25, "b": 0.75}))
  it = make(stages=stages, seq_len=64)
  _take(it, 10)
  first = it.tokens_by_source
  _take(it, 10)
  second = {n: v - first[n] for n, v in it.tokens_by_source.items()}
  for got, want in ((first, stages[0][1]), (second, stages[1][1])):
    total = sum(got.values())
    assert total == 10 * 4 * 64
    # Within one row's worth of tokens of the weights.
    assert got["a"] / total == pytest.approx(want["a"], abs=64 / total + 1e-9)


def test_weights_choose_sources(make):
  only_a = make(weights={"a": 1.0, "b": 0.0})
  _take(only_a, 3)
  assert only_a.tokens_by_source["b"] == 0 and only_a.tokens_by_source["a"] == 3 * 4 * 32


def test_evaluation_terminates_and_pads(make):
  def run():
    return list(make(split="validation", num_epochs=1, batch_size=3, seq_len=48))

  batches = run()
  assert batches and all(b["inputs"].shape == (3, 48) for b in batches)
  last = batches[-1]
  assert (last["segment_ids"] == 0).any()
  assert np.all(last["loss_mask"][last["segment_ids"] == 0] == 0)
  for b in batches:
    _check_packed(b)
  _assert_same(run(), batches)  # evaluation reads the same every time
  # Two epochs read every token twice.
  twice = list(make(split="validation", num_epochs=2, batch_size=3, seq_len=48))
  count = lambda bs: sum(int((b["segment_ids"] > 0).sum()) for b in bs)
  assert count(twice) == 2 * count(batches)


def test_shards_are_disjoint_and_cover_the_split(make):
  def tokens(**kwargs):
    bs = list(make(split="validation", num_epochs=1, seq_len=40, **kwargs))
    return np.sort(np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in bs]))

  whole = tokens()
  s0, s1 = tokens(shard_index=0, shard_count=2), tokens(shard_index=1, shard_count=2)
  np.testing.assert_array_equal(np.sort(np.concatenate([s0, s1])), whole)
  assert not np.array_equal(s0, s1)


def test_manifest_records_what_was_read(make, tok):
  manifest = make().manifest
  assert manifest["tokenizer"]["sha256"] == tok.sha256
  assert set(manifest["sources"]) == {"a", "b"}
  files = manifest["sources"]["a"]["files"]
  assert len(files) == 24 and all(len(f["sha256"]) == 64 for f in files)
  assert manifest["python_version"]
  json.dumps(manifest)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"seq_len": 1}, "seq_len"),
    ({"batch_size": 0}, "batch_size"),
    ({"split": "test"}, "split"),
    ({"shard_index": 2, "shard_count": 2}, "shard_index"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"interleave": 0}, "interleave"),
    ({"weights": {"web": 1.0}}, "not sources"),
    ({"sources": {}}, "no sources"),
    ({"sources": {"x": "webdata:foo"}}, "unknown kind"),
    ({"sources": {"x": "nocolon"}}, "embedded:code"),
    ({"shard_count": 1000, "shard_index": 0}, "fewer than"),
  ],
)
def test_bad_arguments(make, kwargs, match):
  with pytest.raises(DataError, match=match):
    make(**kwargs)


def test_parse_source_shorthands():
  assert parse_source("embedded:code").domain == "code"
  spec = parse_source("tfds:c4/en:3.1.0#content")
  assert (spec.name, spec.feature) == ("c4/en:3.1.0", "content")
  assert parse_source("files:a/*.txt,b.jsonl").paths == ("a/*.txt", "b.jsonl")


def test_host_sharded_rows_assemble_the_batch_one_process_reads(make):
  """Each process builds only the blocks holding its rows; together they are the whole batch."""
  from core.train.host_input import HostInputError, HostShardedBatches

  def reader(rows, shards):
    return HostShardedBatches(make, batch_size=8, seed=3, shards=shards, rows=rows)

  for shards in (1, 2, 4):
    whole = reader((0, 8), shards)
    halves = [reader((0, 4), shards), reader((4, 8), shards)]
    if shards >= 2:  # one process's half is whole blocks: it reads only those streams
      assert len(halves[1].streams) == shards // 2
    for _ in range(3):
      full = next(whole)
      parts = [next(h) for h in halves]
      for key in full:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
  # One block is one stream over every record: what a single process always read.
  one, direct = reader((0, 8), 1), make(batch_size=8, seed=3, shard_index=0, shard_count=1)
  _assert_same(_take(one, 2), _take(direct, 2))
  # A position saved for another block count is refused, not silently misread.
  two = reader((0, 8), 2)
  with pytest.raises(HostInputError, match="data_shards=2"):
    reader((0, 8), 1).set_state(two.get_state())
  with pytest.raises(HostInputError, match="not a multiple"):
    reader((0, 8), 3)
