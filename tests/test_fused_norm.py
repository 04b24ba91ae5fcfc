"""The Triton LayerNorm kernels (`saejax.models.fused_norm`) against `params.layer_norm`.

On CPU the kernels run in Pallas interpret mode (the same kernel code, executed by XLA:CPU); on a
GPU `test_compiled_kernels_on_gpu` runs them compiled. The reference is the project's XLA
LayerNorm, itself checked against PyTorch (test_modernbert, test_bert) and autodiff.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.models import fused_norm, params

REPO = Path(__file__).resolve().parents[1]


def value_and_grads(norm, x, scale, bias, cot):
  """(y, dx, dscale, dbias) of sum(norm(x) * cot): forward and every gradient at once."""
  def loss(x, scale, bias):
    y = norm(x, scale, bias)
    return jnp.sum(y.astype(jnp.float32) * cot), y
  argnums = (0, 1) if bias is None else (0, 1, 2)
  grads, y = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(x, scale, bias)
  return (y, *grads)


def inputs(shape, dtype, with_bias, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  d = shape[-1]
  # An offset and a spread that differ per row: a kernel that skipped centring or scaling fails.
  x = (jax.random.normal(keys[0], shape) * (1 + jnp.arange(shape[-2])[:, None] % 3)
       + jnp.arange(shape[-2])[:, None] % 5).astype(dtype)
  scale = 1 + 0.5 * jax.random.normal(keys[1], (d,))
  bias = 0.5 * jax.random.normal(keys[2], (d,)) if with_bias else None
  cot = jax.random.normal(keys[3], shape)
  return x, scale, bias, cot


@pytest.mark.parametrize("shape, dtype, with_bias", [
    ((3, 5, 768), jnp.float32, False),    # ModernBERT's width, one backward program
    ((1100, 64), jnp.float32, True),      # several backward programs, the last one partly empty
    ((2, 7, 48), jnp.bfloat16, True),     # D not a power of two (masked columns), bf16 in and out
    ((37, 100), jnp.float32, False),      # rows not a multiple of the tile
    ((0, 5, 48), jnp.float32, True),      # no rows at all (an empty batch)
])
def test_interpreted_kernels_match_xla_layer_norm(shape, dtype, with_bias):
  x, scale, bias, cot = inputs(shape, dtype, with_bias)
  got = value_and_grads(lambda *a: fused_norm.layer_norm(*a, 1e-5, interpret=True),
                        x, scale, bias, cot)
  want = value_and_grads(lambda *a: params.layer_norm(*a, 1e-5), x, scale, bias, cot)
  assert got[0].dtype == dtype and got[1].dtype == dtype
  # fp32: summation order only; bf16: y and dx are rounded to bf16 on both sides.
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max(initial=0) <= tol * (1 + np.abs(b).max(initial=0)), name


@pytest.mark.parametrize("shape, dtype, with_bias", [
    ((3, 5, 768), jnp.bfloat16, False),   # ModernBERT's case: bf16 residual stream, no bias
    ((1100, 64), jnp.float32, True),      # several backward programs
    ((37, 100), jnp.float32, False),
    ((0, 64), jnp.bfloat16, False),
])
def test_interpreted_add_and_norm_match_xla(shape, dtype, with_bias):
  """(s, y) = (x + r, norm(x + r)) with cotangents on both outputs: x and r both get
  d(s) + the norm's gradient, as the separate add and norm give them."""
  x, scale, bias, cot_y = inputs(shape, dtype, with_bias)
  r = jax.random.normal(jax.random.key(5), shape).astype(dtype)
  cot_s = jax.random.normal(jax.random.key(6), shape)

  def run(add_norm):
    def loss(x, r, scale, bias):
      s, y = add_norm(x, r, scale, bias)
      return jnp.sum(s.astype(jnp.float32) * cot_s) + jnp.sum(y.astype(jnp.float32) * cot_y), (s, y)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads, outs = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(x, r, scale, bias)
    return (*outs, *grads)

  got = run(lambda *a: fused_norm.add_layer_norm(*a, 1e-5, interpret=True))
  want = run(lambda *a: params.add_layer_norm(*a, 1e-5))
  assert [a.dtype for a in got[:4]] == [dtype] * 4
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for name, a, b in zip(("s", "y", "dx", "dr", "dscale", "dbias"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max(initial=0) <= tol * (1 + np.abs(b).max(initial=0)), name


def test_backward_spread_over_more_programs_gives_the_same_gradients(monkeypatch):
  """MIN_PROGRAMS (a tuning knob: fewer tiles per backward program on small batches) changes how
  many partial sums d scale has, not its value."""
  x, scale, bias, cot = inputs((1100, 64), jnp.float32, True)
  want = value_and_grads(lambda *a: params.layer_norm(*a, 1e-5), x, scale, bias, cot)
  stats = fused_norm._forward(x, scale, bias, eps=1e-5, has_residual=False, has_bias=True,
                              interpret=True)[1:]
  partials = []
  for min_programs in (1, 1024):
    monkeypatch.setattr(fused_norm, "MIN_PROGRAMS", min_programs)
    got = value_and_grads(lambda *a: fused_norm.layer_norm(*a, 1e-5, interpret=True),
                          x, scale, bias, cot)
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    partials.append(fused_norm._backward(x, cot, *stats, scale, has_residual=False,
                                         interpret=True)[1].shape[0])
  assert partials == [3, 18]    # 18 tiles of 64 rows: 8 a program, or one each


def test_gradients_under_remat_match():
  """ModernBERT recomputes each block in the backward pass (`remat`): the kernels' forward then
  runs again inside the backward, and the gradients must not change."""
  x, scale, _, cot = inputs((4, 9, 48), jnp.float32, False)

  def loss(x, scale):
    s, y = fused_norm.add_layer_norm(x, x * x, scale, None, 1e-5, interpret=True)
    return jnp.sum(fused_norm.layer_norm(s + y, scale, None, 1e-5, interpret=True) * cot)

  plain = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, scale)
  for a, b in zip(remat, plain):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_mismatched_shapes_are_named():
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match=r"scale has shape \(4,\), expected \(8,\)"):
    fused_norm.layer_norm(x, jnp.ones(4), None, 1e-5, interpret=True)
  with pytest.raises(ValueError, match=r"bias has shape \(9,\)"):
    fused_norm.layer_norm(x, jnp.ones(8), jnp.ones(9), 1e-5, interpret=True)
  with pytest.raises(ValueError, match=r"residual has shape \(1, 8\), expected \(2, 8\)"):
    fused_norm.add_layer_norm(x, jnp.ones((1, 8)), jnp.ones(8), None, 1e-5, interpret=True)


