"""The ablax model format (core/model_dir/io.py), token scoring and `ablax score`."""

import functools
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from core.eval import score
from core.model.config import ModelConfig
from core.model_dir import io
from launch import cli, gin_config
from tests.tiny_spm import train_spm
from tests.tiny_model import tiny_config

CONFIG = tiny_config(
  vocab_size=320,
  norm_placement="pre_post",
  tie_embeddings=False,
  rms_scale_plus_one=True,
  attention_pattern=("local", "global"),
  window=5,
  attn_softcap=20.0,
  final_softcap=15.0,
  query_pre_attn_scalar=12.0,
  norm_eps=1e-5,
)


def random_model(config, seed=0):
  """A model of `config` with normal random weights, norm scales included.

  Drawn in numpy and filled in with model_from_params: eager random init in JAX
  compiles every op and costs seconds per model on a small CPU.
  """
  rng = np.random.default_rng(seed)
  params = {
    name: rng.normal(0.0, 0.3, shape).astype(np.float32)
    for name, (shape, _) in io.expected_shapes(config).items()
  }
  return io.model_from_params(config, params)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(directory, model, tokenizer path) of a random model saved with a tokenizer."""
  root = tmp_path_factory.mktemp("io")
  tokenizer = train_spm(root)
  model = random_model(CONFIG)
  out = io.save_model(
    root / "model",
    model,
    CONFIG,
    tokenizer_path=tokenizer,
    metadata={"source": "test:random", "step": 0},
  )
  return out, model, tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


def logits_of(model, ids):
  """Logits (B, T, V) through one jitted function: eager calls compile op by op."""
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, jax.numpy.asarray(ids)))


def tokens(length=20, seed=1):
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, length).tolist()


# -- save / load ------------------------------------------------------------------------


def test_round_trip_gives_identical_logits(saved):
  out, model, tokenizer = saved
  loaded, config, meta = io.load_model(out)
  assert config == CONFIG
  ids = [tokens()]
  np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(model, ids))
  assert meta["source"] == "test:random" and meta["metadata"] == {"step": 0}
  assert meta["tokenizer_sha256"] == io.file_sha256(tokenizer)
  assert meta["tokenizer_path"] == str(out / "tokenizer.model")
  assert meta["param_counts"]["total"] == sum(np.size(a) for a in io.flat_params(model).values())
  assert sorted(p.name for p in out.iterdir()) == [
    "ablax_model.json",
    "model.gin",
    "params",
    "tokenizer.model",
  ]


def test_model_gin_rebuilds_the_same_config(saved):
  out, _, _ = saved
  text = (out / "model.gin").read_text()
  assert text.startswith("# ablax model config (source: test:random)\n# Parameters: ")
  gin_config.parse([out / "model.gin"])
  assert gin_config.build(ModelConfig, [out / "model.gin"]) == CONFIG


def test_save_refuses_to_clobber(saved, tmp_path):
  out, model, _ = saved
  with pytest.raises(io.ModelIOError, match="already exists"):
    io.save_model(out, model, CONFIG)
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(io.ModelIOError, match="not an ablax model directory"):
    io.save_model(other, model, CONFIG, overwrite=True)
  assert (other / "keep.txt").read_text() == "mine"
  with pytest.raises(io.ModelIOError, match="do not match the model config"):
    io.save_model(tmp_path / "wrong", model, CONFIG.replace(embed_dim=16))
  assert not (tmp_path / "wrong").exists()


def test_overwrite_replaces_a_model(saved, tmp_path):
  out, model, _ = saved
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  io.save_model(copy, model, CONFIG, overwrite=True)
  assert not (copy / "tokenizer.model").exists()
  assert io.load_model(copy)[2]["tokenizer_path"] is None


def test_load_errors_name_the_path(saved, tmp_path):
  out, _, _ = saved
  with pytest.raises(io.ModelIOError, match="model directory not found"):
    io.load_model(tmp_path / "nowhere")
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  with pytest.raises(io.ModelIOError, match="not an ablax model directory.*import-hf"):
    io.load_model(tmp_path / "hf")

  broken = tmp_path / "broken"
  shutil.copytree(out, broken)
  shutil.rmtree(broken / "params")
  with pytest.raises(io.ModelIOError, match=f"{broken / 'params'} is missing"):
    io.load_model(broken)

  swapped = tmp_path / "swapped"
  shutil.copytree(out, swapped)
  (swapped / "tokenizer.model").write_bytes(b"other")
  with pytest.raises(io.ModelIOError, match="sha256 differs"):
    io.load_model(swapped)

  newer = tmp_path / "newer"
  shutil.copytree(out, newer)
  manifest = json.loads((newer / "ablax_model.json").read_text())
  manifest["format_version"] = 99
  (newer / "ablax_model.json").write_text(json.dumps(manifest))
  with pytest.raises(io.ModelIOError, match="format_version 99"):
    io.load_model(newer)

  invalid = tmp_path / "invalid"
  shutil.copytree(out, invalid)
  manifest = json.loads((invalid / "ablax_model.json").read_text())
  manifest["config"]["activation"] = "tanh"
  (invalid / "ablax_model.json").write_text(json.dumps(manifest))
  with pytest.raises(io.ModelIOError, match="activation must be one of"):
    io.load_model(invalid)


def test_params_that_do_not_match_the_config_are_listed(saved, tmp_path):
  out, _, _ = saved
  edited = tmp_path / "edited"
  shutil.copytree(out, edited)
  manifest = json.loads((edited / "ablax_model.json").read_text())
  manifest["config"].update(mlp_dim=64, tie_embeddings=True, norm_placement="pre")
  (edited / "ablax_model.json").write_text(json.dumps(manifest))
  with pytest.raises(io.ModelIOError) as e:
    io.load_model(edited)
  message = str(e.value)
  assert f"parameters in {edited / 'params'} do not match the model config" in message
  assert "blocks/0/mlp/up: got (32, 48), config needs (32, 64)" in message
  assert "unexpected (5): blocks/0/attn_out_norm/scale" in message
  assert "embedder/unembed" in message


def test_model_from_params_checks_names_and_shapes():
  params = {n: np.asarray(a) for n, a in io.flat_params(random_model(CONFIG)).items()}
  del params["final_norm/scale"]
  params["blocks/1/attn/q"] = params["blocks/1/attn/q"][:, :2]
  with pytest.raises(io.ModelIOError) as e:
    io.model_from_params(CONFIG, params)
  assert "missing (1): final_norm/scale" in str(e.value)
  assert "blocks/1/attn/q: got (32, 2, 8), config needs (32, 4, 8)" in str(e.value)


def test_bfloat16_params_round_trip(tmp_path):
  config = CONFIG.replace(param_dtype="bfloat16")
  model = random_model(config, seed=3)
  io.save_model(tmp_path / "bf16", model, config)
  loaded, _, _ = io.load_model(tmp_path / "bf16")
  for name, value in io.flat_params(loaded).items():
    assert value.dtype == jax.numpy.bfloat16, name
    np.testing.assert_array_equal(
      np.asarray(value, np.float32), np.asarray(io.flat_params(model)[name], np.float32)
    )


# -- scoring ------------------------------------------------------------------------------


def test_token_logprobs_convention(saved):
  _, model, _ = saved
  ids = tokens()
  logits = logits_of(model, [ids])[0]
  logp = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  want = np.array([logp[i, ids[i + 1]] for i in range(len(ids) - 1)])
  got = score.token_logprobs(model, ids)
  assert got.shape == (len(ids) - 1,)
  np.testing.assert_allclose(got, want, atol=1e-5)
  batch = score.token_logprobs(model, np.array([ids, ids[::-1]]))
  np.testing.assert_allclose(batch[0], got, atol=1e-6)
  with pytest.raises(score.ScoreError, match="outside the model's vocabulary"):
    score.token_logprobs(model, [1, 2, CONFIG.vocab_size])
  with pytest.raises(score.ScoreError, match="at least 2"):
    score.token_logprobs(model, [1])
  assert score.with_bos([5, 6], 1) == [1, 5, 6] and score.with_bos([5, 6], -1) == [5, 6]


def test_score_cli_text_with_stored_tokenizer(saved, tmp_path, capsys):
  out, model, tokenizer = saved
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
  text = "the model reads a window of tokens\nand predicts the next one"
  (tmp_path / "t.txt").write_text(text)
  assert (
    cli.main(["score", "--model_dir", str(out), "--text-file", str(tmp_path / "t.txt"), "--json"])
    == 0
  )
  result = json.loads(capsys.readouterr().out)
  ids = [t["id"] for t in result["tokens"]]
  assert ids == [sp.bos_id()] + sp.encode(text) and result["bos_prepended"]
  assert result["tokens"][0]["logprob"] is None
  assert result["tokens"][1]["piece"] == sp.id_to_piece(ids[1])
  values = np.array([t["logprob"] for t in result["tokens"][1:]])
  np.testing.assert_allclose(values, score.token_logprobs(model, ids), atol=1e-6)
  assert result["num_scored"] == len(ids) - 1
  assert result["total_logprob"] == pytest.approx(values.sum(), abs=1e-5)

  # The table form prints every token and the total; --no_bos scores one fewer.
  assert (
    cli.main(["score", "--model_dir", str(out), "--text-file", str(tmp_path / "t.txt"), "--no_bos"])
    == 0
  )
  table = capsys.readouterr().out.splitlines()
  assert table[0].split() == ["index", "id", "logprob", "piece"]
  assert len(table) == 1 + (len(ids) - 1) + 1 and table[1].split()[2] == "-"
  assert table[-1].startswith("total log-probability ") and f"over {len(ids) - 2} " in table[-1]


def test_score_cli_ids_file(saved, tmp_path, capsys):
  out, model, _ = saved
  ids = tokens(12, seed=5)
  (tmp_path / "ids.txt").write_text(
    ", ".join(map(str, ids[:6])) + "\n" + " ".join(map(str, ids[6:])) + "\n"
  )
  (tmp_path / "ids.json").write_text(json.dumps(ids))
  for name in ("ids.txt", "ids.json"):
    assert (
      cli.main(["score", "--model_dir", str(out), "--ids-file", str(tmp_path / name), "--json"])
      == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in result["tokens"]] == ids and not result["bos_prepended"]
    np.testing.assert_allclose(
      [t["logprob"] for t in result["tokens"][1:]], score.token_logprobs(model, ids), atol=1e-6
    )


def test_score_cli_errors(saved, tmp_path, capsys):
  out, model, tokenizer = saved
  (tmp_path / "t.txt").write_text("the model")
  small = CONFIG.replace(vocab_size=200)
  io.save_model(tmp_path / "small", random_model(small), small)

  def fails(*argv):
    assert cli.main(["score", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablax score: ")
    return err

  assert "has no tokenizer" in fails(
    "--model_dir", str(tmp_path / "small"), "--text-file", str(tmp_path / "t.txt")
  )
  err = fails(
    "--model_dir",
    str(tmp_path / "small"),
    "--text-file",
    str(tmp_path / "t.txt"),
    "--tokenizer",
    str(tokenizer),
  )
  assert "300 ids" in err and "vocab_size is 200" in err
  (tmp_path / "ids.txt").write_text("1 2 999")
  assert "outside the model's vocabulary" in fails(
    "--model_dir", str(out), "--ids-file", str(tmp_path / "ids.txt")
  )
  (tmp_path / "bad.txt").write_text("1 two 3")
  assert "expected integers" in fails(
    "--model_dir", str(out), "--ids-file", str(tmp_path / "bad.txt")
  )
  assert "not an ablax model directory" in fails(
    "--model_dir", str(tmp_path), "--ids-file", str(tmp_path / "ids.txt")
  )
