"""A plain JAX + optax LLaMA train step of cpu_bench's shape: the no-framework peer.

RMSNorm, RoPE, SwiGLU, causal MHA, untied embeddings, AdamW with clipping, as
simply as it can be written. No ablax import: bench/train_throughput.py --peer
times it against ablax's own step in the same process.
"""

import jax
import jax.numpy as jnp
import optax

VOCAB, D, LAYERS, HEADS, HEAD_DIM, MLP = 4096, 512, 5, 8, 64, 1536  # cpu_bench


def init(key):
  def dense(key, *shape):
    return jax.random.normal(key, shape) * shape[0] ** -0.5

  keys = iter(jax.random.split(key, 2 + 7 * LAYERS))
  layer = lambda: {
    "attn_norm": jnp.ones(D),
    "q": dense(next(keys), D, HEADS * HEAD_DIM),
    "k": dense(next(keys), D, HEADS * HEAD_DIM),
    "v": dense(next(keys), D, HEADS * HEAD_DIM),
    "o": dense(next(keys), HEADS * HEAD_DIM, D),
    "mlp_norm": jnp.ones(D),
    "gate": dense(next(keys), D, MLP),
    "up": dense(next(keys), D, MLP),
    "down": dense(next(keys), MLP, D),
  }
  return {
    "embed": dense(next(keys), VOCAB, D),
    "layers": [layer() for _ in range(LAYERS)],
    "norm": jnp.ones(D),
    "unembed": dense(next(keys), D, VOCAB),
  }


def rms_norm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def rope(x):  # x: (B, T, heads, head_dim)
  t, half = x.shape[1], x.shape[-1] // 2
  angle = jnp.arange(t)[:, None] * 10_000.0 ** (-jnp.arange(half) / half)
  sin, cos = jnp.sin(angle)[:, None], jnp.cos(angle)[:, None]
  a, b = x[..., :half], x[..., half:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def forward(params, tokens):
  b, t = tokens.shape
  x = params["embed"][tokens]
  causal = jnp.tril(jnp.ones((t, t), bool))
  for p in params["layers"]:
    h = rms_norm(x, p["attn_norm"])
    q, k, v = (h @ p[n] for n in "qkv")
    q, k, v = (y.reshape(b, t, HEADS, HEAD_DIM) for y in (q, k, v))
    q, k = rope(q), rope(k)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / HEAD_DIM**0.5
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), -1)
    x = x + jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, D) @ p["o"]
    h = rms_norm(x, p["mlp_norm"])
    x = x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]
  return rms_norm(x, params["norm"]) @ params["unembed"]


def loss_fn(params, inputs, targets):
  logp = jax.nn.log_softmax(forward(params, inputs))
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


optimizer = optax.chain(
  optax.clip_by_global_norm(1.0),
  optax.adamw(
    optax.warmup_cosine_decay_schedule(0, 1e-3, 10, 1000, 1e-4), b1=0.9, b2=0.95, weight_decay=0.1
  ),
)


@jax.jit
def train_step(params, opt_state, inputs, targets):
  loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss
