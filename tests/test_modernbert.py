"""ModernBERT parity with transformers' PyTorch implementation on tiny random models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.hub import convert
from saejax.models import modernbert

TINY = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, local_attention=8, max_position_embeddings=128, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
TOL = 1e-4  # fp32, max abs on valid tokens; never loosened


def _hf_model(tmp_path, mlm: bool, seed: int = 0, cls=None, **overrides):
  torch.manual_seed(seed)
  hc = transformers.ModernBertConfig(**{**TINY, **overrides})
  cls = cls or (transformers.ModernBertForMaskedLM if mlm else transformers.ModernBertModel)
  model = cls(hc).eval()
  with torch.no_grad():  # HF inits norms to 1; perturb them so a missed norm would show.
    for name, p in model.named_parameters():
      if "norm" in name or "decoder.bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  return model


def _inputs(batch=3, length=40, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, TINY["vocab_size"], (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, 25:] = 0   # padding
  mask[2, 7:] = 0    # short: shorter than the local window
  return ids, mask


def _compare(hf, saejax_model, ids, mask):
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             output_hidden_states=True)
  valid = mask.astype(bool)
  base = saejax_model
  x = base.emb_norm(base.tok_embeddings[...][jnp.asarray(ids)])
  np.testing.assert_allclose(np.asarray(x)[valid], out.hidden_states[0].numpy()[valid], atol=TOL)
  for i, block in enumerate(base.layers):  # per-block comparison
    x = block(x, jnp.asarray(valid))
    if i + 1 < len(base.layers):
      err = np.abs(np.asarray(x)[valid] - out.hidden_states[i + 1].numpy()[valid]).max()
      assert err < TOL, f"block {i}: max abs error {err}"
  last = saejax_model(jnp.asarray(ids), jnp.asarray(valid))
  hf_last = out.last_hidden_state.numpy()
  assert np.abs(np.asarray(last)[valid] - hf_last[valid]).max() < TOL
  return last, out


def test_parity_with_padding_and_windows(tmp_path):
  hf = _hf_model(tmp_path, mlm=False)
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.window == 4 and cfg.layer_types == ("full_attention", "sliding_attention",
                                                 "sliding_attention", "full_attention")
  ids, mask = _inputs(length=40)  # 40 tokens: 10x the half-window
  _compare(hf, model, ids, mask)


def test_parity_mlm_head_logits(tmp_path):
  hf = _hf_model(tmp_path, mlm=True, seed=1)
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.mlm_head
  _mlm_logits_match(hf, model, seed=1)


def _mlm_logits_match(hf, model, seed: int):
  ids, mask = _inputs(length=24, seed=seed)
  last, _ = _compare(hf.model, model, ids, mask)
  valid = mask.astype(bool)
  with torch.no_grad():
    hf_logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  logits = np.asarray(model.mlm_logits(last))
  assert np.abs(logits[valid] - hf_logits[valid]).max() < TOL


def test_untied_decoder_is_read_used_and_written(tmp_path):
  """tie_word_embeddings=False: the decoder is its own matrix, in the logits and in the files."""
  torch.manual_seed(5)
  hf = _hf_model(tmp_path / "in", mlm=True, seed=5, tie_word_embeddings=False)
  decoder = hf.decoder.weight.detach().numpy()
  assert not np.allclose(decoder, hf.model.embeddings.tok_embeddings.weight.detach().numpy())
  cfg, model = convert.load_hf(tmp_path / "in")
  assert cfg.mlm_head and not cfg.tie_word_embeddings
  np.testing.assert_array_equal(np.asarray(model.decoder[...]), decoder)
  _mlm_logits_match(hf, model, seed=5)
  convert.save_hf(cfg, model, tmp_path / "out")
  a, b = convert.read_tensors(tmp_path / "in"), convert.read_tensors(tmp_path / "out")
  assert a.keys() == b.keys() and "decoder.weight" in b
  assert all(np.array_equal(a[k], b[k]) for k in a)
  reloaded, info = transformers.ModernBertForMaskedLM.from_pretrained(
      tmp_path / "out", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert not reloaded.config.tie_word_embeddings
  ids, mask = _inputs(length=20, seed=5)
  with torch.no_grad():
    x = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    y = reloaded.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  assert torch.equal(x, y)
  cfg2, _ = convert.load_hf(tmp_path / "out", head=False)  # the encoder alone drops the decoder
  assert not cfg2.mlm_head


def test_mlm_head_without_decoder_bias(tmp_path):
  hf = _hf_model(tmp_path, mlm=True, seed=6, decoder_bias=False)
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.mlm_head and not cfg.decoder_bias and model.decoder_bias is None
  _mlm_logits_match(hf, model, seed=6)
  convert.save_hf(cfg, model, tmp_path / "out")
  assert "decoder.bias" not in convert.read_tensors(tmp_path / "out")
  assert not transformers.AutoConfig.from_pretrained(tmp_path / "out").decoder_bias


@pytest.mark.parametrize("cls", [transformers.ModernBertForSequenceClassification,
                                 transformers.ModernBertForTokenClassification])
def test_task_model_is_named_and_its_encoder_loads(tmp_path, cls):
  hf = _hf_model(tmp_path, mlm=False, seed=7, cls=cls)
  with pytest.raises(CheckpointError, match=rf"holds a {cls.__name__}: its task head \(tensors "
                                            r"\['classifier.bias', 'classifier.weight'.*"
                                            r"head=False"):
    convert.load_hf(tmp_path)
  cfg, model = convert.load_hf(tmp_path, head=False)
  assert not cfg.mlm_head
  _compare(hf.model, model, *_inputs(length=30, seed=7))


def test_odd_local_attention_matches_transformers(tmp_path):
  """local_attention=15: transformers' half-window is 15 // 2 = 7 (|q - k| <= 7)."""
  hf = _hf_model(tmp_path, mlm=False, seed=8, local_attention=15)
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.local_attention == 15 and cfg.window == 7
  _compare(hf, model, *_inputs(length=40, seed=8))


