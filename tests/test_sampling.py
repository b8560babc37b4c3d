"""Cached decoding equals full recomputation; sampling options; `ablax sample`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from core.eval.sampling import Sampler, SamplingError, generate, sample_logits
from core.model.cache import init_cache
from core.model.transformer import Transformer
from tests.tiny_model import FAMILIES, tiny_config

VARIANTS = {
  "gemma": FAMILIES["gemma"],
  # window 4 < sequence length: local layers must forget what left the window.
  "gemma2": {**FAMILIES["gemma2"], "window": 4},
  "llama": FAMILIES["llama"],
  "learned_positions": dict(position_embedding="learned", norm="layernorm", activation="relu"),
}


def tiny_model(variant: str, seed: int = 0) -> Transformer:
  return Transformer(tiny_config(**VARIANTS[variant]), rngs=nnx.Rngs(seed))


def random_prompt(n: int, seed: int, vocab: int = 97) -> list[int]:
  return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _forward_fn(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


_forward = jax.jit(_forward_fn, static_argnums=0)


def full_logits(model, sequences, width: int = 32, rows: int = 4) -> list[np.ndarray]:
  """Uncached logits of each sequence: one compiled forward pass of a fixed shape.

  Right padding changes nothing before it (causality), and a fixed (rows, width)
  shape compiles once per model instead of once per sequence length.
  """
  tokens = np.zeros((rows, width), np.int32)
  for r, seq in enumerate(sequences):
    tokens[r, : len(seq)] = seq
  graphdef, state = nnx.split(model)
  logits = np.asarray(_forward(graphdef, state, jnp.asarray(tokens)))
  return [logits[r, : len(seq)] for r, seq in enumerate(sequences)]


@pytest.mark.parametrize(
  "variant", ["gemma", "gemma2", "llama", pytest.param("learned_positions", marks=pytest.mark.slow)]
)
def test_cached_greedy_decoding_equals_full_recomputation(variant):
  model = tiny_model(variant)
  prompt = random_prompt(7, seed=1)
  gen = generate(model, prompt, max_new_tokens=12, return_logits=True)
  new = gen.tokens[0]
  assert len(new) == 12 and not gen.stopped[0]
  # Logits are causal: one forward pass over prompt + generated text gives, at
  # position len(prompt) - 1 + t, what step t should have seen.
  full = full_logits(model, [prompt + new])[0]
  steps = full[len(prompt) - 1 : len(prompt) - 1 + len(new)]
  np.testing.assert_allclose(gen.logits[0], steps, atol=1e-5, rtol=0)
  assert new == np.argmax(steps, axis=-1).tolist()


@pytest.mark.parametrize("variant", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_cached_and_uncached_generation_agree(variant):
  model = tiny_model(variant)
  prompts = [random_prompt(5, seed=2), random_prompt(9, seed=3)]
  kwargs = dict(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=4, return_logits=True)
  cached = generate(model, prompts, **kwargs)
  uncached = generate(model, prompts, use_cache=False, **kwargs)
  assert cached.tokens == uncached.tokens
  np.testing.assert_allclose(cached.logits, uncached.logits, atol=1e-5, rtol=0)


def test_left_padded_batch_equals_one_prompt_at_a_time():
  model = tiny_model("gemma2")
  prompts = [random_prompt(3, seed=5), random_prompt(11, seed=6), random_prompt(6, seed=7)]
  batch = generate(model, prompts, max_new_tokens=10, return_logits=True)
  fulls = full_logits(model, [p + t for p, t in zip(prompts, batch.tokens)])
  for r, prompt in enumerate(prompts):
    steps = fulls[r][len(prompt) - 1 : len(prompt) - 1 + 10]
    np.testing.assert_allclose(batch.logits[r], steps, atol=1e-5, rtol=0)
    assert batch.tokens[r] == np.argmax(steps, axis=-1).tolist()


def test_prefill_in_chunks_equals_one_forward_pass():
  model = tiny_model("gemma2")
  seqs = [random_prompt(20, seed=8), random_prompt(20, seed=9)]
  full = np.stack(full_logits(model, seqs))
  graphdef, state = nnx.split(model)

  @jax.jit
  def chunk(state, tokens, cache):
    return nnx.merge(graphdef, state)(tokens, cache=cache)

  tokens = jnp.asarray(seqs)
  cache = init_cache(model.config, batch=2, max_len=24)
  pieces = []
  for start in range(0, 20, 5):
    logits, cache = chunk(state, tokens[:, start : start + 5], cache)
    pieces.append(logits)
  assert int(cache.index) == 20
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_eos_stops_a_row_and_the_rest_go_on():
  model = tiny_model("llama")
  prompts = [random_prompt(4, seed=10), random_prompt(4, seed=11)]
  free = generate(model, prompts, max_new_tokens=6)
  eos = free.tokens[0][2]  # the third token row 0 produces
  stopped = generate(model, prompts, max_new_tokens=6, eos_id=eos)
  assert stopped.stopped[0] and stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(eos)]
  if eos not in free.tokens[1]:
    assert stopped.tokens[1] == free.tokens[1] and not stopped.stopped[1]


def test_sampler_restrictions():
  logits = jnp.asarray([[0.0, 3.0, 2.0, 1.0, -1.0]] * 4)
  keys = jax.random.split(jax.random.key(0), 200)

  def support(sampler):
    draw = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, sampler)))
    return set(np.asarray(draw(keys)).ravel())

  assert support(Sampler(0.0)) == {1}
  assert support(Sampler(1.0, top_k=2)) == {1, 2}
  # softmax([3, 2, 1, 0, -1]) = .64, .24, .09, ...: top_p .8 keeps the first two.
  assert support(Sampler(1.0, top_p=0.8)) == {1, 2}
  assert support(Sampler(5.0)) == {0, 1, 2, 3, 4}
  # Ids past the tokenizer (a padded table) are never produced, greedy or sampled.
  assert support(Sampler(0.0, vocab_limit=1)) == {0}
  assert support(Sampler(5.0, vocab_limit=3)) == {0, 1, 2}


def test_bad_arguments_are_clear_errors():
  model = tiny_model("gemma")
  with pytest.raises(SamplingError, match="temperature"):
    generate(model, [1, 2], 3, temperature=-1)
  with pytest.raises(SamplingError, match="vocabulary"):
    generate(model, [1, 500], 3)
  with pytest.raises(SamplingError, match="at least one token"):
    generate(model, [[]], 3)
  learned = tiny_model("learned_positions")
  with pytest.raises(SamplingError, match="max_seq_len"):
    generate(learned, [1] * 60, 10)