def test_statistics_are_per_row_and_fp32():
  # A hand-made case: rows [1, 3] and [10, 10 + 2e-3] (eps 0): y = [-1, 1] for both. bf16 could
  # not even hold the second row's spread; the statistics must be fp32.
  x = jnp.asarray([[1.0, 3.0], [10.0, 10.002]], jnp.float32)
  y = fused_norm.layer_norm(x, jnp.ones(2), jnp.zeros(2), 0.0, interpret=True)
  np.testing.assert_allclose(np.asarray(y), [[-1, 1], [-1, 1]], atol=2e-3)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from jax.sharding import AxisType, PartitionSpec as P
    from saejax.models import fused_norm, params

    x = jax.random.normal(jax.random.key(0), (8, 6, 40)) + jnp.arange(8.0)[:, None, None]
    scale, bias = jnp.linspace(0.5, 2, 40), jnp.linspace(-1, 1, 40)
    cot = jax.random.normal(jax.random.key(1), x.shape)

    def grads(norm, x, scale, bias):
      loss = lambda *a: jnp.sum(norm(*a) * cot)
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)

    want = grads(lambda *a: params.layer_norm(*a, 1e-5), x, scale, bias)
    fused = lambda *a: fused_norm.layer_norm(*a, 1e-5, interpret=True)
    for kind in (AxisType.Auto, AxisType.Explicit):
      mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(kind,) * 3)
      with jax.set_mesh(mesh):
        xs = jax.device_put(x, P(("data", "fsdp")))
        text = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fused(*a) * cot)))(xs, scale, bias))
        got = grads(fused, xs, scale, bias)
      err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
      print(kind.name, "SHARD_MAPS", text.count("shard_map"), "ERR", err)
      with jax.set_mesh(mesh):  # the add-and-norm pair: s = x + r, d scale summed over shards
        got = grads(lambda x, s, b: sum(fused_norm.add_layer_norm(x, x[::-1], s, b, 1e-5,
                                                                  interpret=True)), xs, scale, bias)
      want_add = grads(lambda x, s, b: sum(params.add_layer_norm(x, x[::-1], s, b, 1e-5)),
                       x, scale, bias)
      print(kind.name, "ADD_ERR", max(float(jnp.max(jnp.abs(a - b)))
                                      for a, b in zip(got, want_add)))