def test_encoder_only_from_mlm_checkpoint(tmp_path):
  _hf_model(tmp_path, mlm=True)
  cfg, model = convert.load_hf(tmp_path, head=False)
  assert not cfg.mlm_head and not hasattr(model, "head_dense")


def test_global_every_n_and_thetas(tmp_path):
  hf = _hf_model(tmp_path, mlm=False, seed=2, num_hidden_layers=5, global_attn_every_n_layers=2,
                 global_rope_theta=50_000.0, local_rope_theta=500.0)
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.layer_types == tuple("full_attention" if i % 2 == 0 else "sliding_attention"
                                  for i in range(5))
  assert (cfg.global_rope_theta, cfg.local_rope_theta) == (50_000.0, 500.0)
  _compare(hf, model, *_inputs(length=33, seed=2))


def test_old_config_dialect_reads_the_same():
  """Older config.json files: global_attn_every_n_layers + global/local_rope_theta."""
  old = {"model_type": "modernbert", **TINY, "num_hidden_layers": 7,
         "global_attn_every_n_layers": 3, "global_rope_theta": 80_000.0,
         "local_rope_theta": 5_000.0}
  new = transformers.ModernBertConfig(**{k: v for k, v in old.items() if k != "model_type"})
  a = modernbert.ModernBertConfig.from_hf_config(old)
  b = modernbert.ModernBertConfig.from_hf_config(new.to_dict())
  assert a == b
  assert a.layer_types[:4] == ("full_attention", "sliding_attention", "sliding_attention",
                               "full_attention")
  assert (a.global_rope_theta, a.local_rope_theta) == (80_000.0, 5_000.0)


def _edit_config(model_dir, **keys):
  file = model_dir / "config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), **keys}))


def test_sliding_window_key_sets_the_window_as_transformers_does(tmp_path):
  """A config.json carrying `sliding_window` (the half-window) next to `local_attention`:
  transformers 5 sets its window from `sliding_window` (a property whose setter rewrites
  local_attention = 2 * sliding_window), so saejax must too, not silently keep local_attention."""
  _hf_model(tmp_path, mlm=False, seed=9)
  _edit_config(tmp_path, sliding_window=2)  # local_attention stays 8 (half-window 4)
  hf = transformers.ModernBertModel.from_pretrained(tmp_path).eval()
  assert hf.config.sliding_window == 2
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.window == 2
  _compare(hf, model, *_inputs(length=30, seed=9))
  agreeing = {"model_type": "modernbert", **TINY, "local_attention": 15, "sliding_window": 7}
  assert modernbert.ModernBertConfig.from_hf_config(agreeing).local_attention == 15


