"""Batch encoding of many texts with jitted forward passes and length buckets.

Serving and evaluation embed corpora far larger than a training batch. This module tokenizes every
text once (the model's own `tokenizers` Tokenizer, whose post-processor adds [CLS] ... [SEP]),
sorts the texts by token length, cuts the sorted list into batches of `EncodeConfig.batch_size` and
pads each batch to the smallest length bucket that holds its longest text. Sorting keeps texts of
similar length together, so little compute goes to padding; buckets bound the number of distinct
[B, T] shapes, and so of XLA compilations, by the number of buckets (the last batch is filled up to
`batch_size` rows with copies of its first text, whose results are dropped, so it adds no shape).
Results come back in the callers' order.

The default buckets step by 16 tokens up to 128, by 32 up to 256 and by 64 up to 512, so a batch
longer than 64 tokens is padded to at most 1.25x its longest text. With power-of-two buckets,
2,000 Debian package descriptions (max length 256, batch 32) were padded to 1.43x their real
tokens, with these to 1.14x (sentence-transformers, which pads each batch to its longest text:
1.02x); that padding was most of the gap to sentence-transformers in benchmarks/bench_encode.py.
The price is more compiled shapes (12 for max_len 256), each compiled once per process (the
forward passes below share one jit cache per architecture).

Texts longer than `EncodeConfig.max_len` tokens are truncated by the tokenizer (the final [SEP]
survives) and counted in `EncodeStats.num_truncated`: nothing is cut silently.

Memory: each batch's outputs are copied to host numpy before the next batch is dispatched, so the
device never holds more than one batch of activations; the host holds the outputs of all texts.

Entry points: `encode` runs any jitted ``(ids, valid) -> arrays`` function; `encode_dense` gives
mean-pooled vectors of any encoder module (sentence-transformers' Pooling(mean), the dense
baseline); `encode_sparse` gives the TopK SAE codes of an `Embedder` with a chosen k (queries and
documents may use different k, as in SPLADE-style asymmetric retrieval).

Shape legend: N texts, B batch rows, T padded length (a bucket), D model width, K active latents.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from saejax import sharding
from saejax.data.tokenizer import check_vocab, pad_id, truncating_copy
from saejax.errors import ConfigError, DataError
from saejax.sae.embedder import Embedder, mean_pool
from saejax.sae.topk import SAE

# A forward pass over one padded batch: one array, or a tuple of arrays, each with leading axis B.
EncodeFn = Callable[[Int[Array, "B T"], Bool[Array, "B T"]], Array | tuple[Array, ...]]


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """How texts are batched and padded.

  Attributes:
    max_len: token budget of a text, [CLS] and [SEP] included; longer texts are truncated.
    batch_size: rows per forward pass (every batch has exactly this many rows).
    buckets: allowed padded lengths, increasing. Buckets >= max_len are ignored and max_len itself
      is always the last bucket, so any tuple works with any max_len.
    progress: show a tqdm progress bar.
  """
  max_len: int = 256
  batch_size: int = 64
  buckets: tuple[int, ...] = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
                               448, 512)
  progress: bool = True

  def __post_init__(self):
    if not isinstance(self.max_len, int) or self.max_len < 2:
      raise ConfigError(f"EncodeConfig.max_len={self.max_len!r} must be an int >= 2 "
                        "(room for [CLS] and [SEP])")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ConfigError(f"EncodeConfig.batch_size={self.batch_size!r} must be a positive int")
    buckets = tuple(self.buckets)
    if any(not isinstance(b, int) or b < 1 for b in buckets) or any(
        b <= a for a, b in zip(buckets, buckets[1:])):
      raise ConfigError(f"EncodeConfig.buckets={buckets!r} must be increasing positive ints")

  @property
  def lengths(self) -> tuple[int, ...]:
    """The padded lengths in use: the buckets below max_len, then max_len."""
    return tuple(b for b in self.buckets if b < self.max_len) + (self.max_len,)


@dataclasses.dataclass(frozen=True)
class EncodeStats:
  """What an encoding pass did to its texts."""
  num_texts: int
  num_truncated: int                   # texts that lost tokens to max_len
  shapes: tuple[tuple[int, int], ...]  # distinct padded [B, T] batch shapes, in first-use order


class DenseEmbeddings(NamedTuple):
  """Pooled encoder outputs, in the order of the input texts."""
  v: Float[np.ndarray, "N D"]
  stats: EncodeStats


class SparseCodes(NamedTuple):
  """TopK SAE codes, in the order of the input texts. A value may be 0 (ReLU after TopK)."""
  values: Float[np.ndarray, "N K"]
  indices: Int[np.ndarray, "N K"]
  stats: EncodeStats



def tokenize(tokenizer: Tokenizer, texts: Iterable[str], max_len: int, *,
             vocab_size: int | None = None) -> tuple[list[list[int]], Bool[np.ndarray, "N"]]:
  """Token ids of each text, truncated to ``max_len``, and which texts were truncated.

  Args:
    tokenizer: the model's tokenizer; its post-processor must add the special tokens.
    texts: the texts, any iterable of str, read once (an empty str is one text: [CLS] [SEP]).
    max_len: token budget per text, special tokens included.
    vocab_size: the model's embedding rows; a tokenizer that can emit ids at or past it is
      refused (JAX would clamp those ids silently). None skips the check.
  """
  # A str is a sequence of str too: "abc" would silently become three one-letter texts.
  if isinstance(texts, (str, bytes)):
    raise TypeError(f"texts is a {type(texts).__name__}, not a sequence of texts; to encode one "
                    "text pass [text]")
  texts = list(texts)  # once: a generator checked below would be empty by the time it is encoded
  if vocab_size is not None:
    check_vocab(tokenizer, vocab_size)
  # The post-processor is what adds [CLS] ... [SEP]; without it the encoder sees bare text.
  if tokenizer.post_processor is None:
    raise ConfigError("the tokenizer has no post-processor, so it would add no [CLS]/[SEP]; "
                      "load the model's own tokenizer.json")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise DataError(f"texts[{i}] is a {type(t).__name__}, not a str")
    try:
      t.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: the tokenizer would raise a bare TypeError
      raise DataError(f"texts[{i}] is not valid Unicode text ({e.reason} at character "
                      f"{e.start}: {t[max(0, e.start - 20):e.start + 1]!r})") from None
  encodings = truncating_copy(tokenizer, max_len).encode_batch(texts)
  # Truncation with stride 0 moves the cut-off tokens into `overflowing`.
  return [e.ids for e in encodings], np.asarray([bool(e.overflowing) for e in encodings], bool)


def _bucket(longest: int, lengths: tuple[int, ...]) -> int:
  return next(t for t in lengths if t >= longest)  # lengths end at max_len >= any truncated text


def _pad(rows: list[list[int]], batch_size: int, width: int,
         pad: int) -> tuple[Int[np.ndarray, "B T"], Bool[np.ndarray, "B T"]]:
  """A [batch_size, width] batch; missing rows repeat the first row (their outputs are dropped)."""
  rows = rows + [rows[0]] * (batch_size - len(rows))
  ids = np.full((batch_size, width), pad, np.int32)
  valid = np.zeros((batch_size, width), bool)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    valid[i, :len(row)] = True
  return ids, valid


def encode(fn: EncodeFn, tokenizer: Tokenizer, texts: Iterable[str],
           config: EncodeConfig = EncodeConfig(), *, desc: str = "encode",
           vocab_size: int | None = None) -> tuple[tuple[np.ndarray, ...], EncodeStats]:
  """Run ``fn`` over all texts in length-sorted, bucket-padded batches.

  Args:
    fn: ``(ids [B, T] int32, valid [B, T] bool) -> array or tuple of arrays [B, ...]``; pass a
      jitted function (`mean_pooled`, `sparse_code`): it is called once per batch and compiles
      once per distinct shape in `EncodeStats.shapes`.
    tokenizer: the model's tokenizer.
    texts: the texts to encode.
    config: batching and padding.
    desc: label of the progress bar.
    vocab_size: the embedding rows of the model behind ``fn``; the tokenizer must fit them
      (`encode_dense` and `encode_sparse` pass the encoder's ``cfg.vocab_size``).

  Returns:
    (outputs, stats): each output is a numpy array [N, ...] whose row i belongs to texts[i].
  """
  ids, truncated = tokenize(tokenizer, texts, config.max_len, vocab_size=vocab_size)
  n, bs, pad = len(ids), config.batch_size, pad_id(tokenizer)
  if n == 0:  # shapes from an abstract trace of a whole batch (it splits over a mesh): nothing runs
    probe = jax.ShapeDtypeStruct((bs, config.lengths[0]), jnp.int32)
    abstract = jax.eval_shape(fn, probe, jax.ShapeDtypeStruct(probe.shape, jnp.bool_))
    outs = tuple(np.zeros((0, *a.shape[1:]), a.dtype) for a in _as_tuple(abstract))
    return outs, EncodeStats(0, 0, ())
  # Longest first: a batch too big for memory fails at once, and the progress bar's ETA is honest.
  order = np.argsort([-len(x) for x in ids], kind="stable")
  outs, shapes = None, {}
  with tqdm(total=n, desc=desc, unit="text", disable=not config.progress) as bar:
    for start in range(0, n, bs):
      chosen = order[start:start + bs]
      rows = [ids[i] for i in chosen]
      batch_ids, batch_valid = _pad(rows, bs, _bucket(len(rows[0]), config.lengths), pad)
      shapes[batch_ids.shape] = None
      # device_get before the next dispatch: at most one batch of activations lives on device.
      result = jax.device_get(_as_tuple(fn(jnp.asarray(batch_ids), jnp.asarray(batch_valid))))
      if outs is None:
        outs = tuple(np.empty((n, *r.shape[1:]), r.dtype) for r in result)
      for out, r in zip(outs, result):
        out[chosen] = r[:len(chosen)]
      bar.update(len(chosen))
  return outs, EncodeStats(n, int(truncated.sum()), tuple(shapes))


def _as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


# The forward passes are module-level jitted functions with the graph definition as a static
# argument, so every `mean_pooled` / `sparse_code` of one architecture (and k) shares one compile
# cache: encoding queries, then documents, then another k or another checkpoint of the same
# model, compiles each padded shape once per process rather than once per call.
@functools.partial(jax.jit, static_argnums=0)
def _mean_pooled_forward(graphdef: nnx.GraphDef, state: nnx.State, ids, valid):
  return mean_pool(nnx.merge(graphdef, state)(ids, valid), valid)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sparse_code_forward(graphdef: nnx.GraphDef, state: nnx.State, ids, valid, k: int):
  m = nnx.merge(graphdef, state)
  return m.sae.embed(m.dense(ids, valid), k)  # no decode: retrieval needs only the code


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sae_embed_forward(graphdef: nnx.GraphDef, state: nnx.State, v, k: int):
  return nnx.merge(graphdef, state).embed(v, k)


def vocab_size_of(encoder: nnx.Module) -> int | None:
  """The encoder's embedding rows: ``cfg.vocab_size`` of saejax's BERT and ModernBERT, else None."""
  return getattr(getattr(encoder, "cfg", None), "vocab_size", None)


def mean_pooled(encoder: nnx.Module) -> EncodeFn:
  """A jitted ``(ids, valid) -> v [B, D]``: masked mean of any encoder's last hidden state.

  The encoder is any module called as ``encoder(ids, valid) -> [B, T, D]`` (saejax's BERT and
  ModernBERT; an `Embedder`'s ``.encoder``). Parameters are captured once, as jit arguments, so
  later calls, and other functions made here for the same architecture, reuse compiled shapes.
  """
  graphdef, state = nnx.split(encoder)
  return functools.partial(_mean_pooled_forward, graphdef, state)


def sparse_code(model: Embedder, k: int | None = None, *, mesh: Mesh | None = None) -> EncodeFn:
  """A jitted ``(ids, valid) -> (values [B, K], indices [B, K])``: the model's TopK SAE code.

  Args:
    model: the trained encoder + SAE.
    k: active latents per text; None uses the training k (`SAEConfig.k`).
    mesh: data-parallel encoding: the parameters are replicated over the mesh's devices once and
      each batch is split over its data axes (`saejax.sharding.batch_sharding`), so every device
      encodes B / devices rows of each batch; B must divide by the data-parallel device count.
      None: the default device.
  """
  k = model.sae.config.k if k is None else k
  graphdef, state = nnx.split(model)
  if mesh is None:
    return lambda ids, valid: _sparse_code_forward(graphdef, state, ids, valid, k)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    raise ConfigError(f"encoding splits batches over a mesh with Auto axes (as "
                      f"saejax.sharding.make_mesh builds); got axis types {mesh.axis_types}")
  state = jax.device_put(state, sharding.replicated(mesh))
  rows = sharding.batch_sharding(mesh, 2)
  devices = sharding.data_devices(mesh)
  # The mesh ambient while the forward is traced and run: the per-shard kernels read it there
  # (splash attention on a TPU cannot be partitioned by the compiler otherwise).
  forward = sharding.OnMesh(functools.partial(_sparse_code_forward, graphdef), mesh)

  def fn(ids, valid):
    if ids.shape[0] % devices:
      raise ConfigError(f"a batch of {ids.shape[0]} texts does not split over the {devices} "
                        f"data-parallel devices of the mesh: set EncodeConfig.batch_size to a "
                        f"multiple of {devices}")
    return forward(state, jax.device_put(ids, rows), jax.device_put(valid, rows), k)
  return fn


def encode_dense(encoder: nnx.Module, tokenizer: Tokenizer, texts: Iterable[str],
                 config: EncodeConfig = EncodeConfig(), *, desc: str = "encode") -> DenseEmbeddings:
  """Mean-pooled vectors of ``texts`` from any encoder module (not normalised).

  Args:
    encoder: called as ``encoder(ids, valid) -> [B, T, D]``.
    tokenizer: the encoder's tokenizer; checked against ``encoder.cfg.vocab_size``.
    texts: the texts.
    config: batching and padding.
    desc: label of the progress bar.
  """
  (v,), stats = encode(mean_pooled(encoder), tokenizer, texts, config, desc=desc,
                       vocab_size=vocab_size_of(encoder))
  return DenseEmbeddings(v, stats)


def encode_sparse(model: Embedder, tokenizer: Tokenizer, texts: Iterable[str], k: int | None = None,
                  config: EncodeConfig = EncodeConfig(), *, desc: str = "encode",
                  mesh: Mesh | None = None) -> SparseCodes:
  """TopK SAE codes of ``texts``.

  Args:
    model: the encoder + SAE.
    tokenizer: the encoder's tokenizer; checked against ``model.encoder.cfg.vocab_size``.
    texts: the texts.
    k: active latents per text; None uses the training k.
    config: batching and padding.
    desc: label of the progress bar.
    mesh: encode each batch data-parallel over this mesh (see `sparse_code`); None: one device.
  """
  (values, indices), stats = encode(sparse_code(model, k, mesh=mesh), tokenizer, texts, config,
                                    desc=desc, vocab_size=vocab_size_of(model.encoder))
  return SparseCodes(values, indices, stats)


def codes_of(sae: SAE, v: Float[np.ndarray, "N D"], k: int | None = None,
             batch_size: int = 1024) -> tuple[Float[np.ndarray, "N K"], Int[np.ndarray, "N K"]]:
  """The retrieval embedding (`SAE.embed`: TopK code, unit-norm when the SAE's codes are) of pooled
  embeddings already computed (`encode_dense`'s v): for the same texts, what `encode_sparse` with
  this SAE on top of that encoder returns, without running the encoder again.

  Rows go through in batches of ``batch_size``, the last one zero-padded (one compiled shape).

  Raises:
    DataError: ``v`` is not [N, D] with the SAE's D (embeddings of another encoder).
  """
  if v.ndim != 2 or v.shape[1] != sae.config.d_model:
    raise DataError(f"codes_of: embeddings of shape {tuple(v.shape)} do not fit an SAE reading "
                    f"d_model={sae.config.d_model}: expected [N, {sae.config.d_model}] (the pooled "
                    "output of the encoder this SAE was trained on)")
  k = sae.config.k if k is None else k
  graphdef, state = nnx.split(sae)
  n = v.shape[0]
  values = np.empty((n, k), np.float32)
  indices = np.empty((n, k), np.int32)
  for start in range(0, n, batch_size):
    rows = v[start:start + batch_size]
    padded = np.zeros((batch_size, v.shape[1]), np.float32)
    padded[:len(rows)] = rows
    vals, idx = jax.device_get(_sae_embed_forward(graphdef, state, jnp.asarray(padded), k))
    stop = start + len(rows)
    values[start:stop], indices[start:stop] = vals[:len(rows)], idx[:len(rows)]
  return values, indices
