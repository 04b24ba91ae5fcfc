"""LayerNorm as two Pallas (Triton) GPU kernels, forward and backward, for the cuDNN (NVIDIA) path.

Why a kernel: on an H200 the XLA form of ModernBERT-base's 44 LayerNorms took 19 ms of a 92 ms
train step (RESULTS.md "GPU", session 34), about four times what moving their bytes takes. XLA kept
the residual stream in a [B, D, T] layout that suits its GEMMs, so every norm became a column
reduction with transposes on either side, and the backward pass kept an fp32 copy of the input.
A kernel that owns whole rows reads x once and writes y once (forward) and reads x, dy once and
writes dx once (backward), whatever layout XLA prefers elsewhere.

What each kernel does (rows are the flattened leading axes, D the normalised one):

  forward   one program per tile of rows (`TILE` elements): load [rows, D] (D padded to a power
            of two and masked, as Triton requires), mean and the exact two-pass variance in fp32
            (PyTorch's semantics, as `params.layer_norm`), y = (x - mean) / std * scale (+ bias);
            mean and 1 / std are kept (fp32, one value per row) for the backward pass.
  backward  one program per `STEPS` tiles: dx row by row from the saved statistics,
            dx = rstd (g s - mean(g s) - xhat mean(g s xhat)), and this program's partial sums of
            g xhat (and g) over its rows; XLA adds the partial rows (1,024 for ModernBERT-base at
            32k tokens) into d scale.

Sharding: a Pallas call cannot be partitioned by XLA (it would gather its inputs onto every device),
so inside a mesh whose data-parallel axes split the batch, the kernels run in `jax.shard_map` over
those axes; the partial sums leave the map sharded and XLA's sum over them is the all-reduce. Where
the batch does not divide those axes the call is left whole (correct; XLA gathers its inputs).
Off a GPU the kernels run in Pallas interpret mode (`interpret=True`), which is how the CPU tests
check them against `params.layer_norm`.
"""

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import AxisType, PartitionSpec as P

try:  # deprecated in jax 0.11 in favour of Mosaic GPU: a JAX without it must still import saejax
  from jax.experimental.pallas import triton as plgpu
except ImportError:
  plgpu = None

from saejax.models import params
from saejax.sharding import batch_split

TILE = 4096  # elements of x a program holds at once: rows x padded D (4 rows of ModernBERT's 768)
STEPS = 8    # row tiles a backward program walks through, so d scale has M / (8 x rows) partials
WARPS = 4    # Triton warps per program
# Backward tuning measured only as a trial so far (bench_gpu.py `try_ln_bwd`): fewer tiles per
# program while that leaves under MIN_PROGRAMS programs (the 2,048-row query pass runs 64 programs
# of 8 tiles on a 132-SM card), and Triton's software pipelining of the tile loop's loads.
MIN_PROGRAMS = 1
BWD_STAGES = 1


def available() -> bool:
  """Whether this JAX has Pallas's Triton backend, which the kernels are written for. Where it is
  gone, callers use `params.layer_norm` (the same function in XLA ops, slower on a GPU); `wanted`
  says so once."""
  return plgpu is not None


@functools.cache
def wanted() -> bool:
  """`available()`, logging once when the GPU path has to do without the kernels."""
  if not available():
    logging.getLogger(__name__).warning(
        "jax %s has no Pallas Triton backend (jax.experimental.pallas.triton): LayerNorm runs as "
        "XLA ops on the cudnn path (same results; RESULTS.md 'GPU' measured ~15 ms more a "
        "ModernBERT-base step on an H200)", jax.__version__)
  return available()


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, *,
               interpret: bool = False) -> jax.Array:
  """`params.layer_norm` (fp32 statistics, PyTorch's exact variance) as fused Triton kernels.

  Args:
    x: [..., D] in any float dtype; y has the same dtype.
    scale: [D]; bias: [D] or None.
    eps: added to the variance.
    interpret: run the kernels in Pallas interpret mode (any backend; for tests).
  """
  _check_shapes(x, None, scale, bias)
  if x.size == 0:  # no rows: no program to launch (a Pallas grid of size 0 is an error)
    return params.layer_norm(x, scale, bias, eps)
  return _layer_norm(x, scale, bias, eps, interpret)


