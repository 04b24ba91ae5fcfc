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
  * ``cudnn``  cuDNN fused attention on GPU. cuDNN rejects a two-sided ``local_window_size``, so the
               window and padding go in as one explicit boolean mask.
  * ``splash`` TPU Pallas splash attention with ``LocalMask`` and segment ids for padding
               (runs on CPU only in interpret mode, for tests).
"""

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

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


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B T N H"], v: Float[Array, "B T N H"], *,
              valid: Bool[Array, "B T"], window: int | None = None,
              backend: Backend = "xla") -> Float[Array, "B T N H"]:
  """Bidirectional multi-head attention with padding and an optional symmetric window."""
  if backend == "xla":
    return _xla_attention(q, k, v, valid, window)
  if backend == "cudnn":
    # cuDNN's fused kernel takes fp16/bf16/fp8 only: fp32 callers are computed in bf16.
    dtype = q.dtype
    if dtype == jnp.float32:
      q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=window_mask(valid, window),
                                       implementation="cudnn")
    return out.astype(dtype)
  if backend == "splash":
    from saejax.models import splash  # Pallas import is slow and TPU-specific: only when asked for.
    return splash.attention(q, k, v, valid=valid, window=window)
  raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _xla_attention(q, k, v, valid, window):
  # As jax.nn.dot_product_attention's "xla" path: logits and softmax in fp32, the weights cast to
  # v's dtype. Masked logits get 0.7 x fp32's lowest value added: far below any real logit, yet no
  # overflow to -inf, so a row with no real key is uniform, not NaN. `jax.nn.softmax`'s own
  # derivative, y (g - sum(g y)), is the short backward pass.
  keep = valid[:, None, None, :] if window is None else window_mask(valid, window)
  bias = jnp.where(keep, 0.0, 0.7 * float(jnp.finfo(jnp.float32).min)).astype(jnp.float32)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * (q.shape[-1] ** -0.5) + bias, axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", weights.astype(v.dtype), v)