def test_legacy_rope_scaling_is_refused(tmp_path):
  """Older config.json files may carry `rope_scaling`; transformers 5 applies it to both layer
  types' RoPE, so a scaled one must be refused by name (as a scaled rope_parameters is), never
  read as plain RoPE. A null or default one is plain RoPE."""
  old = {"model_type": "modernbert", **TINY, "global_rope_theta": 1_000.0,
         "local_rope_theta": 50.0}
  scaling = {"rope_type": "linear", "factor": 4.0}
  hc = transformers.ModernBertConfig(**{**old, "rope_scaling": scaling})
  assert hc.rope_parameters["full_attention"]["rope_type"] == "linear"  # transformers uses it
  for legacy in (scaling, {"type": "linear", "factor": 4.0}):
    with pytest.raises(ConfigError, match="rope_scaling.*'linear' is not supported"):
      modernbert.ModernBertConfig.from_hf_config({**old, "rope_scaling": legacy})
  plain = modernbert.ModernBertConfig.from_hf_config(old)
  for harmless in (None, {"rope_type": "default"}):
    assert modernbert.ModernBertConfig.from_hf_config({**old, "rope_scaling": harmless}) == plain


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_stored_dtype_is_not_the_compute_dtype(tmp_path, stored):
  """transformers 5 writes the dtype its weights are stored in into config.json ("dtype"); saejax
  computes in its own setting (float32 by default), so a half-precision checkpoint gives what
  transformers gives from the same file in float32. A compute dtype saejax has no path for is
  refused by name."""
  _hf_model(tmp_path, mlm=False, seed=3).to(getattr(torch, stored)).save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == stored
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.dtype == "float32"
  reference = transformers.ModernBertModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
  _compare(reference, model, *_inputs(seed=3))
  with pytest.raises(ConfigError, match=r"dtype 'float16' is not one of \('float32', 'bfloat16'\)"):
    modernbert.ModernBertConfig.from_hf_config({"model_type": "modernbert", **TINY},
                                               dtype="float16")


def test_to_hf_config_round_trips_through_transformers():
  cfg = modernbert.ModernBertConfig.from_hf_config({"model_type": "modernbert", **TINY})
  hc = transformers.ModernBertConfig(**cfg.to_hf_config())
  assert modernbert.ModernBertConfig.from_hf_config(hc.to_dict()) == cfg


@pytest.mark.parametrize("mlm", [False, True])
def test_round_trip_bit_identical(tmp_path, mlm):
  hf = _hf_model(tmp_path / "in", mlm=mlm, seed=3)
  cfg, model = convert.load_hf(tmp_path / "in")
  convert.save_hf(cfg, model, tmp_path / "out")
  a, b = convert.read_tensors(tmp_path / "in"), convert.read_tensors(tmp_path / "out")
  a.pop("decoder.weight", None)  # tied to the embeddings; transformers may or may not store it
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  cls = transformers.ModernBertForMaskedLM if mlm else transformers.AutoModel
  reloaded, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids, mask = _inputs(length=20, seed=3)
  with torch.no_grad():
    x = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    y = reloaded.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  key = "logits" if mlm else "last_hidden_state"
  assert torch.equal(x[key], y[key])
  if mlm:  # the decoder stays tied to the embeddings
    assert reloaded.decoder.weight.data_ptr() == reloaded.model.embeddings.tok_embeddings.weight.data_ptr()


def test_sharded_checkpoint(tmp_path):
  hf = _hf_model(tmp_path / "in", mlm=False, seed=4)
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  _, model = convert.load_hf(tmp_path / "sharded")
  _compare(hf, model, *_inputs(length=16, seed=4))


def test_real_sizes_by_eval_shape():
  base = nnx.eval_shape(lambda: modernbert.ModernBert(modernbert.ModernBertConfig(),
                                                      rngs=nnx.Rngs(0)))
  assert modernbert.num_params(base) == 149_014_272
  large_cfg = modernbert.ModernBertConfig.from_hf_config({
      "model_type": "modernbert", "hidden_size": 1024, "intermediate_size": 2624,
      "num_hidden_layers": 28, "num_attention_heads": 16, "global_attn_every_n_layers": 3})
  large = nnx.eval_shape(lambda: modernbert.ModernBert(large_cfg, rngs=nnx.Rngs(0)))
  assert modernbert.num_params(large) == 394_781_696
  leaves = jax.tree.leaves(nnx.state(large))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated


