"""One attention entry point for every encoder, with a backend per platform.

Layout is ``[B, T, N, H]`` (batch, tokens, heads, head dim) for q, k, v and the output, the layout of
`jax.nn.dot_product_attention`. Attention is bidirectional; ``window`` is the half-width of
ModernBERT's sliding window: a query at position i sees keys j with ``|i - j| <= window``
(ModernBERT's ``local_attention = 128`` is ``window = 64``). ``valid`` marks real tokens; padded keys
are never attended to, and outputs at padded query positions are unspecified (as in HF).

Backends:
  * ``xla``    two einsums around `jax.nn.softmax`, padding and window as an additive bias; the
               CPU path and the fallback everywhere. `jax.nn.dot_product_attention(implementation=
               "xla")` computes the same with a select over the logits and a softmax differentiated
               op by op: forward + backward of MiniLM's document attention took 100 ms against 69-80
               for this form (16 x 128 tokens, 12 heads, one core; RESULTS.md "Train step",
               session 17).
  * ``cudnn``  cuDNN fused attention on GPU. Padding goes in as sequence lengths, not as a mask:
               JAX hands a mask to cuDNN as an additive bias and asks for its gradient too (a
               [B, 1, T, T] dbias nobody reads; fwd + bwd of a global layer 1.05 -> 0.78 ms at
               128 x 256 tokens, 3.52 -> 2.27 ms at 8k, on an H200). Lengths
               describe right padding only (what `saejax.data` produces): a row of `valid` that
               is not a prefix is an error (eagerly) or NaN (under jit), never a wrong row.
               cuDNN's own sliding window is one-sided (causal models), so ModernBERT's two-sided
               window goes in as a mask, over blocks where that pays, and its backward writes no
               mask gradient (`_mask_without_gradient`). A window covering every pair (32-token
               queries, w = 64) is no window: lengths, no mask.
  * ``splash`` TPU Pallas splash attention with ``LocalMask`` and segment ids for padding
               (runs on CPU only in interpret mode, for tests).

Windowed layers on ``xla`` and ``cudnn`` run block-local from T = 8 x window (`blocks_pay`):
queries in blocks of ``window`` tokens, each attending only to the ``3 * window`` keys around its
block, so a windowed layer costs about ``3 * window / T`` of a global one instead of the full
T x T (an 8k-token windowed layer 4.7x faster on an H200).
"""

import contextlib
import threading
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from saejax.sharding import reshape_leading

Backend = Literal["xla", "cudnn", "splash"]
BACKENDS: tuple[str, ...] = ("xla", "cudnn", "splash")


def default_backend(platform: str | None = None) -> Backend:
  """The backend a platform should use unless the config says otherwise."""
  platform = platform or jax.default_backend()
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


def window_mask(valid: Bool[Array, "B T"], window: int | None) -> Bool[Array, "B 1 T T"]:
  """Boolean mask [B, 1, Tq, Tk]: key is a real token and (if windowed) within the window."""
  t = valid.shape[1]
  mask = jnp.broadcast_to(valid[:, None, None, :], (valid.shape[0], 1, t, t))
  if window is not None:
    pos = jnp.arange(t)
    mask = mask & (jnp.abs(pos[:, None] - pos[None, :]) <= window)[None, None]
  return mask


def blocks_pay(t: int, window: int | None) -> bool:
  """Whether `_local_blocks` beats the full T x T for this length and window.

  Blocks read 3w keys a query instead of T, but many small attention calls and the copies of
  their key spans cost more than the skipped work until T reaches about 8w. Measured on an H200
  (cuDNN, 12 heads of 64, w = 64, fwd + bwd): T = 256: full 1.01 ms, blocks 1.63 (B = 128);
  T = 2,048: 1.09 vs 0.59 (B = 4); T = 8,192: 3.35 vs 0.72 (B = 1). RESULTS.md "GPU", session 34.
  """
  return window is not None and window >= 1 and t >= 8 * window


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B T N H"], v: Float[Array, "B T N H"], *,
              valid: Bool[Array, "B T"], window: int | None = None,
              backend: Backend = "xla") -> Float[Array, "B T N H"]:
  """Bidirectional multi-head attention with padding and an optional symmetric window."""
  if backend == "splash":
    from saejax.models import splash  # Pallas import is slow and TPU-specific: only when asked for.
    return splash.attention(q, k, v, valid=valid, window=window)
  if backend not in ("xla", "cudnn"):
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
  if window is not None and window >= q.shape[1] - 1:
    window = None      # the band covers every pair (32-token queries, w = 64): no band to mask
  masked = _xla_attention if backend == "xla" else _cudnn_attention
  if blocks_pay(q.shape[1], window):
    return _local_blocks(q, k, v, valid, window, masked)
  if backend == "cudnn" and window is None:
    return _cudnn_padded(q, k, v, valid)
  return masked(q, k, v, window_mask(valid, window))


def _xla_attention(q, k, v, keep):
  # As jax.nn.dot_product_attention's "xla" path: logits and softmax in fp32, the weights cast to
  # v's dtype. Masked logits get 0.7 x fp32's lowest value added: far below any real logit, yet no
  # overflow to -inf, so a row with no real key is uniform, not NaN. `jax.nn.softmax`'s own
  # derivative, y (g - sum(g y)), is the short backward pass.
  bias = jnp.where(keep, 0.0, 0.7 * float(jnp.finfo(jnp.float32).min)).astype(jnp.float32)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * (q.shape[-1] ** -0.5) + bias, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", weights.astype(v.dtype), v)


