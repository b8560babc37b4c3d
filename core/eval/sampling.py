"""Text generation with a key/value cache: greedy, temperature, top-k and top-p sampling.

`generate` left-pads the prompts of a batch to a common length, runs them
through the model once (prefill) to fill the cache (core/model/cache.py), then
produces one token per step inside a single jitted `lax.while_loop`, so a whole
generation is one device call. With `use_cache=False` every step recomputes the
full forward pass instead; that path exists as the reference the cached one is
tested against, and to measure what the cache saves.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import UserError
from core.model.cache import init_cache


class SamplingError(UserError, ValueError):
  """Generation arguments that cannot work with the given model."""


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen from the logits.

  temperature 0 is greedy (argmax). Otherwise logits are divided by the
  temperature, restricted to the top_k most likely tokens (None: all), then to
  the smallest set whose probability reaches top_p (None or 1: all), and sampled.
  Ids >= vocab_limit are never chosen (a model table padded beyond its
  tokenizer has rows no text maps to).
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None
  vocab_limit: int | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise SamplingError(f"top_k must be >= 1 or None, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise SamplingError(f"top_p must be in (0, 1] or None, got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def sample_logits(logits: jax.Array, key: jax.Array, sampler: Sampler) -> jax.Array:
  """Token ids (B,) drawn from float32 logits (B, V) as `sampler` says."""
  if sampler.vocab_limit is not None and sampler.vocab_limit < logits.shape[-1]:
    ids = jnp.arange(logits.shape[-1])
    logits = jnp.where(ids < sampler.vocab_limit, logits, jnp.finfo(jnp.float32).min)
  if sampler.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampler.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampler.top_k is not None and sampler.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampler.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sampler.top_p is not None and sampler.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the mass strictly before it is below top_p, so the
    # most likely token always survives.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < sampler.top_p, ordered, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  """The result of `generate`.

  Attributes:
    tokens: per prompt, the new token ids, up to (not including) eos.
    stopped: per prompt, whether it ended with eos (else max_new_tokens ran out).
    logits: (B, max_new_tokens, V) float32 logits each step chose from, when
      asked for (return_logits=True); rows past their eos hold what the model
      computed for the padding it was fed.
    seconds: wall time of the generation (compilation excluded when warm).
  """

  tokens: list[list[int]]
  stopped: list[bool]
  logits: np.ndarray | None = None
  seconds: float = 0.0

  @property
  def num_tokens(self) -> int:
    return sum(len(t) + int(s) for t, s in zip(self.tokens, self.stopped))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """(tokens, segment_ids, positions) (B, P) int32 of prompts left-padded to the longest."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise SamplingError("every prompt needs at least one token (e.g. BOS)")
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  segments = np.zeros((len(prompts), width), np.int32)
  positions = np.zeros((len(prompts), width), np.int32)
  for r, p in enumerate(prompts):
    n = len(p)
    tokens[r, width - n :] = np.asarray(p, np.int32)
    segments[r, width - n :] = 1
    positions[r, width - n :] = np.arange(n)
  return tokens, segments, positions


def past_context(config, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> str | None:
  """What to warn of when the longest prompt plus max_new_tokens passes max_seq_len, else None.

  Learned positions cannot go past it (`generate` refuses); RoPE and no
  positions can, into lengths the model never trained on.
  """
  longest = max((len(p) for p in prompts), default=0) + max_new_tokens
  if longest <= config.max_seq_len or config.position_embedding == "learned":
    return None
  return (
    f"prompt + max_new_tokens = {longest} tokens runs past max_seq_len "
    f"{config.max_seq_len}, the context the model was trained for "
    f"(position_embedding={config.position_embedding!r}); text past it may degrade"
  )


def generate(
  model: nnx.Module,
  prompts: Sequence[Sequence[int]] | Sequence[int],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  seed: int = 0,
  eos_id: int | None = None,
  pad_id: int = 0,
  use_cache: bool = True,
  return_logits: bool = False,
  vocab_limit: int | None = None,
) -> Generation:
  """Continues each prompt by up to `max_new_tokens` tokens.

  Args:
    model: a core.model Transformer.
    prompts: token ids of one prompt, or a list of prompts (lengths may differ).
    max_new_tokens: tokens to generate per prompt.
    temperature, top_k, top_p: see Sampler (temperature 0 = greedy).
    seed: PRNG seed of the sampling (unused when greedy).
    eos_id: a prompt stops at this id; None or < 0 never stops early.
    pad_id: id fed for padding (its value never matters: padding is masked).
    use_cache: decode with the key/value cache (False recomputes every step).
    return_logits: keep the logits of every step (B, max_new_tokens, V).
    vocab_limit: never produce ids >= this (the tokenizer's size when the
      model's table is padded beyond it).
  """
  if len(prompts) and np.ndim(prompts[0]) == 0:
    prompts = [prompts]
  prompts = [[int(t) for t in p] for p in prompts]
  if max_new_tokens < 1:
    raise SamplingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  sampler = Sampler(float(temperature), top_k, top_p, vocab_limit)
  config = model.config
  tokens, segments, positions = left_pad(prompts, pad_id)
  bad = tokens[(tokens < 0) | (tokens >= config.vocab_size)]
  if bad.size:
    raise SamplingError(
      f"prompt ids {sorted(set(bad.tolist()))[:10]} are outside the model's "
      f"vocabulary [0, {config.vocab_size})"
    )
  longest = max(len(p) for p in prompts) + max_new_tokens
  if config.position_embedding == "learned" and longest > config.max_seq_len:
    raise SamplingError(
      f"prompt + max_new_tokens = {longest} exceeds max_seq_len "
      f"{config.max_seq_len} of the learned position table"
    )
  eos = -1 if eos_id is None else int(eos_id)
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed)
  # eos and pad are traced, not static: changing them needs no recompilation.
  args = (
    jnp.asarray(tokens),
    jnp.asarray(segments),
    jnp.asarray(positions),
    key,
    jnp.asarray(eos, jnp.int32),
    jnp.asarray(pad_id, jnp.int32),
  )
  start = time.perf_counter()
  if use_cache:
    out, stopped, logits = _generate_cached(
      graphdef, state, *args, max_new_tokens, sampler, return_logits
    )
  else:
    out, stopped, logits = _generate_uncached(
      graphdef, state, *args, max_new_tokens, sampler, return_logits, config.vocab_size
    )
  out, stopped = np.asarray(out), np.asarray(stopped)
  seconds = time.perf_counter() - start
  rows = []
  for r in range(len(prompts)):
    row = out[r].tolist()
    rows.append(row[: row.index(eos)] if stopped[r] else row)
  return Generation(
    tokens=rows,
    stopped=[bool(s) for s in stopped],
    logits=None if logits is None else np.asarray(logits),
    seconds=seconds,
  )