""")


def test_kernels_run_per_batch_shard_under_a_mesh():
  """8 fake CPU devices, the batch over ('data', 'fsdp'): the kernels run in shard_map (forward
  and backward) and d scale, summed from every shard's partials, equals the unsharded gradient."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  run = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [line.split() for line in run.stdout.splitlines() if "SHARD_MAPS" in line]
  assert [r[0] for r in rows] == ["Auto", "Explicit"]
  for _, _, maps, _, err in rows:
    assert int(maps) == 2
    assert float(err) < 1e-4
  add_errors = [float(line.split()[-1]) for line in run.stdout.splitlines() if "ADD_ERR" in line]
  assert len(add_errors) == 2 and max(add_errors) < 1e-4


def test_compiled_kernels_on_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip(f"the Triton kernels compile for a GPU; this run's backend is "
                f"{jax.default_backend()!r} (interpret mode is tested above)")
  for shape, dtype, with_bias in (((4, 256, 768), jnp.bfloat16, False),
                                  ((4, 256, 768), jnp.float32, True),
                                  ((3, 37, 100), jnp.float32, True)):
    x, scale, bias, cot = inputs(shape, dtype, with_bias)
    got = value_and_grads(lambda *a: fused_norm.layer_norm(*a, 1e-5), x, scale, bias, cot)
    want = value_and_grads(lambda *a: params.layer_norm(*a, 1e-5), x, scale, bias, cot)
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), got, want):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.abs(a - b).max() <= tol * (1 + np.abs(b).max()), (shape, name)
    got = value_and_grads(lambda *a: fused_norm.add_layer_norm(x, *a, 1e-5)[1], x, scale, bias,
                          cot)
    want = value_and_grads(lambda *a: params.add_layer_norm(x, *a, 1e-5)[1], x, scale, bias, cot)
    for name, a, b in zip(("y", "dx+dr", "dscale", "dbias"), got, want):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert np.abs(a - b).max() <= tol * (1 + np.abs(b).max()), (shape, "add", name)


def test_kernels_lower_to_triton_for_a_gpu():
  """Pallas lowers the kernels to Triton IR on any machine: a construct Triton lacks (a block that
  is not a power of two, an unsupported op) fails here, on CPU, not first on a GPU. The forward and
  backward each become one Triton custom call; XLA compiles them to PTX only on a GPU."""
  x = jax.ShapeDtypeStruct((8, 256, 768), jnp.bfloat16)
  scale = jax.ShapeDtypeStruct((768,), jnp.float32)
  for bias in (None, scale):
    def loss(x, scale, bias):
      return jnp.sum(fused_norm.layer_norm(x, scale, bias, 1e-5).astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, scale, bias).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 2
    def add_loss(x, scale, bias):
      s, y = fused_norm.add_layer_norm(x, x, scale, bias, 1e-5)
      return jnp.sum(s.astype(jnp.float32)) + jnp.sum(y.astype(jnp.float32))
    lowered = jax.jit(jax.grad(add_loss, argnums=(0, 1))).trace(x, scale, bias).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 2


_NO_TRITON_SCRIPT = textwrap.dedent("""
    import logging, sys
    sys.modules["jax.experimental.pallas.triton"] = None   # a JAX without Pallas's Triton backend
    import jax, jax.numpy as jnp
    from flax import nnx
    from saejax.models import fused_norm, modernbert, params
    logging.basicConfig(level=logging.WARNING)
    cfg = modernbert.ModernBertConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      layer_types=("full_attention",),
                                      num_attention_heads=2, attention_backend="cudnn")
    norms = [modernbert.Norm(cfg, rngs=nnx.Rngs(0)) for _ in range(3)]
    x = jax.random.normal(jax.random.key(0), (3, 5, 16))
    y, (s, y2) = norms[0](x), norms[1].add(x, 2 * x)
    want, want2 = (params.layer_norm(a, n.scale[...], None, cfg.norm_eps)
                   for a, n in ((x, norms[0]), (3 * x, norms[1])))
    print("AVAILABLE", fused_norm.available(), "FUSED", [n.fused for n in norms],
          "ERR", float(jnp.abs(y - want).max()), float(jnp.abs(y2 - want2).max()),
          float(jnp.abs(s - 3 * x).max()))
""")


def test_a_jax_without_pallas_triton_still_imports_and_norms_without_the_kernels():
  """JAX 0.11 deprecates Pallas's Triton backend: where it is gone, saejax still imports, the cudnn
  path's norms are `params.layer_norm` (the same values), and the fallback is logged once."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  run = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  words = next(line for line in run.stdout.splitlines() if line.startswith("AVAILABLE")).split()
  assert words[1] == "False" and " ".join(words[3:6]) == "[False, False, False]"
  assert all(float(e) < 1e-6 for e in words[7:])
  assert run.stderr.count("has no Pallas Triton backend") == 1, run.stderr[-2000:]
  assert fused_norm.available()          # this suite's JAX has it: the kernels are what it tests
