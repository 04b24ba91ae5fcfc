"""How every weight is declared: shape, dtype, logical axes and initialiser in one place.

Each parameter carries logical axis names (``axes`` metadata, e.g. ``("embed", "mlp")``).
`saejax.sharding` maps those names to mesh axes with one rules table, so sharding has a single
source of truth and a parameter without axes is an error there, never silently replicated.
"""

import functools
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saejax.errors import ConfigError, DataError

Axes = tuple[str | None, ...]
ComputeDtype = Literal["float32", "bfloat16"]


def check_config(cfg, sizes: tuple[str, ...]) -> None:
  """An encoder config's shared checks: ``sizes`` positive ints, the compute dtype known, the
  hidden size split evenly over the heads (ConfigError naming the fields)."""
  bad = {k: getattr(cfg, k) for k in sizes
         if not isinstance(getattr(cfg, k), int) or getattr(cfg, k) < 1}
  if bad:
    raise ConfigError(f"{type(cfg).__name__} sizes must be positive integers; got {bad}")
  if cfg.hidden_size % cfg.num_attention_heads:
    raise ConfigError(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                      f"{cfg.num_attention_heads}")
  if cfg.dtype not in get_args(ComputeDtype):
    raise ConfigError(f"dtype {cfg.dtype!r} is not one of {get_args(ComputeDtype)}")


def check_inputs(input_ids, valid):
  """``valid`` as bool, or a DataError unless ids and mask are both [B, T]."""
  if input_ids.ndim != 2 or valid.shape != input_ids.shape:
    raise DataError(f"input_ids {input_ids.shape} and valid {valid.shape} must both be [B, T]")
  return valid.astype(bool)


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], axes: Axes,
          dtype=jnp.float32) -> nnx.Param:
  """A parameter of `shape` initialised by `init`, annotated with logical `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


def normal(stddev: float = 0.02) -> Callable:
  """Truncated-normal initialiser (ModernBERT and BERT both use a small normal init)."""
  return jax.nn.initializers.truncated_normal(stddev)


def ones() -> Callable:
  return jax.nn.initializers.ones


def zeros() -> Callable:
  return jax.nn.initializers.zeros


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
  """LayerNorm in fp32 with the exact (two-pass) variance that PyTorch uses.

  The backward pass is written out (`_layer_norm_bwd`) rather than left to autodiff: it keeps x in
  its own dtype with the per-row mean and 1/std as residuals (autodiff kept fp32 copies of x), and
  gives XLA one row reduction for dx and one column reduction per parameter. On an H200 the
  autodiff form of ModernBERT-base's 44 norms took 19 ms of a 97 ms train step, most of it in
  transposes XLA inserted between the two kinds of reduction (RESULTS.md "GPU", session 34).
  """
  return _layer_norm(x, scale, bias, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
  y = (xf - mean) * rstd * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, residuals, g):
  # y = xhat * scale + bias with xhat = (x - mean) * rstd; d xhat = g * scale, and through the
  # normalisation dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
  del eps
  x, mean, rstd, scale, bias = residuals
  gf = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  rows = tuple(range(x.ndim - 1))
  dscale = (gf * xhat).sum(rows).astype(scale.dtype)
  dbias = None if bias is None else gf.sum(rows).astype(bias.dtype)
  dxhat = gf * scale.astype(jnp.float32)
  dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
               - xhat * (dxhat * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def add_layer_norm(x: jax.Array, residual: jax.Array, scale: jax.Array, bias: jax.Array | None,
                   eps: float) -> tuple[jax.Array, jax.Array]:
  """(s, layer_norm(s)) with s = x + residual: a pre-norm block's residual add and the norm after
  it, the form `fused_norm.add_layer_norm` computes in one kernel."""
  s = x + residual
  return s, layer_norm(s, scale, bias, eps)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as PyTorch computes it, 0.5 x (1 + erf(x / sqrt 2)), in fp32.

  `jax.nn.gelu(approximate=False)` uses the erfc form, which XLA:CPU expands into a slow
  polynomial: forward + backward over [2560, 1536] took 45.9 ms against 19.3 ms for this form
  (one core; RESULTS.md "Train step", session 17); the two agree to 1e-6.
  """
  xf = x.astype(jnp.float32)
  return (0.5 * xf * (1.0 + jax.lax.erf(xf * np.float32(np.sqrt(0.5))))).astype(x.dtype)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """``x @ kernel (+ bias)`` over the last axis, computed as one 2-D matmul.

  Why 2-D: for a 3-D ``x`` the weight gradient contracts two axes (batch and tokens), which XLA:CPU
  runs as a generic dot at about half the speed of a GEMM; flattening to [B*T, D] turns both
  backward products into plain GEMMs (forward + backward 1.85x faster, measured at 16x128x384 @
  384x1536 on this project's 2-core CPU). The result is identical.
  """
  k = kernel.astype(x.dtype)
  y = x.reshape(-1, x.shape[-1]) @ k
  if bias is not None:
    y = y + bias.astype(x.dtype)
  return y.reshape(*x.shape[:-1], k.shape[-1])