def test_every_parameter_has_logical_axes():
  model = nnx.eval_shape(lambda: modernbert.ModernBert(
      modernbert.ModernBertConfig.from_hf_config({**TINY, "mlm_head": True}), rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path


# --- bad input -------------------------------------------------------------------------------

def _rewrite(model_dir, fn):
  from safetensors.numpy import save_file
  tensors = convert.read_tensors(model_dir)
  fn(tensors)
  save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
  _hf_model(tmp_path, mlm=False)
  _rewrite(tmp_path, lambda t: t.pop("layers.2.mlp.Wi.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensors \['layers.2.mlp.Wi.weight'\]"):
    convert.load_hf(tmp_path)


def test_extra_tensor_is_named(tmp_path):
  _hf_model(tmp_path, mlm=False)
  _rewrite(tmp_path, lambda t: t.update({"layers.9.attn.Wqkv.weight": np.zeros((2, 2), np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensors \['layers.9.attn.Wqkv.weight'\]"):
    convert.load_hf(tmp_path)


def test_shape_mismatch_names_parameter_and_shapes(tmp_path):
  _hf_model(tmp_path, mlm=False)
  _rewrite(tmp_path, lambda t: t.update({"layers.1.attn.Wo.weight": np.zeros((64, 32), np.float32)}))
  with pytest.raises(CheckpointError, match=r"layers.1.attn.Wo.weight has shape \(64, 32\).*"
                                            r"layers.1.attn.wo needs \(64, 64\)"):
    convert.load_hf(tmp_path)


def test_unknown_architecture_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                    "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ConfigError, match="gpt2.*not supported; supported: modernbert.*bert"):
    convert.load_hf(tmp_path)


def test_unsupported_variants_are_refused():
  with pytest.raises(ConfigError, match="biases"):
    modernbert.ModernBertConfig.from_hf_config({**TINY, "mlp_bias": True})
  with pytest.raises(ConfigError, match="rope_type 'yarn'"):
    modernbert.ModernBertConfig.from_hf_config({**TINY, "rope_parameters": {
        "full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}})
  with pytest.raises(ConfigError, match="layer_types has 2 entries"):
    modernbert.ModernBertConfig(num_hidden_layers=3, layer_types=("full_attention",) * 2)


def test_bad_sizes_and_inputs_are_named():
  for field, value in (("num_attention_heads", 0), ("vocab_size", 0), ("hidden_size", 64.0)):
    with pytest.raises(ConfigError, match=rf"sizes must be positive integers; got \{{'{field}'"):
      modernbert.ModernBertConfig.from_hf_config({**TINY, field: value})
  model = modernbert.ModernBert(modernbert.ModernBertConfig.from_hf_config(TINY), rngs=nnx.Rngs(0))
  ids = jnp.ones((2, 10), jnp.int32)
  with pytest.raises(DataError, match=r"input_ids \(2, 10\) and valid \(2, 9\) must both be"):
    model(ids, jnp.ones((2, 9), bool))
  with pytest.raises(DataError, match=r"input_ids \(10,\) and valid \(10,\) must both be"):
    model(ids[0])
  # A 0/1 float mask means what the bool mask means (as in BertModel).
  mask = jnp.arange(10)[None] < jnp.array([[10], [6]])
  np.testing.assert_array_equal(np.asarray(model(ids, mask.astype(jnp.float32)))[1, :6],
                                np.asarray(model(ids, mask))[1, :6])


def test_missing_directory_and_weights(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    convert.load_hf(tmp_path / "nope")
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "modernbert", **TINY}))
  with pytest.raises(CheckpointError, match="neither model.safetensors"):
    convert.load_hf(tmp_path)


def test_truncated_safetensors(tmp_path):
  _hf_model(tmp_path, mlm=False)
  f = tmp_path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:1000])
  with pytest.raises(CheckpointError, match="not a readable safetensors file"):
    convert.load_hf(tmp_path)


def test_too_long_sequence_is_refused(tmp_path):
  _hf_model(tmp_path, mlm=False)
  _, model = convert.load_hf(tmp_path)
  with pytest.raises(ConfigError, match="input length 129 exceeds max_position_embeddings 128: "
                                        "truncate inputs to at most 128 tokens"):
    model(jnp.zeros((1, 129), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm_backward_matches_autodiff(dtype, with_bias):
  """`params.layer_norm`'s written-out backward against autodiff of a plain LayerNorm (the form it
  replaced), for x, scale and bias, on rows with a large mean and spread."""
  from saejax.models.params import layer_norm

  def plain(x, scale, bias):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + 1e-5) * scale
    return (y if bias is None else y + bias).astype(x.dtype)

  ks = jax.random.split(jax.random.key(0), 4)
  x = (jax.random.normal(ks[0], (3, 7, 32)) * 4 + 2).astype(dtype)
  scale, bias = jax.random.normal(ks[1], (32,)), jax.random.normal(ks[2], (32,))
  bias = bias if with_bias else None
  cot = jax.random.normal(ks[3], x.shape)
  args = (0, 1, 2) if with_bias else (0, 1)
  got = jax.grad(lambda *a: jnp.sum(layer_norm(*a, 1e-5).astype(jnp.float32) * cot), args)(
      x, scale, bias)
  want = jax.grad(lambda *a: jnp.sum(plain(*a).astype(jnp.float32) * cot), args)(x, scale, bias)
  np.testing.assert_array_equal(np.asarray(layer_norm(x, scale, bias, 1e-5), np.float32),
                                np.asarray(plain(x, scale, bias), np.float32))
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for g, w in zip(got, want):
    assert g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol)
