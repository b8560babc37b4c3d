"""Held-out loss / perplexity / bits per byte, multiple choice, memorization."""

import json
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from core.data.packing import pack_documents
from core.eval import heldout, memorization, multiple_choice as mc
from core.eval import mc_tasks
from core.eval.sampling import generate
from core.eval.score import token_logprobs
from core.model.config import ModelConfig
from core.model.transformer import Transformer
from core.tokenizer import train_tokenizer

TEXT = """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.
Water boils at one hundred degrees. The sun rises in the east and sets in the west.
def add(a, b):\n\treturn a + b\nprint(add(2, 3))  # 5, café, naïve, 東京
""" * 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tiny.model"
  return train_tokenizer(TEXT.splitlines(), path, vocab_size=320)


def tiny_model(vocab_size: int, seed: int = 0, **changes) -> Transformer:
  config = ModelConfig(vocab_size=vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=256,
                       activation="geglu", norm="rmsnorm", norm_placement="pre",
                       positions="rope", tie_embeddings=True, scale_embeddings=True,
                       **changes)
  return Transformer(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model(tok):
  return tiny_model(tok.vocab_size)


def reference_logprobs(model, ids, width=64):
  """token_logprobs of `ids` alone, right-padded to one width (one compilation)."""
  padded = np.zeros(width, np.int32)
  padded[:len(ids)] = ids
  return token_logprobs(model, padded)[:len(ids) - 1]


# -- held-out -----------------------------------------------------------------------------


def test_byte_table_counts_the_text_bytes(tok):
  lengths = heldout.token_byte_lengths(tok)
  for text in ["Paris is the capital", "café 東京\n\tx", "zzqx ⁂ 12345"]:
    ids = tok.encode(text)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
  assert lengths[tok.bos_id] == lengths[tok.eos_id] == lengths[tok.pad_id] == 0


def test_heldout_matches_token_logprobs_and_counts_bytes(tok, model):
  docs = ["Paris is the capital of France.", "def add(a, b):\n\treturn a + b", "café 東京"]
  ids = [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs]
  # One document per row: packing cuts documents at row ends, and a cut
  # loses the prediction across it.
  per_doc = [pack_documents([d], seq_len=32) for d in ids]
  rows = {k: np.concatenate([r[k] for r in per_doc]) for k in per_doc[0]}
  out = heldout.evaluate(model, {"mixed": [rows]}, tokenizer=tok,
                         domains={"mixed": "everything"})
  # Reference: each document scored alone; bos predicts the first token, and
  # the last token (eos) predicts nothing.
  nll = -sum(float(reference_logprobs(model, d).sum()) for d in ids)
  tokens = sum(len(d) - 1 for d in ids)
  assert out["heldout/mixed/tokens"] == tokens == out["heldout/tokens"]
  assert out["heldout/mixed/loss"] == pytest.approx(nll / tokens, rel=1e-5)
  assert out["heldout/mixed/perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
  nbytes = sum(len(d.encode("utf-8")) for d in docs)
  assert out["heldout/mixed/bytes"] == nbytes
  assert out["heldout/mixed/bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes,
                                                             rel=1e-5)
  assert out["heldout/domain/everything/loss"] == out["heldout/loss"]


def test_heldout_per_source_and_domain_totals(tok, model):
  def rows(texts):
    return pack_documents([[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts], 16)

  batches = {"a": [rows(["Rome is in Italy."])], "b": [rows(["print(add(2, 3))"])],
             "c": [rows(["The sun rises in the east."])]}
  out = heldout.evaluate(model, batches, tokenizer=tok, domains={"a": "prose", "c": "prose",
                                                                 "b": "code"})
  for group, names in {"domain/prose": "ac", "domain/code": "b", "": "abc"}.items():
    key = f"heldout/{group}/" if group else "heldout/"
    tokens = sum(out[f"heldout/{n}/tokens"] for n in names)
    nll = sum(out[f"heldout/{n}/loss"] * out[f"heldout/{n}/tokens"] for n in names)
    assert out[key + "tokens"] == tokens
    assert out[key + "loss"] == pytest.approx(nll / tokens, rel=1e-6)
  # max_batches and sources without tokens
  out = heldout.evaluate(model, {"a": [rows(["x y"])] * 3}, max_batches=1)
  assert "heldout/a/bits_per_byte" not in out and out["heldout/a/tokens"] > 0


# -- multiple choice ------------------------------------------------------------------------


def test_completion_logprobs_equal_unpadded_scoring(tok, model):
  requests = [([tok.bos_id] + tok.encode("Paris is the capital of"), tok.encode(" France")),
              ([tok.bos_id] + tok.encode("x"), tok.encode(" a much longer completion here")),
              ([tok.bos_id] + tok.encode("The sun rises in the east and sets in the"),
               tok.encode(" west."))]
  got = mc.completion_logprobs(model, requests, batch_size=2)
  for (ctx, comp), value in zip(requests, got):
    want = reference_logprobs(model, ctx + comp)[len(ctx) - 1:].sum()
    assert value == pytest.approx(float(want), abs=1e-4)


def test_normalizations_pick_as_the_llama_paper_says(tok, model, monkeypatch):
  # Known scores: choice ' aa' (3 chars) has log P -3, ' bbbbbbbbb' (10 chars) -5.
  # Raw sum picks 'aa'; per character picks 'bbbbbbbbb'.
  raw = {" aa": -3.0, " bbbbbbbbb": -5.0}
  given_answer = {" aa": -1.0, " bbbbbbbbb": -4.5}

  def fake(model, requests, batch_size=16, max_len=None):
    out = []
    for ctx, comp in requests:
      text = tok.decode(comp)
      is_anchor = tok.decode(ctx) == mc.UNCONDITIONAL_PROMPT
      out.append((given_answer if is_anchor else raw)[text])
    return np.asarray(out)

  monkeypatch.setattr(mc, "completion_logprobs", fake)
  task = mc.Task("toy", (mc.Example.shared("Q?", [" aa", " bbbbbbbbb"], label=1),))
  out = mc.evaluate(model, tok, task, normalizations=mc.NORMALIZATIONS)
  assert out["mc/toy/0shot/acc_none"] == 0.0
  assert out["mc/toy/0shot/acc_char"] == 1.0 == out["mc/toy/0shot/acc"]
  # log P(c|ctx) - log P(c|'Answer:'): aa -2, bbbbbbbbb -0.5.
  assert out["mc/toy/0shot/acc_unconditional"] == 1.0
  uncond = mc.Task("toy", task.examples, normalization="unconditional")
  assert mc.evaluate(model, tok, uncond, normalizations=["none"])["mc/toy/0shot/acc"] == 1.0


def test_multiple_choice_end_to_end_on_jsonl(tok, model, tmp_path):
  rows = [{"context": "Paris is the capital of", "choices": ["France", "Germany", "Italy"],
           "label": 0},
          {"context": "Water boils at one hundred", "choices": ["degrees", "dogs"], "label": 0},
          {"contexts": ["The fox jumps over the", "The dog jumps over the"],
           "completion": "lazy dog.", "label": 0},
          {"context": "A stitch in time saves", "choices": ["nine", "ten"], "label": 0}]
  path = tmp_path / "task.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  examples = mc.read_jsonl(path)
  assert examples[0].completions == (" France", " Germany", " Italy")
  assert examples[2].contexts[1] == "The dog jumps over the"
  task = mc.Task("toy", tuple(examples))
  out = mc.evaluate(model, tok, task, num_shots=2, seed=3, return_details=True)
  assert out["mc/toy/2shot/num_examples"] == 4
  # The picks are the argmax of the per-character scores, computed here directly.
  for i, (ex, detail) in enumerate(zip(examples, out["details"])):
    prefix = mc.fewshot_prefix(task, i, 2, 3)
    scores = []
    for ctx, comp in zip(ex.contexts, ex.completions):
      ctx_ids = [tok.bos_id] + tok.encode(prefix + ctx)
      lp = reference_logprobs(model, ctx_ids + tok.encode(comp), 128)[len(ctx_ids) - 1:].sum()
      scores.append(lp / len(comp))
    assert detail["char"] == int(np.argmax(scores))
  assert out["mc/toy/2shot/acc"] == np.mean([d["char"] == d["label"] for d in out["details"]])


def test_fewshot_prefix_is_seeded_and_never_includes_the_example():
  pool = tuple(mc.Example.shared(f"q{i}", [" yes", " no"], i % 2) for i in range(6))
  task = mc.Task("t", pool)
  for i in range(6):
    text = mc.fewshot_prefix(task, i, 3, seed=0)
    assert text.count("\n\n") == 3 and f"q{i} " not in text
    assert text == mc.fewshot_prefix(task, i, 3, seed=0)
  assert mc.fewshot_prefix(task, 0, 0, 0) == ""
  shots = mc.Task("t", pool[:1], shots=(mc.Example.shared("s", [" a", " b"], 1),))
  assert mc.fewshot_prefix(shots, 0, 1, 0) == "s b\n\n"
  with pytest.raises(mc.TaskError, match="needs 2 shot examples"):
    mc.fewshot_prefix(shots, 0, 2, 0)


@pytest.mark.parametrize("line,message", [
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "not an index"),
    ('{"context": "c", "choices": ["a", "b"], "label": "0"}', "'label' must be an int"),
    ('{"context": "c", "choices": "ab", "label": 0}', "'choices' must be a list"),
    ('{"context": 3, "choices": ["a", "b"], "label": 0}', "'context' must hold strings"),
    ('{"context": "c", "choices": ["a"], "label": 0}', ">= 2 choices"),
    ('[1, 2]', "expected a JSON object"),
    ('{"context": "c", "choices": ["a", "b"], "label": 0', "not JSON"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"context": "ok", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
  with pytest.raises(mc.TaskError, match=f"bad.jsonl:2: .*{message}"):
    mc.read_jsonl(path)


def test_tfds_records_become_llama_style_examples():
  ex = mc_tasks.piqa({"goal": b"Open a jar", "sol1": b"Twist the lid", "sol2": b"Eat it",
                      "label": 0, "id": b"x"})
  assert ex.contexts[0] == "Question: Open a jar\nAnswer:" and ex.completions[1] == " Eat it"
  ex = mc_tasks.arc({"question": b"Q", "answerKey": 2,
                     "choices": {"text": np.array([b"a", b"b", b"c"]), "label": np.array([0, 1, 2])}})
  assert ex.label == 2 and ex.completions == (" a", " b", " c")
  ex = mc_tasks.bool_q({"question": b"is it", "passage": b"P.", "answer": True, "title": b""})
  assert ex.contexts[0] == "P.\nQuestion: is it?\nAnswer:" and ex.label == 1
  ex = mc_tasks.hellaswag({"context": "A man", "activity_label": "Cooking", "label": 1,
                           "endings": ["cooks.", "sleeps."]})
  assert ex.contexts[0] == "Cooking: A man" and ex.completions == (" cooks.", " sleeps.")
  ex = mc_tasks.openbookqa({"question": {"stem": b"S", "choice_A": b"a", "choice_B": b"b",
                                         "choice_C": b"c", "choice_D": b"d"}, "answerKey": 3})
  assert ex.label == 3 and ex.completions[3] == " d"
  ex = mc_tasks.winogrande({"sentence": b"Ann lent Beth money because _ was rich.",
                            "option1": b"Ann", "option2": b"Beth", "label": 0})
  assert ex.contexts == ("Ann lent Beth money because Ann", "Ann lent Beth money because Beth")
  assert ex.completions == (" was rich.", " was rich.")
  assert mc_tasks.TFDS_TASKS["bool_q"].normalization == "unconditional"
  assert mc_tasks.TFDS_TASKS["openbookqa"].normalization == "unconditional"


def test_tfds_task_not_prepared_is_a_clear_error_not_a_download(tmp_path):
  for name in ("piqa", "hellaswag"):
    with pytest.raises(mc.TaskError, match="not prepared.*never downloads"):
      mc_tasks.load_tfds_task(name, data_dir=tmp_path)
  with pytest.raises(mc.TaskError, match="unknown TFDS task"):
    mc_tasks.load_tfds_task("no_such_task", data_dir=tmp_path)


def test_tfds_task_reads_through_the_data_source(tok, model):
  with tfds.testing.mock_data(num_examples=5):
    task = mc_tasks.load_tfds_task("piqa")
  assert len(task.examples) == 5 and len(task.shots) == 5
  out = mc.evaluate(model, tok, task, num_shots=1)
  assert out["mc/piqa/1shot/num_examples"] == 5


# -- memorization ------------------------------------------------------------------------------


def test_edit_distance():
  assert memorization.edit_distance([1, 2, 3], [1, 2, 3]) == 0
  assert memorization.edit_distance([1, 2, 3], [1, 3]) == 1
  assert memorization.edit_distance([1, 2, 3], [3, 2, 1]) == 2
  assert memorization.edit_distance([], [4, 5]) == 2


def test_memorization_counts_exact_and_approximate_matches(tok):
  model = tiny_model(tok.vocab_size, seed=1)
  rng = np.random.default_rng(0)
  prefixes = [rng.integers(4, tok.vocab_size, 50).tolist() for _ in range(4)]
  # Documents the model "memorized": its own greedy continuation.
  suffixes = generate(model, prefixes, 50).tokens
  docs = []
  for p, s, changed in zip(prefixes, suffixes, [0, 3, 5, 20]):
    s = list(s)
    for j in range(changed):
      s[-1 - j] = (s[-1 - j] + 1) % tok.vocab_size
    docs.append(p + s + [7, 7])
  docs.append(prefixes[0][:60])  # too short
  out = memorization.evaluate(model, docs, batch_size=3, return_details=True)
  assert out["details"] == [0, 3, 5, 20]
  assert out["memorization/num_documents"] == 4 and out["memorization/skipped_short"] == 1
  assert out["memorization/exact_rate"] == 0.25
  assert out["memorization/approximate_rate"] == 0.75  # distance <= 10% of 50 = 5