def _record(buffers, step, tok, logits, done, eos, pad_id):
  out, kept = buffers
  tok = jnp.where(done, pad_id, tok)
  out = out.at[:, step].set(tok)
  if kept is not None:
    kept = kept.at[:, step].set(logits)
  return (out, kept), tok, done | (tok == eos)


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10))
def _generate_cached(
  graphdef, state, tokens, segments, positions, key, eos, pad_id, max_new, sampler, return_logits
):
  model = nnx.merge(graphdef, state)
  batch, width = tokens.shape
  cache = init_cache(model.config, batch, width + max_new)
  logits, cache = model(tokens, positions, segments, cache=cache)
  last = logits[:, -1]
  next_pos = positions[:, -1] + 1
  out = jnp.full((batch, max_new), pad_id, jnp.int32)
  kept = jnp.zeros((batch, max_new, last.shape[-1]), jnp.float32) if return_logits else None
  done = jnp.zeros((batch,), bool)

  def cond(carry):
    step, _, _, _, _, done, _ = carry
    return (step < max_new) & ~jnp.all(done)

  def body(carry):
    step, cache, last, pos, buffers, done, key = carry
    key, sub = jax.random.split(key)
    tok = sample_logits(last, sub, sampler)
    buffers, tok, done = _record(buffers, step, tok, last, done, eos, pad_id)
    logits, cache = model(tok[:, None], pos[:, None], cache=cache)
    return step + 1, cache, logits[:, 0], pos + 1, buffers, done, key

  carry = (jnp.zeros((), jnp.int32), cache, last, next_pos, (out, kept), done, key)
  _, _, _, _, (out, kept), done, _ = jax.lax.while_loop(cond, body, carry)
  return out, done, kept


def _generate_uncached(
  graphdef,
  state,
  tokens,
  segments,
  positions,
  key,
  eos,
  pad_id,
  max_new,
  sampler,
  return_logits,
  vocab_size,
):
  batch, width = tokens.shape
  # One buffer of the final length: future slots are masked by causality, so
  # one compiled forward pass serves every step.
  buf = jnp.concatenate([tokens, jnp.full((batch, max_new), pad_id, jnp.int32)], axis=1)
  segs = jnp.concatenate([segments, jnp.ones((batch, max_new), jnp.int32)], axis=1)
  pos = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(max_new)[None]], axis=1)
  out = jnp.full((batch, max_new), pad_id, jnp.int32)
  kept = jnp.zeros((batch, max_new, vocab_size), jnp.float32) if return_logits else None
  done = jnp.zeros((batch,), bool)
  buffers = (out, kept)
  for step in range(max_new):
    key, sub = jax.random.split(key)
    buf, buffers, done = _uncached_step(
      graphdef,
      state,
      buf,
      segs,
      pos,
      sub,
      buffers,
      done,
      jnp.asarray(step, jnp.int32),
      eos,
      pad_id,
      width,
      sampler,
    )
    if bool(jnp.all(done)):
      break
  return buffers[0], done, buffers[1]


@functools.partial(jax.jit, static_argnums=(0, 11, 12))
def _uncached_step(
  graphdef, state, buf, segs, pos, key, buffers, done, step, eos, pad_id, width, sampler
):
  model = nnx.merge(graphdef, state)
  logits = model(buf, pos, segs)
  last = jax.lax.dynamic_index_in_dim(logits, width + step - 1, axis=1, keepdims=False)
  tok = sample_logits(last, key, sampler)
  buffers, tok, done = _record(buffers, step, tok, last, done, eos, pad_id)
  buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, width + step))
  return buf, buffers, done