def _cudnn_attention(q, k, v, keep=None, lengths=None):
  """cuDNN fused attention with a boolean mask or per-row lengths. The kernel takes fp16/bf16/fp8
  only: fp32 callers are computed in bf16."""
  dtype = q.dtype
  if dtype == jnp.float32:
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  with _mask_without_gradient():
    out = jax.nn.dot_product_attention(q, k, v, mask=keep, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation="cudnn")
  return out.astype(dtype)


@contextlib.contextmanager
def _mask_without_gradient():
  """JAX hands a mask to cuDNN as an additive bias and has the backward kernel write that bias's
  gradient too: a [B, 1, T, T] array nobody reads (a mask is no parameter). JAX decides it with
  `should_export_dbias`, read while the call is traced: always True in jax 0.10 and 0.11, while
  earlier releases skipped dbias for any bias not shaped [1, N, T, S] (so [B, 1, T, T] masks ran
  without it, the configuration used here). This turns it off for saejax's own calls (the bias
  cotangent is then zero, which it is); where JAX has no such switch, the call is left as it is.
  `tests/test_attention.py` checks on the CPU that the backward kernel loses that output, and on a
  GPU that gradients still match. The switch is off for this thread only (another thread tracing a
  cuDNN attention with a learnable bias meanwhile still gets its gradient), and saejax's own calls
  take turns, so each restores what it found."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # private: see the docstring
  except ImportError:
    cudnn_fa = None
  if not hasattr(cudnn_fa, "should_export_dbias"):
    yield
    return
  with _DBIAS_SWITCH:
    saved, me = cudnn_fa.should_export_dbias, threading.get_ident()
    cudnn_fa.should_export_dbias = lambda *a: threading.get_ident() != me and saved(*a)
    try:
      yield
    finally:
      cudnn_fa.should_export_dbias = saved


_DBIAS_SWITCH = threading.RLock()


def _cudnn_padded(q, k, v, valid):
  """Global cuDNN attention with padding as per-row lengths.

  A length describes right padding only (a real prefix, then padding: what `saejax.data` and the
  tokenizer produce). A row of `valid` that is not a prefix cannot be described that way: with
  concrete arrays that is an error here; under jit such a row comes out NaN (never a silently
  wrong row), since checking it on the host would stall the GPU once a layer (a `lax.cond` over
  the mask path cost more than the mask path itself: RESULTS.md "GPU", session 34).
  """
  t = valid.shape[1]
  lengths = valid.sum(-1, dtype=jnp.int32)
  prefix = jnp.all(valid == (jnp.arange(t)[None, :] < lengths[:, None]), axis=-1)
  if not isinstance(prefix, jax.core.Tracer) and not bool(prefix.all()):
    rows = np.flatnonzero(~np.asarray(prefix))[:5].tolist()
    raise ValueError(f"attention backend 'cudnn' reads padding as lengths, but rows {rows} of "
                     "`valid` are not a real prefix followed by padding (right padding); pad on "
                     "the right, or use backend 'xla'")
  # An all-padding row (a batch filled up to size) is given one key so cuDNN never sees an empty
  # row; outputs at padded queries are zeroed, so they stay finite whatever cuDNN writes there.
  out = _cudnn_attention(q, k, v, lengths=jnp.maximum(lengths, 1))
  out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
  return jnp.where(prefix[:, None, None, None], out, jnp.full((), jnp.nan, out.dtype))


def _local_blocks(q, k, v, valid, window, masked):
  """Windowed attention by blocks: queries in blocks of w = `window` tokens, each block attending
  to the 3w keys from w before it to w after it (all a query in the block can see), masked to the
  exact band |i - j| <= w and to real keys. 3w keys a query instead of T; the same result as the
  full T x T with `window_mask`."""
  b, t, n, h = q.shape
  w = window
  nb = -(-t // w)                       # query blocks; the last one padded up to w tokens
  tail = nb * w - t

  def keys(x):                          # [B, T, ...] -> [B * nb, 3w, ...]: block j's key span
    x = jnp.pad(x, [(0, 0), (w, w + tail)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, nb + 2, w, *x.shape[2:])
    x = jnp.concatenate([x[:, :-2], x[:, 1:-1], x[:, 2:]], axis=2)   # [B, nb, 3w, ...]
    return reshape_leading(x, (b * nb, 3 * w, *x.shape[3:]))

  qb = jnp.pad(q, [(0, 0), (0, tail), (0, 0), (0, 0)]).reshape(b, nb, w, n, h)
  qb = reshape_leading(qb, (b * nb, w, n, h))
  # Query a of a block sits at key offset a + w of its span: it sees offsets a .. a + 2w.
  offset = jnp.arange(3 * w)[None, :] - jnp.arange(w)[:, None]
  band = (offset >= 0) & (offset <= 2 * w)
  keep = keys(valid)[:, None, None, :] & band[None, None]
  out = masked(qb, keys(k), keys(v), keep)
  return reshape_leading(out, (b, nb, w, n, h)).reshape(b, nb * w, n, h)[:, :t]
