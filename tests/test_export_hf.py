"""`ablax export-hf`: ablax models as Hugging Face checkpoints, checked against transformers.

Tiny Gemma, Gemma 2 and Llama models with random weights (norm scales included,
so a (1 + scale) / scale mix-up shows) and one briefly trained model are saved
as ablax model directories, exported, loaded with transformers'
AutoModelForCausalLM in float32, and must give ablax's per-token
log-probabilities within 1e-4. HF checkpoints made by transformers go through
import-hf and export-hf and must come back tensor for tensor, byte for byte.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.eval.score import token_logprobs  # noqa: E402
from core.model_dir import hf_export, io  # noqa: E402
from launch import cli  # noqa: E402
from tests import test_hf_parity as parity  # noqa: E402
from tests.tiny_model import tiny_config  # noqa: E402
from tests.tiny_spm import WORDS, train_spm  # noqa: E402

TOL = 1e-4
VOCAB = 400  # the ablax tokenizer below: 4 specials, 256 bytes, user symbols, learned pieces
BASE = dict(vocab_size=VOCAB, embed_dim=64, head_dim=16, mlp_dim=96)
GEMMA = dict(activation="geglu", scale_embeddings=True, rms_scale_plus_one=True)
LLAMA = dict(
  activation="swiglu", scale_embeddings=False, rms_scale_plus_one=False, norm_placement="pre"
)
CONFIGS = {
  "gemma_mqa": tiny_config(
    **BASE, **GEMMA, num_layers=2, num_kv_heads=1, norm_placement="pre", tie_embeddings=True
  ),
  "gemma_untied_mha": tiny_config(
    **BASE,
    **GEMMA,
    num_layers=2,
    num_kv_heads=4,
    norm_placement="pre",
    tie_embeddings=False,
    rope_base=20_000.0,
  ),
  # Window 6 < sequence length, soft-caps that bind at these logit sizes,
  # query_pre_attn_scalar != head_dim, 3 layers (local, global, local).
  "gemma2": tiny_config(
    **BASE,
    **GEMMA,
    num_layers=3,
    num_kv_heads=2,
    norm_placement="pre_post",
    tie_embeddings=True,
    attention_pattern=("local", "global"),
    window=6,
    attn_softcap=2.0,
    final_softcap=5.0,
    query_pre_attn_scalar=24.0,
  ),
  "gemma2_global_untied": tiny_config(
    **BASE,
    **GEMMA,
    num_layers=2,
    num_kv_heads=1,
    norm_placement="pre_post",
    tie_embeddings=False,
    final_softcap=5.0,
  ),
  "llama_gqa": tiny_config(
    **BASE,
    **LLAMA,
    num_layers=2,
    num_kv_heads=2,
    tie_embeddings=False,
    rope_base=500_000.0,
    norm_eps=1e-5,
  ),
  # LLaMA's 2/3 * 4d MLP rule, tied, another RoPE base.
  "llama_mqa_tied": tiny_config(
    **dict(BASE, mlp_dim=0),
    **LLAMA,
    mlp_multiple_of=32,
    num_layers=2,
    num_kv_heads=1,
    tie_embeddings=True,
    rope_base=1_000_000.0,
  ),
}
HF_CLASSES = {
  "gemma": "GemmaForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "llama": "LlamaForCausalLM",
}


def random_params(config, seed=0, std=0.3):
  rng = np.random.default_rng(seed)
  return {
    name: rng.normal(0.0, std, shape).astype(np.float32)
    for name, (shape, _) in io.expected_shapes(config).items()
  }


def sample_ids(seed=2, length=24):
  return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


def load_hf(out):
  # Eager attention: the only transformers path that applies Gemma 2's attention soft-cap.
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(out), dtype=torch.float32, attn_implementation="eager"
  ).eval()


def max_logprob_diff(model, hf_model, ids):
  return float(np.abs(token_logprobs(model, ids) - parity.hf_logprobs(hf_model, ids)).max())


def export_dir(tmp_path, config, params, tokenizer=None):
  """Saves an ablax model directory and exports it; returns (model, export dir, info)."""
  model = io.model_from_params(config, params)
  io.save_model(tmp_path / "model", model, config, tokenizer_path=tokenizer)
  info = hf_export.export_hf(tmp_path / "model", tmp_path / "hf")
  return model, tmp_path / "hf", info


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exported_model_matches_transformers(name, tmp_path):
  config = CONFIGS[name]
  model, out, info = export_dir(tmp_path, config, random_params(config))
  hf_model = load_hf(out)
  assert type(hf_model).__name__ == HF_CLASSES[info["family"]] == info["hf_architecture"]
  assert name.startswith(info["family"])
  ids = sample_ids()
  diff = max_logprob_diff(model, hf_model, ids)
  print(f"{name}: max |delta log-prob| {diff:.3g}")
  assert diff < TOL, f"{name}: max |log-prob difference| {diff:.3g}"


def test_parity_detects_a_wrong_convention(tmp_path):
  """The comparison above is not vacuous: the same weights read another way disagree."""
  config = CONFIGS["gemma2"]
  params = random_params(config)
  _, out, _ = export_dir(tmp_path, config, params)
  hf_model = load_hf(out)
  for change in (dict(rms_scale_plus_one=False), dict(final_softcap=None), dict(window=5)):
    wrong = io.model_from_params(config.replace(**change), params)
    assert max_logprob_diff(wrong, hf_model, sample_ids()) > 100 * TOL, change


def test_scanned_layers_export_the_same_checkpoint(tmp_path):
  """Files never depend on how the layers run: a scan_layers model exports per-layer tensors."""
  config = CONFIGS["gemma2_global_untied"]
  params = random_params(config, seed=5)
  hf_export.write_hf(tmp_path / "plain", params, config)
  _, scanned, _ = export_dir(tmp_path, config.replace(scan_layers=True), params)
  plain, back = _tensors(tmp_path / "plain"), _tensors(scanned)
  assert sorted(back) == sorted(plain)
  assert all(torch.equal(back[name], plain[name]) for name in plain)


def _train(config, params, steps=10):
  """A few Adam steps on a fixed batch: weights no random draw produces."""
  import optax

  model = io.model_from_params(config, params)
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  batch = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, (4, 17)))
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(state, opt_state):
    def loss(state):
      logits = nnx.merge(graphdef, state, rest)(batch[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(logp, batch[:, 1:, None], -1).mean()

    value, grads = jax.value_and_grad(loss)(state)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(state, updates), opt_state, value

  opt_state = optimizer.init(state)
  losses = []
  for _ in range(steps):
    state, opt_state, value = step(state, opt_state)
    losses.append(float(value))
  return nnx.merge(graphdef, state, rest), losses


def test_trained_llama_matches_transformers(tmp_path):
  config = CONFIGS["llama_gqa"]
  init = {
    n: np.ones_like(a) if n.endswith("/scale") else a
    for n, a in random_params(config, seed=4, std=0.1).items()
  }
  trained, losses = _train(config, init)
  assert losses[-1] < losses[0] - 0.5, losses
  params = {n: np.asarray(a) for n, a in io.flat_params(trained).items()}
  model, out, _ = export_dir(tmp_path, config, params)
  ids = sample_ids(seed=7, length=17)
  diff = max_logprob_diff(model, load_hf(out), ids)
  print(
    f"trained llama_gqa: max |delta log-prob| {diff:.3g} (loss {losses[0]:.3f} -> {losses[-1]:.3f})"
  )
  assert diff < TOL


# -- tokenizer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablax_tokenizer(tmp_path_factory):
  from core.tokenizer.train import train_tokenizer

  rng = np.random.default_rng(0)
  lines = [
    " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + f" {i}." for i in range(400)
  ]
  root = tmp_path_factory.mktemp("tok")
  tokenizer = train_tokenizer(lines, root / "ablax.model", vocab_size=VOCAB, num_threads=1)
  assert tokenizer.vocab_size == VOCAB
  return tokenizer


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, ablax_tokenizer):
  """(ablax model directory with the tokenizer, its model) of the Gemma 2 config."""
  root = tmp_path_factory.mktemp("gemma2")
  config = CONFIGS["gemma2"]
  model = io.model_from_params(config, random_params(config, seed=1))
  io.save_model(root / "model", model, config, tokenizer_path=ablax_tokenizer.path)
  return root / "model", model


TEXTS = [
  "the model attention layer window",
  " a leading space",
  "two  spaces\nand a newline",
  "trailing space ",
  "ünïcödé 数字 123 digits",
  "",
]


def test_cli_exports_model_and_tokenizer(gemma2_dir, ablax_tokenizer, tmp_path, capsys):
  model_dir, model = gemma2_dir
  out = tmp_path / "hf"
  assert cli.main(["export-hf", str(model_dir), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "exported Gemma2ForCausalLM" in printed and "tokenizer: GemmaTokenizer" in printed
  assert sorted(p.name for p in out.iterdir()) == [
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
  ]
  hf_config = json.loads((out / "config.json").read_text())
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (
    ablax_tokenizer.bos_id,
    ablax_tokenizer.eos_id,
    ablax_tokenizer.pad_id,
  )

  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert type(hf_tok).__name__ == "GemmaTokenizer" and len(hf_tok) == VOCAB
  for text in TEXTS:
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ablax_tokenizer.encode(text), text
  # transformers, like SentencePiece itself, reads a literal '\u2581' as a space; ablax's
  # Tokenizer keeps it (as bytes). The one known difference, documented in hf_export.
  meta = "a literal \u2581 here"
  assert (
    hf_tok(meta, add_special_tokens=False)["input_ids"]
    == ablax_tokenizer.processor.encode(meta)
    != ablax_tokenizer.encode(meta)
  )
  # With special tokens, transformers prepends BOS as `ablax score` does.
  text = TEXTS[0]
  ids = hf_tok(text)["input_ids"]
  assert ids == [ablax_tokenizer.bos_id] + ablax_tokenizer.encode(text)
  assert hf_tok.decode(ids, skip_special_tokens=True) == text
  diff = max_logprob_diff(model, load_hf(out), ids)
  assert diff < TOL, f"gemma2 on tokenized text: {diff:.3g}"

  # A second export refuses to clobber; --overwrite replaces it.
  assert cli.main(["export-hf", str(model_dir), "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert cli.main(["export-hf", str(model_dir), "--out", str(out), "--overwrite"]) == 0


def test_dummy_prefix_tokenizer_exports_as_llama_tokenizer(tmp_path):
  # SentencePiece's defaults (what tests/tiny_spm.py trains): a dummy prefix and NFKC.
  tokenizer = train_spm(tmp_path)
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
  config = CONFIGS["llama_gqa"].replace(vocab_size=sp.get_piece_size())
  params = random_params(config)
  info = hf_export.write_hf(tmp_path / "hf", params, config, tokenizer_path=tokenizer)
  assert info["tokenizer"] == "LlamaTokenizer"
  assert "nmt_nfkc" in info["tokenizer_note"] and "tokenize differently" in info["tokenizer_note"]
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  text = "the model attention layer window"
  assert hf_tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)


# -- round trip: transformers -> import-hf -> export-hf -----------------------------------


def _tensors(hf_dir):
  from safetensors import safe_open

  out = {}
  for path in sorted(hf_dir.glob("*.safetensors")):
    with safe_open(str(path), framework="pt") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


@pytest.mark.parametrize(
  "family,dtype",
  [("gemma", "float32"), ("gemma2", "float32"), ("llama", "float32"), ("llama", "bfloat16")],
)
def test_import_then_export_is_byte_identical(family, dtype, tmp_path, capsys):
  hf_dir = tmp_path / "hf"
  hf_model = parity.build_hf(family, tmp_path / "built")
  hf_model.to(getattr(torch, dtype)).save_pretrained(hf_dir)
  assert (
    cli.main(["import-hf", str(hf_dir), "--out", str(tmp_path / "ablax"), "--param_dtype", dtype])
    == 0
  )
  assert cli.main(["export-hf", str(tmp_path / "ablax"), "--out", str(tmp_path / "back")]) == 0
  capsys.readouterr()
  original, back = _tensors(hf_dir), _tensors(tmp_path / "back")
  assert sorted(back) == sorted(original)
  for name, tensor in original.items():
    assert back[name].dtype == tensor.dtype == getattr(torch, dtype), name
    assert back[name].shape == tensor.shape, name
    assert (
      back[name].contiguous().view(torch.uint8).numpy().tobytes()
      == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    ), name
  # Every config.json key we write says what transformers wrote.
  want = json.loads((hf_dir / "config.json").read_text())
  got = json.loads((tmp_path / "back" / "config.json").read_text())
  differ = {k: (got[k], want[k]) for k in got if k in want and got[k] != want[k]}
  assert not differ
  assert set(got) - set(want) == set()


# -- what the exporter refuses ------------------------------------------------------------


@pytest.mark.parametrize(
  "base,change,match",
  [
    ("gemma_mqa", dict(norm_placement="post"), "norm_placement='post'"),
    ("llama_gqa", dict(position_embedding="learned"), "position_embedding='learned'"),
    ("llama_gqa", dict(position_embedding="none"), "position_embedding='none'"),
    ("gemma_mqa", dict(norm="layernorm"), "norm='layernorm'"),
    ("llama_gqa", dict(activation="relu"), "activation='relu'"),
    ("llama_gqa", dict(activation="reglu"), "activation='reglu'"),
    (
      "llama_gqa",
      dict(activation="geglu"),
      "activation='geglu'.*LlamaForCausalLM, needs activation='swiglu'",
    ),
    ("gemma_mqa", dict(scale_embeddings=False), "scale_embeddings=False.*GemmaForCausalLM"),
    ("gemma2", dict(rms_scale_plus_one=False), "rms_scale_plus_one=False.*Gemma2ForCausalLM"),
    ("llama_gqa", dict(attn_softcap=50.0), "attn_softcap=50.0: only Gemma 2"),
    ("gemma_mqa", dict(final_softcap=30.0), "final_softcap=30.0: only Gemma 2"),
    (
      "llama_gqa",
      dict(attention_pattern=("local", "global"), window=4),
      r"attention_pattern=\('local', 'global'\).*sliding-window",
    ),
    ("gemma_mqa", dict(query_pre_attn_scalar=24.0), "query_pre_attn_scalar=24.0"),
    ("gemma2", dict(query_pre_attn_scalar=24.5), "integer query_pre_attn_scalar"),
  ],
)
def test_unrepresentable_configs_name_the_field(base, change, match):
  config = CONFIGS[base].replace(**change)
  with pytest.raises(hf_export.HFExportError, match=match):
    hf_export.family_of(config)


def test_every_problem_is_named_at_once():
  config = CONFIGS["gemma_mqa"].replace(
    norm="layernorm", position_embedding="learned", norm_placement="post", activation="relu"
  )
  with pytest.raises(hf_export.HFExportError) as e:
    hf_export.family_of(config)
  message = str(e.value)
  assert "\n" not in message
  for field in (
    "norm='layernorm'",
    "position_embedding='learned'",
    "norm_placement='post'",
    "activation='relu'",
  ):
    assert field in message


def _fails(capsys, *argv):
  assert cli.main(["export-hf", *argv]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert err.startswith("ablax export-hf: ") and len(err.splitlines()) == 1, err
  return err


def test_cli_errors_are_one_line(gemma2_dir, tmp_path, capsys):
  model_dir, _ = gemma2_dir
  out = tmp_path / "out"
  assert "model directory not found" in _fails(capsys, str(tmp_path / "nowhere"), "--out", str(out))
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "no ablax_model.json" in _fails(capsys, str(empty), "--out", str(out))

  no_params = tmp_path / "no_params"
  shutil.copytree(model_dir, no_params)
  shutil.rmtree(no_params / "params")
  err = _fails(capsys, str(no_params), "--out", str(out))
  assert f"{no_params / 'params'} is missing" in err

  no_tokenizer = tmp_path / "no_tokenizer"
  shutil.copytree(model_dir, no_tokenizer)
  (no_tokenizer / "tokenizer.model").unlink()
  assert "tokenizer.model is missing" in _fails(capsys, str(no_tokenizer), "--out", str(out))

  unreadable = tmp_path / "unreadable"
  shutil.copytree(model_dir, unreadable)
  (unreadable / "ablax_model.json").write_text("{not json")
  assert "not valid JSON" in _fails(capsys, str(unreadable), "--out", str(out))

  # Parameters that do not match the config: io's multi-line listing, kept to one line.
  edited = tmp_path / "edited"
  shutil.copytree(model_dir, edited)
  manifest = json.loads((edited / "ablax_model.json").read_text())
  manifest["config"]["mlp_dim"] = 64
  (edited / "ablax_model.json").write_text(json.dumps(manifest))
  err = _fails(capsys, str(edited), "--out", str(out))
  assert "do not match the model config" in err and "lines of detail" in err

  # An unrepresentable config fails before any weight is read.
  post = tmp_path / "post"
  shutil.copytree(model_dir, post)
  shutil.rmtree(post / "params")
  manifest = json.loads((post / "ablax_model.json").read_text())
  manifest["config"]["norm_placement"] = "post"
  (post / "ablax_model.json").write_text(json.dumps(manifest))
  assert "norm_placement='post'" in _fails(capsys, str(post), "--out", str(out))

  # Nothing was written by any of the failures, and a foreign directory is never replaced.
  assert not out.exists()
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  assert "not a Hugging Face checkpoint" in _fails(
    capsys, str(model_dir), "--out", str(mine), "--overwrite"
  )
  assert (mine / "notes.txt").read_text() == "keep"
