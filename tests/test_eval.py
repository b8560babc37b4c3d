"""Held-out loss / perplexity / bits per byte, multiple choice, memorization."""

import json
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from core.data.packing import pack_documents
from core.eval import heldout, memorization, multiple_choice as mc
from core.eval import mc_metrics, mc_tasks
from core.eval.sampling import generate
from core.eval.score import token_logprobs
from core.model.transformer import Transformer
from core.tokenizer import train_tokenizer
from tests.tiny_model import tiny_config

TEXT = (
  """The quick brown fox jumps over the lazy dog. A stitch in time saves nine.
Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.
Water boils at one hundred degrees. The sun rises in the east and sets in the west.
def add(a, b):\n\treturn a + b\nprint(add(2, 3))  # 5, café, naïve, 東京
"""
  * 4
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tiny.model"
  return train_tokenizer(TEXT.splitlines(), path, vocab_size=320)


def tiny_model(vocab_size: int, seed: int = 0, **changes) -> Transformer:
  config = tiny_config(vocab_size=vocab_size, mlp_dim=64, max_seq_len=256, **changes)
  return Transformer(config, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def model(tok):
  return tiny_model(tok.vocab_size)


def reference_logprobs(model, ids, width=64):
  """token_logprobs of `ids` alone, right-padded to one width (one compilation)."""
  padded = np.zeros(width, np.int32)
  padded[: len(ids)] = ids
  return token_logprobs(model, padded)[: len(ids) - 1]


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
  out = heldout.evaluate(model, {"mixed": [rows]}, tokenizer=tok, domains={"mixed": "everything"})
  # Reference: each document scored alone; bos predicts the first token, and
  # the last token (eos) predicts nothing.
  nll = -sum(float(reference_logprobs(model, d).sum()) for d in ids)
  tokens = sum(len(d) - 1 for d in ids)
  assert out["eval/heldout/mixed/tokens"] == tokens == out["eval/heldout/tokens"]
  assert out["eval/heldout/mixed/loss"] == pytest.approx(nll / tokens, rel=1e-5)
  assert out["eval/heldout/mixed/perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
  nbytes = sum(len(d.encode("utf-8")) for d in docs)
  assert out["eval/heldout/mixed/bytes"] == nbytes
  assert out["eval/heldout/mixed/bits_per_byte"] == pytest.approx(
    nll / math.log(2) / nbytes, rel=1e-5
  )
  assert out["eval/heldout/domain/everything/loss"] == out["eval/heldout/loss"]


def test_heldout_per_source_and_domain_totals(tok, model):
  def rows(texts):
    return pack_documents([[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts], 16)

  batches = {
    "a": [rows(["Rome is in Italy."])],
    "b": [rows(["print(add(2, 3))"])],
    "c": [rows(["The sun rises in the east."])],
  }
  out = heldout.evaluate(
    model, batches, tokenizer=tok, domains={"a": "prose", "c": "prose", "b": "code"}
  )
  for group, names in {"domain/prose": "ac", "domain/code": "b", "": "abc"}.items():
    key = f"eval/heldout/{group}/" if group else "eval/heldout/"
    tokens = sum(out[f"eval/heldout/{n}/tokens"] for n in names)
    nll = sum(out[f"eval/heldout/{n}/loss"] * out[f"eval/heldout/{n}/tokens"] for n in names)
    assert out[key + "tokens"] == tokens
    assert out[key + "loss"] == pytest.approx(nll / tokens, rel=1e-6)
  # max_batches and sources without tokens
  out = heldout.evaluate(model, {"a": [rows(["x y"])] * 3}, max_batches=1)
  assert "eval/heldout/a/bits_per_byte" not in out and out["eval/heldout/a/tokens"] > 0


# -- multiple choice ------------------------------------------------------------------------


def test_completion_logprobs_equal_unpadded_scoring(tok, model):
  requests = [
    ([tok.bos_id] + tok.encode("Paris is the capital of"), tok.encode(" France")),
    ([tok.bos_id] + tok.encode("x"), tok.encode(" a much longer completion here")),
    ([tok.bos_id] + tok.encode("The sun rises in the east and sets in the"), tok.encode(" west.")),
  ]
  got, greedy = mc.completion_logprobs(model, requests, batch_size=2)
  for (ctx, comp), value, g in zip(requests, got, greedy):
    want = reference_logprobs(model, ctx + comp)[len(ctx) - 1 :].sum()
    assert value == pytest.approx(float(want), abs=1e-4)
    # is_greedy: each completion token is the argmax of the logits before it.
    logits = np.asarray(model(np.asarray([ctx + comp[:-1]], np.int32)))[0, len(ctx) - 1 :]
    assert g == bool(np.all(np.argmax(logits, axis=-1) == np.asarray(comp)))
  # The model's own greedy continuation is greedy.
  ctx = requests[0][0]
  top = int(np.argmax(np.asarray(model(np.asarray([ctx], np.int32)))[0, -1]))
  assert mc.completion_logprobs(model, [(ctx, [top])])[1].tolist() == [True]


# Hand-checked task. Given log-likelihoods of each continuation (conditional, after BOS
# alone, after BOS "Answer:"), each metric's score per choice:
#
#                     ll  len(choice) len(cont)  bos   ans | norm   char    m.i.  uncond
#  ex 0 'Q0?', label 1
#    ' ab'   'ab'   -2.0      2          3      -1.0  -1.5 | -1.0   -0.667  -1.0  -0.5
#    ' abcd' 'abcd' -3.8      4          5      -1.0  -3.0 | -0.95  -0.76   -2.8  -0.8
#    picks: acc 0, acc_norm 1, acc_char 0 (lm-eval's and LLaMA's per-character scores
#    disagree), acc_mutual_info 0, acc_unconditional 0
#  ex 1 'Q1?', label 0
#    ' x'    'x'    -1.0      1          2      -3.0  -0.5 | -1.0   -0.5     2.0  -0.5
#    ' yyy'  'yyy'  -2.5      3          4      -0.5  -2.5 | -0.833 -0.625  -2.0   0.0
#    picks: 0, 1 (disagree again), 0, 0, 1
#  ex 2 'Q2: ' + 'no' / 'yes', label 1: the trailing space moves, so the requests are
#    ('Q2:', ' no') and ('Q2:', ' yes')
#    ' no'   'no'   -1.2      2          3      -2.0  -1.0 | -0.6   -0.4     0.8  -0.2
#    ' yes'  'yes'  -1.5      3          4      -0.5  -2.0 | -0.5   -0.375  -1.0   0.5
#    picks: 0, 1, 1, 0, 1
# Accuracies (labels 1, 0, 1): acc 1/3, acc_norm 2/3, acc_char 2/3, acc_mutual_info 1/3,
# acc_unconditional 1/3.
HAND = {  # continuation -> (ll, ll after BOS, ll after "Answer:")
  (0, " ab"): (-2.0, -1.0, -1.5),
  (0, " abcd"): (-3.8, -1.0, -3.0),
  (1, " x"): (-1.0, -3.0, -0.5),
  (1, " yyy"): (-2.5, -0.5, -2.5),
  (2, " no"): (-1.2, -2.0, -1.0),
  (2, " yes"): (-1.5, -0.5, -2.0),
}
HAND_ACC = {
  "acc": 1 / 3,
  "acc_norm": 2 / 3,
  "acc_char": 2 / 3,
  "acc_mutual_info": 1 / 3,
  "acc_unconditional": 1 / 3,
}


def hand_task():
  return mc.Task(
    "hand",
    (
      mc.Example.shared("Q0?", [" ab", " abcd"], label=1),
      mc.Example.shared("Q1?", [" x", " yyy"], label=0),
      mc.Example.shared("Q2: ", ["no", "yes"], label=1, choices=["no", "yes"]),
    ),
  )


def fake_scorer(tok, seen):
  """A completion_logprobs that answers from HAND, recognising each request by its text."""

  def fake(model, requests, batch_size=16, max_len=None):
    out = []
    for ctx, comp in requests:
      seen.append((ctx, comp))
      ctx_text, comp_text = tok.decode(ctx), tok.decode(comp)
      if ctx_text in ("", mc.UNCONDITIONAL_PROMPT):
        # Anchored: which example is known from the completion alone.
        (ex, _), values = next(
          (k, v) for k, v in HAND.items() if k[1] == comp_text or k[1] == " " + comp_text
        )
        out.append(values[1] if ctx_text == "" else values[2])
      else:
        ex = int(ctx_text[1])
        out.append(HAND[ex, comp_text][0])
    return np.asarray(out), np.zeros(len(out), bool)

  return fake


def test_lm_eval_and_llama_metrics_on_a_hand_checked_task(tok, model, monkeypatch):
  seen = []
  monkeypatch.setattr(mc, "completion_logprobs", fake_scorer(tok, seen))
  out = mc.evaluate(model, tok, hand_task(), metrics=list(mc_metrics.METRICS), return_details=True)
  for metric, want in HAND_ACC.items():
    assert out[f"eval/mc/hand/0shot/{metric}"] == pytest.approx(want), metric
  # acc_token depends on how the tokenizer splits the continuations: from the records.
  picks = mc_metrics.picks(out["details"], "acc_token")
  assert out["eval/mc/hand/0shot/acc_token"] == np.mean(np.asarray(picks) == [1, 0, 1])
  assert (
    out["eval/mc/hand/0shot/acc_primary"] == out["eval/mc/hand/0shot/acc_norm"]
  )  # Task's default
  assert out["eval/mc/hand/0shot/num_examples"] == 3
  # The trailing space of 'Q2: ' was moved: context 'Q2:', continuation ' no'.
  rec = [r for r in out["details"] if r["example"] == 2]
  assert [(r["context"], r["continuation"]) for r in rec] == [("Q2:", " no"), ("Q2:", " yes")]
  assert tok.encode("Q2:") == seen[4][0][1:]
  # The anchors: BOS alone (lm-eval's acc_mutual_info) and BOS "Answer:" (LLaMA's).
  anchors = {tok.decode(ctx) for ctx, _ in seen[6:]}
  assert anchors == {"", "Answer:"} and [tok.bos_id] in [c for c, _ in seen[6:]]


def test_stderr_is_lm_evals_mean_stderr():
  from scipy import stats

  outcomes = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
  assert mc_metrics.mean_stderr(outcomes) == pytest.approx(stats.sem(outcomes, ddof=1))
  n, p = len(outcomes), np.mean(outcomes)
  assert mc_metrics.mean_stderr(outcomes) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
  assert math.isnan(mc_metrics.mean_stderr([1.0]))


def test_reported_stderr_matches_scipy(tok, model, monkeypatch):
  from scipy import stats

  monkeypatch.setattr(mc, "completion_logprobs", fake_scorer(tok, []))
  out = mc.evaluate(model, tok, hand_task(), metrics=["acc", "acc_norm"])
  # acc: right on example 1 only; acc_norm: on examples 0 and 2.
  assert out["eval/mc/hand/0shot/acc_stderr"] == pytest.approx(stats.sem([0, 1, 0]))
  assert out["eval/mc/hand/0shot/acc_norm_stderr"] == pytest.approx(stats.sem([1, 0, 1]))
  assert out["eval/mc/hand/0shot/acc_primary_stderr"] == out["eval/mc/hand/0shot/acc_norm_stderr"]


def test_encode_pair_is_lm_evals(tok):
  bos = [tok.bos_id]
  ctx, cont, ctx_ids, cont_ids = mc.encode_pair(tok, "Paris is the capital of \n ", "France", bos)
  assert (ctx, cont) == ("Paris is the capital of", " \n France")
  assert ctx_ids == bos + tok.encode(ctx)
  assert ctx_ids + cont_ids == bos + tok.encode("Paris is the capital of \n France")
  # Without trailing whitespace nothing moves.
  assert mc.encode_pair(tok, "A", " b", [])[:2] == ("A", " b")


def test_multiple_choice_end_to_end_on_jsonl(tok, model, tmp_path):
  rows = [
    {"context": "Paris is the capital of", "choices": ["France", "Germany", "Italy"], "label": 0},
    {"context": "Water boils at one hundred", "choices": ["degrees", "dogs"], "label": 0},
    {
      "contexts": ["The fox jumps over the", "The dog jumps over the"],
      "completion": "lazy dog.",
      "label": 0,
    },
    {"context": "A stitch in time saves", "choices": ["nine", "ten"], "label": 0},
  ]
  path = tmp_path / "task.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  examples = mc.read_jsonl(path)
  assert examples[0].completions == (" France", " Germany", " Italy")
  assert examples[0].choices == ("France", "Germany", "Italy")
  assert examples[2].contexts[1] == "The dog jumps over the"
  assert examples[2].choices == examples[2].contexts  # lm-eval's partial-scoring choices
  task = mc.Task("toy", tuple(examples))
  out = mc.evaluate(model, tok, task, num_shots=2, seed=3, return_details=True)
  assert out["eval/mc/toy/2shot/num_examples"] == 4
  # The log-likelihoods are the model's, computed here directly, one sequence at a time.
  records = out["details"]
  for r in records:
    ex = examples[r["example"]]
    prefix = mc.fewshot_prefix(task, r["example"], 2, 3)
    assert r["context"] == prefix + ex.contexts[r["choice"]]
    assert r["continuation"] == ex.completions[r["choice"]]
    ctx_ids = [tok.bos_id] + tok.encode(r["context"])
    comp = tok.encode(r["continuation"])
    lp = reference_logprobs(model, ctx_ids + comp, 128)[len(ctx_ids) - 1 :].sum()
    assert r["loglikelihood"] == pytest.approx(float(lp), abs=1e-4)
    assert r["num_tokens"] == len(comp)
  # The reported accuracies are the argmax picks of the records' scores.
  for metric in mc_metrics.DEFAULT_METRICS:
    picks = mc_metrics.picks(records, metric)
    assert out[f"eval/mc/toy/2shot/{metric}"] == np.mean(
      [p == ex.label for p, ex in zip(picks, examples)]
    )


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


@pytest.mark.parametrize(
  "line,message",
  [
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', "not an index"),
    ('{"context": "c", "choices": ["a", "b"], "label": "0"}', "'label' must be an int"),
    ('{"context": "c", "choices": "ab", "label": 0}', "'choices' must be a list"),
    ('{"context": 3, "choices": ["a", "b"], "label": 0}', "'context' must hold strings"),
    ('{"context": "c", "choices": ["a"], "label": 0}', ">= 2 choices"),
    ("[1, 2]", "expected a JSON object"),
    ('{"context": "c", "choices": ["a", "b"], "label": 0', "not JSON"),
  ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"context": "ok", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
  with pytest.raises(mc.TaskError, match=f"bad.jsonl:2: .*{message}"):
    mc.read_jsonl(path)


def test_tfds_records_become_llama_style_examples():
  ex = mc_tasks.piqa(
    {"goal": b"Open a jar", "sol1": b"Twist the lid", "sol2": b"Eat it", "label": 0, "id": b"x"}
  )
  assert ex.contexts[0] == "Question: Open a jar\nAnswer:" and ex.completions[1] == " Eat it"
  ex = mc_tasks.arc(
    {
      "question": b"Q",
      "answerKey": 2,
      "choices": {"text": np.array([b"a", b"b", b"c"]), "label": np.array([0, 1, 2])},
    }
  )
  assert ex.label == 2 and ex.completions == (" a", " b", " c")
  assert ex.choices == ("a", "b", "c")  # what acc_norm divides by, as lm-eval's doc_to_choice
  ex = mc_tasks.bool_q({"question": b"is it", "passage": b"P.", "answer": True, "title": b""})
  assert ex.contexts[0] == "P.\nQuestion: is it?\nAnswer:" and ex.label == 1
  ex = mc_tasks.hellaswag(
    {"context": "A man", "activity_label": "Cooking", "label": 1, "endings": ["cooks.", "sleeps."]}
  )
  assert ex.contexts[0] == "Cooking: A man" and ex.completions == (" cooks.", " sleeps.")
  ex = mc_tasks.openbookqa(
    {
      "question": {
        "stem": b"S",
        "choice_A": b"a",
        "choice_B": b"b",
        "choice_C": b"c",
        "choice_D": b"d",
      },
      "answerKey": 3,
    }
  )
  assert ex.label == 3 and ex.completions[3] == " d"
  ex = mc_tasks.winogrande(
    {
      "sentence": b"Ann lent Beth money because _ was rich.",
      "option1": b"Ann",
      "option2": b"Beth",
      "label": 0,
    }
  )
  assert ex.contexts == ("Ann lent Beth money because Ann", "Ann lent Beth money because Beth")
  assert ex.completions == (" was rich.", " was rich.")
  assert ex.choices == ex.contexts
  assert mc_tasks.TFDS_TASKS["bool_q"].primary == "acc_unconditional"
  assert mc_tasks.TFDS_TASKS["openbookqa"].primary == "acc_unconditional"
  assert mc_tasks.TFDS_TASKS["piqa"].primary == "acc_char"
  with pytest.raises(mc.TaskError, match="unknown multiple-choice metric 'acc_x'"):
    mc.Task("t", (ex,), primary="acc_x")


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
  assert out["eval/mc/piqa/1shot/num_examples"] == 5


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
  assert out["eval/memorization/num_documents"] == 4 and out["eval/memorization/skipped_short"] == 1
  assert out["eval/memorization/exact_rate"] == 0.25
  assert out["eval/memorization/approximate_rate"] == 0.75  # distance <= 10% of 50 = 5
