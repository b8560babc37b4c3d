"""Tokenizers: training options, exact round trips, subsets, specials, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.tokenizer import (
  Tokenizer,
  TokenizerError,
  VocabMismatchError,
  check_vocab_matches,
  gather_embedding_rows,
  load_id_map,
  load_tokenizer,
  subset_tokenizer,
  train_tokenizer,
)
from core.tokenizer import subset as subset_lib
from core.tokenizer import train as train_lib
from launch import cli

# A small corpus with code, prose, digits, tabs and a few non-Latin scripts.
CORPUS = [
  'def add(a, b):\n\t"""Returns the sum of a and b."""\n\treturn a + b\n',
  "The quick brown fox jumps over the lazy dog 1234 times in 2024.\n",
  "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
  "        self.items.append(x)\n",
  "Grüße aus Köln! Ça va? Niño, señor, façade, naïve café.\n",
  "日本語のテキストも少し含めます。中文也有一点。\n",
  "for i in range(10):\n    print(i * i, end=' ')\n# squares of the first ten numbers\n",
  "Tokenizers split digits: 3.14159 and 2.71828 are constants; 42 is an answer.\n",
  "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
] * 3 + [f"line {i}: value = {i * 37 % 101} # comment number {i}\n" for i in range(60)]
_WORDS = (
  "data model token layer train batch value return import number string list dict "
  "attention window sequence packing mixture stage weight shard seed state resume "
  "corpus document segment position loss mask padding vocabulary subset merge piece "
  "unigram byte fallback digit whitespace normalization control symbol turn"
).split()
_RNG = np.random.default_rng(0)
CORPUS += [" ".join(_RNG.choice(_WORDS, 12)) + "\n" for _ in range(300)]
# Pseudo-words give BPE and unigram enough distinct pairs for a few hundred pieces.
CORPUS += [
  " ".join("".join(_RNG.choice(list("etaoinshrdlucmfw"), _RNG.integers(2, 7))) for _ in range(10))
  + "\n"
  for _ in range(300)
]

VOCAB = 520
SUB = 440


@pytest.fixture(scope="session")
def models(tmp_path_factory):
  """Tiny BPE and unigram models and a subset of each, trained once per session."""
  root = tmp_path_factory.mktemp("tokenizers")
  out = {}
  for kind in ("bpe", "unigram"):
    full = train_tokenizer(CORPUS, root / f"{kind}.model", vocab_size=VOCAB, model_type=kind)
    sub = subset_tokenizer(full.path, SUB, root / f"{kind}_sub.model")
    out[kind] = full
    out[f"{kind}_sub"] = sub.tokenizer
    out[f"{kind}_sub_ids"] = sub.kept_ids
  return out


MODEL_NAMES = ("bpe", "unigram", "bpe_sub", "unigram_sub")
TRICKY = [
  "",
  " ",
  "  leading and trailing  ",
  "\n\n\t\t",
  "a\u2581b",
  "\u2581",
  "\u2581\u2581 x",
  "\x00\r\n\x7f",
  "12345",
  "ß ẞ ﬁ Å Å",
  "😀👍🏽",
  "<start_of_turn>",
  "<end_of_turn>x",
  "<pad><eos><bos><unk>",
  "\ufeffBOM",
  "tab\there",
  "mixed 日本 ١٢٣ עברית",
]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(models, name, text):
  tok = models[name]
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", MODEL_NAMES)
@settings(
  max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=80))
def test_round_trip_any_unicode(models, name, text):
  tok = models[name]
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_special_ids_are_fixed(models, name):
  tok = models[name]
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert (tok.start_of_turn_id, tok.end_of_turn_id) == (4, 5)
  assert [tok.id_to_piece(i) for i in range(8)] == [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "\n",
    "\t",
  ]
  # Turn tokens are whole pieces in text; newline and tab are single tokens.
  turn = tok.encode(tok.format_turn("user", "hi"))
  assert turn[0] == 4 and 5 in turn and turn[-1] == 6
  assert tok.encode("\n") == [6] and tok.encode("\t") == [7]
  # Byte pieces follow the user-defined symbols.
  assert tok.id_to_piece(8) == "<0x00>" and tok.id_to_piece(8 + 255) == "<0xFF>"


@pytest.mark.parametrize("name", ("bpe", "unigram"))
def test_digits_are_split_and_whitespace_kept(models, name):
  tok = models[name]
  assert len(tok.encode("12345")) == 5
  assert [tok.decode([i]) for i in tok.encode("907")] == ["9", "0", "7"]
  assert tok.decode(tok.encode("a   b")) == "a   b"


@pytest.mark.parametrize("kind", ("bpe", "unigram"))
def test_subset_keeps_mandatory_pieces_and_maps_ids(models, kind):
  full, sub, kept = models[kind], models[f"{kind}_sub"], models[f"{kind}_sub_ids"]
  assert sub.vocab_size == SUB == len(kept)
  assert list(kept) == sorted(kept)
  for new_id, old_id in enumerate(kept):
    assert sub.id_to_piece(new_id) == full.id_to_piece(old_id)
  # Specials and bytes (the first 4 + 4 + 256 ids) keep their ids.
  assert list(kept[:264]) == list(range(264))
  single_chars = [i for i in range(full.vocab_size) if len(full.id_to_piece(i)) == 1]
  assert set(single_chars) <= set(kept)


def test_subset_of_bpe_keeps_best_scored_merges(models, tmp_path):
  from sentencepiece import sentencepiece_model_pb2 as pb2

  proto = pb2.ModelProto()
  proto.ParseFromString(open(models["bpe"].path, "rb").read())
  kept = subset_lib.select_ids(proto, 400)
  must = set(subset_lib.mandatory_ids(proto))
  others = [i for i in kept if i not in must]
  dropped = [i for i in range(len(proto.pieces)) if i not in kept]
  assert min(proto.pieces[i].score for i in others) >= max(proto.pieces[i].score for i in dropped)


def test_subset_id_map_gathers_embedding_rows(models, tmp_path):
  result = subset_tokenizer(models["unigram"].path, 400, tmp_path / "u300.model")
  saved = json.loads(open(result.id_map_path).read())
  assert saved["base_sha256"] == models["unigram"].sha256
  kept = load_id_map(tmp_path / "u300.model")
  np.testing.assert_array_equal(kept, result.kept_ids)
  table = np.arange(VOCAB * 3).reshape(VOCAB, 3)
  rows = gather_embedding_rows(table, kept)
  assert rows.shape == (400, 3)
  np.testing.assert_array_equal(rows[:, 0] // 3, kept)
  with pytest.raises(TokenizerError, match="another base model"):
    gather_embedding_rows(table[:100], kept)


def test_subset_size_errors(models, tmp_path):
  with pytest.raises(TokenizerError, match="at least"):
    subset_tokenizer(models["bpe"].path, 100, tmp_path / "x.model")
  with pytest.raises(TokenizerError, match="larger than the base"):
    subset_tokenizer(models["bpe"].path, VOCAB + 1, tmp_path / "x.model")


def test_training_is_deterministic(models, tmp_path):
  again = train_tokenizer(CORPUS, tmp_path / "again.model", vocab_size=VOCAB, model_type="bpe")
  assert again.sha256 == models["bpe"].sha256


def test_sample_lines_is_seeded_and_ordered():
  lines = [f"l{i}" for i in range(100)]
  a = train_lib.sample_lines(lines, 10, seed=1)
  assert a == train_lib.sample_lines(lines, 10, seed=1)
  assert a != train_lib.sample_lines(lines, 10, seed=2)
  assert a == sorted(a, key=lambda s: int(s[1:]))
  assert train_lib.sample_lines(lines, 0, seed=1) == lines


def test_check_vocab_matches():
  check_vocab_matches(4096, 4096)
  with pytest.raises(
    VocabMismatchError,
    match=r"train: the tokenizer has 4000 ids but the model's "
    r"vocab_size is 4096.*ModelConfig.vocab_size = 4000",
  ):
    check_vocab_matches(4000, 4096, where="train")
  check_vocab_matches(4000, 4096, allow_padding=True)
  with pytest.raises(VocabMismatchError):
    check_vocab_matches(5000, 4096, allow_padding=True)


def test_training_errors(tmp_path):
  with pytest.raises(TokenizerError, match="empty"):
    train_tokenizer(["", "\n\n"], tmp_path / "e.model", vocab_size=300)
  with pytest.raises(TokenizerError, match="no room"):
    train_tokenizer(CORPUS, tmp_path / "e.model", vocab_size=200)
  with pytest.raises(TokenizerError, match="too small for vocab_size"):
    train_tokenizer(["tiny text"], tmp_path / "e.model", vocab_size=5000)
  with pytest.raises(TokenizerError, match="model_type"):
    train_tokenizer(CORPUS, tmp_path / "e.model", vocab_size=300, model_type="wordpiece")


def test_load_errors(models, tmp_path):
  with pytest.raises(TokenizerError, match="no tokenizer model"):
    load_tokenizer(tmp_path / "missing.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(TokenizerError, match="not a SentencePiece model"):
    load_tokenizer(tmp_path / "junk.model")
  with pytest.raises(TokenizerError, match="outside this tokenizer"):
    models["bpe"].decode([VOCAB + 5])


def test_tokenizer_records_path_and_hash(models):
  tok = models["bpe"]
  again = load_tokenizer(tok.path)
  assert isinstance(again, Tokenizer) and again.sha256 == tok.sha256 and len(tok.sha256) == 64
  assert again.encode_batch(["ab", "a\u2581"]) == [tok.encode("ab"), tok.encode("a\u2581")]


def _run(argv):
  return cli.main(["tokenizer", *argv])  # bad input is reported by the entry point


def test_cli_train_subset_show(tmp_path, capsys):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, text in enumerate(CORPUS[:8]):
    (corpus / f"doc{i}.txt").write_text(text * 4)
  (corpus / "more.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[8:]))
  model = tmp_path / "cli.model"
  assert _run(["train", "--input", str(corpus), "--vocab_size", "480", "--out", str(model)]) == 0
  assert (
    _run(["subset", "--base", str(model), "--size", "400", "--out", str(tmp_path / "cli400.model")])
    == 0
  )
  assert (tmp_path / "cli400.model.idmap.json").is_file()
  capsys.readouterr()
  assert _run(["show", str(tmp_path / "cli400.model"), "--text", "a\\tb 12", "--json"]) == 0
  shown = json.loads(capsys.readouterr().out)
  assert shown["vocab_size"] == 400 and shown["round_trip"] and shown["model_type"] == "bpe"
  assert _run(["subset", "--base", str(model), "--size", "10", "--out", str(tmp_path / "x")]) == 2
  assert "at least" in capsys.readouterr().err
  assert (
    _run(
      [
        "train",
        "--input",
        str(tmp_path / "nothing*"),
        "--vocab_size",
        "300",
        "--out",
        str(tmp_path / "x"),
      ]
    )
    == 2
  )
  assert "no files match" in capsys.readouterr().err
