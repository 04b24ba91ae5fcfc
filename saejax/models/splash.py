"""TPU splash attention for ModernBERT/BERT: padding and the bidirectional local window.

Splash attention (Pallas, TPU) is a block-sparse flash attention: FlashAttention's online softmax over
key/value tiles (Dao et al. 2022, https://arxiv.org/abs/2205.14135) that skips tiles the mask empties,
so ModernBERT's local layers (Warner et al. 2024, https://arxiv.org/abs/2412.13663) cost about
``T * (2 * window + block)`` instead of ``T * T``. How the kernel is fed here:

  * layout: the kernel takes ``[N, T, H]`` per example; the batch is vmapped and ``[B, T, N, H]`` is
    transposed on the way in and out.
  * scale: the kernel does not scale logits, so q is pre-multiplied by ``1 / sqrt(H)``.
  * window: ``LocalMask(window_size=(window, window))`` (key j visible from query i iff
    ``|i - j| <= window``), or ``FullMask`` for global layers; the same mask for every head.
  * padding: segment ids, real tokens 1 and padding 0, so real queries never see padded keys. A padded
    query sees at least itself, so no softmax row is empty (its output is unspecified, as in HF).
  * length: tiles must be multiples of 128 lanes, so T is padded up to a multiple of 128 (the extra
    positions are padding, segment 0) and the output sliced back.
  * sharding: under a mesh the kernel runs in `jax.shard_map`, per shard of the batch and heads (a
    Pallas call cannot be partitioned by the compiler: "Mosaic kernels cannot be automatically
    partitioned", and it fails on Explicit avals). Explicit axes: q's own batch and head shardings.
    Auto axes (`saejax.sharding.make_mesh`): the batch over the data-parallel axes that divide it
    (`sharding.batch_split`), the heads over ``tensor`` where it divides them.

Kernels are built on the host from the mask, so they are cached per (T, N, window, block, interpret).
Off TPU the kernel runs in Pallas interpret mode, which is how the CPU tests check it.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
    SplashAttentionKernel)
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, Bool, Float

from saejax.errors import SaejaxError
from saejax.sharding import batch_split

LANES = 128  # Splash tiles (block_q, block_kv) must be multiples of the TPU lane width.
MAX_BLOCK = 512  # Largest tile tried: big enough to amortise the per-tile overhead, small enough for VMEM.


class AttentionInputError(SaejaxError, ValueError):
  """q, k, v, valid or window do not fit together."""


def padded_length(t: int) -> int:
  """The sequence length the kernel runs at: ``t`` rounded up to a multiple of 128."""
  return -(-t // LANES) * LANES


def block_size(t_padded: int) -> int:
  """The largest tile in (512, 256, 128) that divides the padded length."""
  return next(b for b in (MAX_BLOCK, MAX_BLOCK // 2, LANES) if t_padded % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(t: int, n: int, window: int | None, block: int, interpret: bool) -> SplashAttentionKernel:
  """Splash kernel for ``n`` heads over ``t`` tokens (forward and backward tiles both ``block``)."""
  head_mask = (sa.FullMask((t, t)) if window is None else
               sa.LocalMask(shape=(t, t), window_size=(window, window), offset=0))
  block_sizes = sa.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  # The kernel holds its mask tables as arrays; build them concretely even when first asked for
  # inside a trace, or the cache would hand later calls a leaked tracer.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha_single_device(
        sa.MultiHeadMask([head_mask] * n), block_sizes=block_sizes, interpret=interpret)


def _check_inputs(q: Array, k: Array, v: Array, valid: Array, window: int | None) -> None:
  """Raise AttentionInputError naming the argument whose shape or value is wrong."""
  if q.ndim != 4:
    raise AttentionInputError(f"splash attention: q must be [B, T, N, H], got shape {q.shape}")
  for name, x in (("k", k), ("v", v)):
    if x.shape != q.shape:
      raise AttentionInputError(
          f"splash attention: {name} shape {x.shape} differs from q shape {q.shape}")
  if valid.shape != q.shape[:2]:
    raise AttentionInputError(
        f"splash attention: valid shape {valid.shape} is not q's [B, T] = {q.shape[:2]}")
  if window is not None and (not isinstance(window, int) or window < 0):
    raise AttentionInputError(
        f"splash attention: window must be None or an int >= 0, got {window!r}")


def _local_attention(q: Float[Array, "B T N H"], k: Float[Array, "B T N H"],
                     v: Float[Array, "B T N H"], valid: Bool[Array, "B T"], *,
                     window: int | None, interpret: bool) -> Float[Array, "B T N H"]:
  """Splash attention on arrays that all live on one device (or one shard_map shard)."""
  _, t, n, h = q.shape
  t_pad = padded_length(t)
  kernel = _kernel(t_pad, n, window, block_size(t_pad), interpret)
  pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
  q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)
  q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, T', H]
  segment = jnp.pad(valid, ((0, 0), (0, t_pad - t))).astype(jnp.int32)  # real 1, padding 0
  out = jax.vmap(kernel, in_axes=(0, 0, 0, sa.SegmentIds(0, 0)))(
      q, k, v, sa.SegmentIds(q=segment, kv=segment))
  return out.transpose(0, 2, 1, 3)[:, :t]


def attention(q: Float[Array, "B T N H"], k: Float[Array, "B T N H"], v: Float[Array, "B T N H"], *,
              valid: Bool[Array, "B T"], window: int | None,
              interpret: bool | None = None) -> Float[Array, "B T N H"]:
  """Bidirectional multi-head splash attention with key padding and an optional symmetric window.

  Args:
    q: queries [B, T, N, H], not yet scaled (this function applies ``1 / sqrt(H)``).
    k: keys, same shape as q.
    v: values, same shape as q.
    valid: [B, T] True at real tokens; padded keys are never attended to.
    window: half-width of the local window (key j visible from query i iff ``|i - j| <= window``);
      None for global attention.
    interpret: run the Pallas kernel in interpret mode; None means interpret unless on TPU.

  Returns:
    [B, T, N, H] attention output in q's dtype; rows at padded queries are unspecified.

  Raises:
    AttentionInputError: the shapes of q, k, v, valid disagree, or window is negative.
  """
  _check_inputs(q, k, v, valid, window)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  local = functools.partial(_local_attention, window=window, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  valid = valid.astype(bool)
  if mesh.empty:
    return local(q, k, v, valid)
  # Run per shard of the batch and heads; T and H must be whole.
  if AxisType.Explicit in mesh.axis_types:  # where q already is
    spec = tuple(jax.typeof(q).sharding.spec) + (None,) * 4
    qkv_spec, valid_spec = P(spec[0], None, spec[2], None), P(spec[0], None)
    q, k, v = (jax.sharding.reshard(x, qkv_spec) for x in (q, k, v))
    valid = jax.sharding.reshard(valid, valid_spec)
  else:  # Auto axes: q's sharding is the compiler's choice; name the split it should have
    batch = batch_split(q.shape[0]) or None
    tensor = dict(zip(mesh.axis_names, mesh.axis_sizes)).get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 else None
    qkv_spec, valid_spec = P(batch, None, heads, None), P(batch, None)
  # check_vma=False: the Pallas call has no rule saying how its output varies across mesh axes.
  return jax.shard_map(local, in_specs=(qkv_spec, qkv_spec, qkv_spec, valid_spec),
                       out_specs=qkv_spec, check_vma=False)(q, k, v, valid)