def add_layer_norm(x: jax.Array, residual: jax.Array, scale: jax.Array, bias: jax.Array | None,
                   eps: float, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(s, layer_norm(s)) with s = x + residual (rounded to x's dtype), in one pass over the rows.

  A pre-norm block's "x + attn(h)" followed by the norm of the sum: the kernel reads x and the
  residual once and writes s and y, where an add and a norm would read s back; the backward pass
  adds s's own gradient to the norm's in the same pass. As `params.add_layer_norm`.
  """
  _check_shapes(x, residual, scale, bias)
  if x.size == 0:
    return params.add_layer_norm(x, residual, scale, bias, eps)
  return _add_layer_norm(x, residual, scale, bias, eps, interpret)


def _check_shapes(x, residual, scale, bias):
  # The kernels index scale, bias and the residual by x's row and column: a mismatch would read
  # past them instead of failing as a broadcast does.
  d = x.shape[-1] if x.ndim else None
  for name, a, want in (("scale", scale, (d,)), ("bias", bias, (d,)),
                        ("residual", residual, x.shape)):
    if a is not None and a.shape != want:
      raise ValueError(f"fused_norm: {name} has shape {a.shape}, expected {want} for x of shape "
                       f"{x.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, interpret):
  return _layer_norm_fwd(x, scale, bias, eps, interpret)[0]


def _layer_norm_fwd(x, scale, bias, eps, interpret):
  y, mean, rstd = _run_forward((x,), scale, bias, eps, interpret)
  return y, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, interpret, residuals, g):
  x, mean, rstd, scale, bias = residuals
  return _run_backward((x, g, mean, rstd), scale, bias, interpret)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _add_layer_norm(x, residual, scale, bias, eps, interpret):
  return _add_layer_norm_fwd(x, residual, scale, bias, eps, interpret)[0]


def _add_layer_norm_fwd(x, residual, scale, bias, eps, interpret):
  s, y, mean, rstd = _run_forward((x, residual), scale, bias, eps, interpret)
  return (s, y), (s, mean, rstd, scale, bias)


def _add_layer_norm_bwd(eps, interpret, residuals, cotangents):
  s, mean, rstd, scale, bias = residuals
  g_s, g_y = cotangents
  d, dscale, dbias = _run_backward((s, g_y, mean, rstd, g_s), scale, bias, interpret)
  return d, d, dscale, dbias   # s = x + residual: both get d(s)


_add_layer_norm.defvjp(_add_layer_norm_fwd, _add_layer_norm_bwd)


def _run_forward(sharded, scale, bias, eps, interpret):
  params = (scale,) if bias is None else (scale, bias)
  fn = functools.partial(_forward, eps=eps, has_residual=len(sharded) == 2,
                         has_bias=bias is not None, interpret=interpret)
  return _per_batch_shard(fn, sharded, params, 2 + len(sharded))


def _run_backward(sharded, scale, bias, interpret):
  fn = functools.partial(_backward, has_residual=len(sharded) == 5, interpret=interpret)
  dx, dscale, dbias = _per_batch_shard(fn, sharded, (scale,), 3)
  dscale = dscale.sum(0).astype(scale.dtype)
  dbias = None if bias is None else dbias.sum(0).astype(bias.dtype)
  return dx, dscale, dbias


def _per_batch_shard(fn, sharded, replicated: tuple, n_out: int):
  """fn(*sharded, *replicated), run per shard of the leading axis over the batch mesh axes.

  `sharded` is a tuple of arrays whose leading axis is the batch; every output of fn is split the
  same way (the partial sums' leading axis too). Without a mesh, where the batch axes are trivial
  or do not divide the leading axis, or for a single row [D], fn runs on the whole arrays.
  """
  lead = sharded[0]
  axes = batch_split(lead.shape[0]) if lead.ndim >= 2 else ()
  if not axes:
    return fn(*sharded, *replicated)
  mesh = jax.sharding.get_abstract_mesh()
  if AxisType.Explicit in mesh.axis_types:
    sharded = tuple(jax.sharding.reshard(a, P(axes)) for a in sharded)
    replicated = tuple(jax.sharding.reshard(a, P()) for a in replicated)
  # check_vma=False: a Pallas call has no rule saying how its outputs vary over the mesh axes.
  return jax.shard_map(fn, in_specs=(P(axes),) * len(sharded) + (P(),) * len(replicated),
                       out_specs=(P(axes),) * n_out, check_vma=False)(*sharded, *replicated)


def _tiles(d: int) -> tuple[int, int]:
  """(D padded to a power of two, rows per tile): Triton blocks are powers of two."""
  width = pl.next_power_of_2(d)
  return width, max(1, TILE // width)


def _forward(*arrays, eps, has_residual, has_bias, interpret):
  x = arrays[0]
  shape, d = x.shape, x.shape[-1]
  m = math.prod(shape[:-1])
  width, block = _tiles(d)
  rows = (m, d)
  out_shape = ((jax.ShapeDtypeStruct(rows, x.dtype),) * (2 if has_residual else 1)
               + (jax.ShapeDtypeStruct((m,), jnp.float32),) * 2)
  kernel = functools.partial(_forward_kernel, eps=eps, width=width, block=block,
                             has_residual=has_residual, has_bias=has_bias)
  inputs = [a.reshape(rows) for a in arrays[:1 + has_residual]] + list(arrays[1 + has_residual:])
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(pl.cdiv(m, block),), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=1), name="layer_norm_fwd",
  )(*inputs)
  *ys, mean, rstd = outs
  return (*(y.reshape(shape) for y in ys), mean.reshape(shape[:-1]), rstd.reshape(shape[:-1]))


def _backward(x, g, mean, rstd, *rest, has_residual, interpret):
  g_s, scale = rest if has_residual else (None, rest[0])
  shape, d = x.shape, x.shape[-1]
  m = math.prod(shape[:-1])
  width, block = _tiles(d)
  tiles = pl.cdiv(m, block)
  steps = max(1, min(STEPS, tiles // MIN_PROGRAMS))
  programs = pl.cdiv(m, block * steps)
  out_shape = (jax.ShapeDtypeStruct((m, d), x.dtype),
               jax.ShapeDtypeStruct((programs * d,), jnp.float32),
               jax.ShapeDtypeStruct((programs * d,), jnp.float32))
  kernel = functools.partial(_backward_kernel, width=width, block=block, steps=steps,
                             has_residual=has_residual)
  extra = () if g_s is None else (g_s.reshape(m, d),)
  dx, dscale, dbias = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(programs,), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=WARPS, num_stages=BWD_STAGES),
      name="layer_norm_bwd",
  )(x.reshape(m, d), g.reshape(m, d), mean.reshape(-1), rstd.reshape(-1), scale, *extra)
  return dx.reshape(shape), dscale.reshape(programs, d), dbias.reshape(programs, d)


def _tile_index(ref, first_row, block, width):
  """Row and column indices of the tile starting at `first_row`, and its in-bounds masks."""
  m, d = ref.shape
  rows = first_row + jnp.arange(block)
  cols = jnp.arange(width)
  row_ok, col_ok = rows < m, cols < d
  return rows, cols, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


def _forward_kernel(x_ref, *refs, eps, width, block, has_residual, has_bias):
  refs = list(refs)
  residual_ref = refs.pop(0) if has_residual else None
  scale_ref = refs.pop(0)
  bias_ref = refs.pop(0) if has_bias else None
  s_ref = refs.pop(0) if has_residual else None
  y_ref, mean_ref, rstd_ref = refs
  d = x_ref.shape[1]
  rows, cols, row_ok, col_ok, ok = _tile_index(x_ref, pl.program_id(0) * block, block, width)
  at = (rows[:, None], cols[None, :])
  x = plgpu.load(x_ref.at[at], mask=ok, other=0.0)
  if has_residual:  # the sum in x's dtype, as `x + residual` outside the kernel rounds it
    x = (x.astype(jnp.float32) + plgpu.load(residual_ref.at[at], mask=ok, other=0.0
                                            ).astype(jnp.float32)).astype(x_ref.dtype)
    plgpu.store(s_ref.at[at], x, mask=ok)
  x = x.astype(jnp.float32)
  mean = x.sum(1) / d
  centred = jnp.where(ok, x - mean[:, None], 0.0)
  rstd = jax.lax.rsqrt((centred * centred).sum(1) / d + eps)
  y = centred * rstd[:, None] * plgpu.load(scale_ref.at[cols], mask=col_ok, other=0.0
                                           ).astype(jnp.float32)[None, :]
  if has_bias:
    y = y + plgpu.load(bias_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)[None, :]
  plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=ok)
  plgpu.store(mean_ref.at[rows], mean, mask=row_ok)
  plgpu.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _backward_kernel(x_ref, g_ref, mean_ref, rstd_ref, scale_ref, *refs, width, block, steps,
                     has_residual):
  g_s_ref, (dx_ref, dscale_ref, dbias_ref) = (refs[0], refs[1:]) if has_residual else (None, refs)
  d = x_ref.shape[1]
  program = pl.program_id(0)
  cols = jnp.arange(width)
  scale = plgpu.load(scale_ref.at[cols], mask=cols < d, other=0.0).astype(jnp.float32)

  def tile(i, sums):
    rows, _, row_ok, _, ok = _tile_index(x_ref, (program * steps + i) * block, block, width)
    at = (rows[:, None], cols[None, :])
    x = plgpu.load(x_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    g = plgpu.load(g_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    mean = plgpu.load(mean_ref.at[rows], mask=row_ok, other=0.0)
    rstd = plgpu.load(rstd_ref.at[rows], mask=row_ok, other=0.0)
    xhat = jnp.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    gs = g * scale[None, :]
    dx = rstd[:, None] * (gs - (gs.sum(1) / d)[:, None] - xhat * ((gs * xhat).sum(1) / d)[:, None])
    if has_residual:  # the sum's own gradient, added where `s` fed the rest of the network
      dx = dx + plgpu.load(g_s_ref.at[at], mask=ok, other=0.0).astype(jnp.float32)
    plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=ok)
    return sums[0] + (g * xhat).sum(0), sums[1] + g.sum(0)

  zeros = jnp.zeros((width,), jnp.float32)
  dscale, dbias = jax.lax.fori_loop(0, steps, tile, (zeros, zeros))
  # The partial sums are flat [programs * D]: each program writes one row of D.
  plgpu.store(dscale_ref.at[program * d + cols], dscale, mask=cols < d)
  plgpu.store(dbias_ref.at[program * d + cols], dbias, mask=cols < d)
