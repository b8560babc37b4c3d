"""Parity with Hugging Face transformers: the model components are the published architectures.

Tiny random Gemma, Gemma 2 and LLaMA models are built with transformers (float32,
eager attention), saved with `save_pretrained`, converted with ablax's importer,
and must give the same per-token log-probabilities within 1e-4. Every weight,
norm scales included, is drawn at random: HF initializes Gemma's norm scales to
0 and LLaMA's to 1, which would hide a (1 + scale) / scale mix-up.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from core.eval.score import token_logprobs  # noqa: E402
from core.model_dir import hf_import, io  # noqa: E402
from launch import cli  # noqa: E402
from tests.tiny_spm import train_spm  # noqa: E402

TOL = 1e-4
VOCAB = 320
COMMON = dict(
  vocab_size=VOCAB,
  hidden_size=64,
  intermediate_size=96,
  num_attention_heads=4,
  attn_implementation="eager",
  dtype="float32",
)
FAMILIES = {
  # Gemma 2B's choice: multi-query attention.
  "gemma": (
    "GemmaConfig",
    "GemmaForCausalLM",
    dict(COMMON, num_hidden_layers=2, num_key_value_heads=1, head_dim=16),
    0.1,
  ),
  # Window 6 < sequence length; soft-caps small enough to bind at these logit
  # sizes; query_pre_attn_scalar != head_dim; 3 layers (local, global, local).
  "gemma2": (
    "Gemma2Config",
    "Gemma2ForCausalLM",
    dict(
      COMMON,
      num_hidden_layers=3,
      num_key_value_heads=2,
      head_dim=16,
      sliding_window=6,
      attn_logit_softcapping=2.0,
      final_logit_softcapping=5.0,
      query_pre_attn_scalar=24,
    ),
    0.2,
  ),
  # Grouped-query attention (4 query heads over 2 kv heads), LLaMA 3's theta and eps.
  "llama": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
      COMMON, num_hidden_layers=2, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5
    ),
    0.3,
  ),
}
LENGTH = 24


def build_hf(family, out_dir, seed=0, **save_kwargs):
  """A random HF model of `family`, saved to out_dir; returns the torch model."""
  config_cls, model_cls, kwargs, std = FAMILIES[family]
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * std)
  model.save_pretrained(out_dir, **save_kwargs)
  return model


def hf_logprobs(model, ids):
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits.float()[0]
  logp = torch.log_softmax(logits, dim=-1)
  return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def sample_ids(seed=2, length=LENGTH):
  return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
  hf_dir = tmp_path_factory.mktemp("gemma2")
  hf_model = build_hf("gemma2", hf_dir)
  model, config, info = hf_import.import_hf(hf_dir)
  return hf_dir, hf_model, model, config


def test_gemma_multi_query_matches_transformers(tmp_path):
  hf_model = build_hf("gemma", tmp_path / "hf")
  model, config, info = hf_import.import_hf(tmp_path / "hf")
  assert info["family"] == "gemma"
  assert (
    config.num_kv_heads,
    config.activation,
    config.tie_embeddings,
    config.scale_embeddings,
    config.rms_scale_plus_one,
    config.norm_placement,
  ) == (1, "geglu", True, True, True, "pre")
  ids = sample_ids()
  diff = np.abs(token_logprobs(model, ids) - hf_logprobs(hf_model, ids)).max()
  assert diff < TOL, f"gemma: max |log-prob difference| {diff:.3g}"


def test_an_imported_checkpoint_runs_with_scanned_layers(tmp_path):
  # HF tensors are per layer; model_from_params stacks them for scan_layers, and the
  # scanned model keeps transformers' log-probabilities.
  hf_model = build_hf("llama", tmp_path / "hf")
  model, config, _ = hf_import.import_hf(tmp_path / "hf")
  scanned = io.model_from_params(config.replace(scan_layers=True), io.flat_params(model))
  ids = sample_ids()
  diff = np.abs(token_logprobs(scanned, ids) - hf_logprobs(hf_model, ids)).max()
  assert diff < TOL, f"scanned llama: max |log-prob difference| {diff:.3g}"


def test_gemma2_window_softcaps_and_query_scalar_match_transformers(gemma2):
  _, hf_model, model, config = gemma2
  assert config.attention_pattern == ("local", "global")  # HF: even layers slide
  assert config.layer_kinds == ("local", "global", "local")
  assert (
    config.window,
    config.attn_softcap,
    config.final_softcap,
    config.query_pre_attn_scalar,
    config.norm_placement,
  ) == (6, 2.0, 5.0, 24.0, "pre_post")
  ids = sample_ids()
  assert len(ids) > 2 * config.window
  diff = np.abs(token_logprobs(model, ids) - hf_logprobs(hf_model, ids)).max()
  assert diff < TOL, f"gemma2: max |log-prob difference| {diff:.3g}"


@pytest.mark.parametrize(
  "change",
  [
    dict(window=7),
    dict(window=5),
    dict(attn_softcap=None),
    dict(final_softcap=None),
    dict(query_pre_attn_scalar=None),
    dict(attention_pattern=("global", "local")),
  ],
)
def test_gemma2_parity_test_detects_each_detail(gemma2, change):
  """Each Gemma 2 detail changes the result: the parity above is not vacuous."""
  _, hf_model, model, config = gemma2
  params = {n: np.asarray(a) for n, a in io.flat_params(model).items()}
  wrong = io.model_from_params(config.replace(**change), params)
  ids = sample_ids()
  diff = np.abs(token_logprobs(wrong, ids) - hf_logprobs(hf_model, ids)).max()
  assert diff > 100 * TOL, f"{change} went unnoticed (diff {diff:.3g})"


def test_dot_product_attention_impl_matches_transformers(tmp_path):
  """The jax.nn.dot_product_attention path (cuDNN on GPU) with a sliding window, on CPU here."""
  config_cls, model_cls, kwargs, std = FAMILIES["gemma2"]
  FAMILIES["no_attn_softcap"] = (
    config_cls,
    model_cls,
    dict(kwargs, attn_logit_softcapping=None),
    std,
  )
  try:
    hf_model = build_hf("no_attn_softcap", tmp_path / "hf")
  finally:
    del FAMILIES["no_attn_softcap"]
  model, config, _ = hf_import.import_hf(tmp_path / "hf")
  assert config.attn_softcap is None and config.window == 6
  params = {n: np.asarray(a) for n, a in io.flat_params(model).items()}
  fast = io.model_from_params(config.replace(attention_impl="dot_product_attention"), params)
  ids = sample_ids()
  diff = np.abs(token_logprobs(fast, ids) - hf_logprobs(hf_model, ids)).max()
  assert diff < TOL, f"dot_product_attention: max |log-prob difference| {diff:.3g}"


def test_llama_gqa_sharded_through_cli_and_score(tmp_path, capsys):
  """LLaMA with GQA from a sharded checkpoint via `ablax import-hf`, scored via `ablax score`."""
  hf_dir, out = tmp_path / "hf", tmp_path / "ablax"
  hf_model = build_hf("llama", hf_dir, max_shard_size="40KB")
  assert (hf_dir / hf_import.INDEX_FILE).is_file()
  assert len(list(hf_dir.glob("*.safetensors"))) > 1
  tokenizer = train_spm(tmp_path)
  (hf_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())

  assert cli.main(["import-hf", str(hf_dir), "--out", str(out)]) == 0
  assert "LlamaForCausalLM" in capsys.readouterr().out
  model, config, meta = io.load_model(out)
  assert (
    config.num_heads,
    config.num_kv_heads,
    config.tie_embeddings,
    config.activation,
    config.rope_base,
    config.norm_eps,
  ) == (4, 2, False, "swiglu", 500000.0, 1e-5)
  assert meta["source"] == f"hf:{hf_dir.resolve()}"
  assert meta["tokenizer_sha256"] == io.file_sha256(tokenizer)
  ids = sample_ids()
  diff = np.abs(token_logprobs(model, ids) - hf_logprobs(hf_model, ids)).max()
  assert diff < TOL, f"llama: max |log-prob difference| {diff:.3g}"

  # Text through the stored tokenizer, BOS prepended, against transformers.
  text_file = tmp_path / "text.txt"
  text_file.write_text("the attention window of the local layer scales the rotary query")
  assert cli.main(["score", "--model_dir", str(out), "--text-file", str(text_file), "--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  ids = [t["id"] for t in result["tokens"]]
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
  assert result["bos_prepended"] and ids == [sp.bos_id()] + sp.encode(text_file.read_text())
  ours = np.array([t["logprob"] for t in result["tokens"][1:]])
  assert result["tokens"][0]["logprob"] is None
  diff = np.abs(ours - hf_logprobs(hf_model, ids)).max()
  assert diff < TOL, f"llama via ablax score: max |log-prob difference| {diff:.3g}"
  assert result["total_logprob"] == pytest.approx(ours.sum(), abs=1e-4)


# -- what the importer refuses ---------------------------------------------------------


def _resave_tensors(hf_dir, edit):
  from safetensors.numpy import save_file

  tensors = dict(hf_import.load_safetensors(hf_dir))
  edit(tensors)
  for f in hf_dir.glob("*.safetensors"):
    f.unlink()
  save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
  hf_dir = tmp_path_factory.mktemp("gemma_hf")
  build_hf("gemma", hf_dir)
  return hf_dir


def _copy(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return dst


def test_missing_unexpected_and_misshaped_tensors_are_named(gemma_dir, tmp_path):
  hf_dir = _copy(gemma_dir, tmp_path / "hf")

  def edit(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"]
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

  _resave_tensors(hf_dir, edit)
  with pytest.raises(hf_import.HFImportError) as e:
    hf_import.import_hf(hf_dir)
  message = str(e.value)
  assert "missing (1): model.layers.1.mlp.up_proj.weight" in message
  assert "unexpected (1): model.layers.0.self_attn.q_proj.bias" in message
  assert (
    "model.layers.0.self_attn.k_proj.weight: shape (64, 64), config.json implies (16, 64)"
    in message
  )


def test_bfloat16_checkpoint_imports_exactly(gemma_dir, tmp_path):
  import ml_dtypes

  hf_dir = _copy(gemma_dir, tmp_path / "hf")
  _resave_tensors(
    hf_dir, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
  )
  ref = {n: np.asarray(a) for n, a in io.flat_params(hf_import.import_hf(gemma_dir)[0]).items()}
  for param_dtype, want in (("float32", np.float32), ("bfloat16", ml_dtypes.bfloat16)):
    model, config, _ = hf_import.import_hf(hf_dir, param_dtype=param_dtype)
    assert config.param_dtype == param_dtype
    for name, value in io.flat_params(model).items():
      assert value.dtype == want, name
      np.testing.assert_array_equal(
        np.asarray(value, np.float32), ref[name].astype(ml_dtypes.bfloat16).astype(np.float32)
      )


def test_head_dim_mismatch_is_named(gemma_dir, tmp_path):
  hf_dir = _copy(gemma_dir, tmp_path / "hf")
  config = json.loads((hf_dir / "config.json").read_text())
  config["head_dim"] = 8
  (hf_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    hf_import.HFImportError,
    match="config.json gives head_dim 8 but q_proj has 64 rows for 4 heads, i.e. head_dim 16",
  ):
    hf_import.import_hf(hf_dir)


def test_tied_lm_head_must_equal_the_embedding(gemma_dir, tmp_path):
  hf_dir = _copy(gemma_dir, tmp_path / "hf")
  _resave_tensors(
    hf_dir, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1})
  )
  with pytest.raises(hf_import.HFImportError, match="lm_head.weight differs"):
    hf_import.import_hf(hf_dir)


def test_cli_reports_errors_without_a_traceback(gemma_dir, tmp_path, capsys):
  hf_dir = _copy(gemma_dir, tmp_path / "hf")
  config = json.loads((hf_dir / "config.json").read_text())
  config["hidden_size"] = 32
  (hf_dir / "config.json").write_text(json.dumps(config))
  assert cli.main(["import-hf", str(hf_dir), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("ablax import-hf: ") and "model.embed_tokens.weight: shape (320, 64)" in err
  assert not (tmp_path / "out").exists()


def _hf_config(family, **changes):
  config_cls, _, kwargs, _ = FAMILIES[family]
  config = getattr(transformers, config_cls)(**kwargs).to_dict()
  config.update(changes)
  return config


@pytest.mark.parametrize(
  "family,changes,match",
  [
    (
      "llama",
      dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
      "rope_type 'llama3'",
    ),
    ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type 'linear'"),
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("gemma2", dict(hidden_activation="gelu"), "activation 'gelu'"),
    (
      "gemma2",
      dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
      "chunked_attention",
    ),
    ("gemma2", dict(sliding_window=None), "sliding_window"),
    (
      "gemma",
      dict(model_type="mistral", architectures=["MistralForCausalLM"]),
      "unsupported model_type 'mistral'",
    ),
    ("gemma", dict(architectures=["GemmaForSequenceClassification"]), "GemmaForCausalLM"),
    ("gemma", dict(num_attention_heads=3, num_key_value_heads=2), "multiple of num_kv_heads"),
    ("gemma", dict(head_dim=15), "even head_dim"),
    (
      "llama",
      dict(
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
      ),
      "partial_rotary_factor",
    ),
  ],
)
def test_unsupported_configs_are_refused(family, changes, match):
  with pytest.raises(hf_import.HFImportError, match=match):
    hf_import.config_from_hf(_hf_config(family, **changes))


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(hf_import.HFImportError, match="not found"):
    hf_import.import_hf(tmp_path / "nowhere")
  with pytest.raises(hf_import.HFImportError, match="config.json not found"):
    hf_import.import_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(_hf_config("gemma")))
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf_import.HFImportError, match="safe_serialization"):
    hf_import.import_hf(tmp_path)
