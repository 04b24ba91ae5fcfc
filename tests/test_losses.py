"""Losses against explicit numpy/Python-loop computations on small random inputs, edge cases
(nothing dead, all-zero codes), jit, and InfoNCE on a batch sharded over 4 fake CPU devices."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax.errors import ConfigError
from saejax.errors import ShapeError
from saejax.sae import losses

REPO = Path(__file__).resolve().parents[1]


def rand(seed, *shape, sparse=False):
  x = np.random.default_rng(seed).standard_normal(shape)
  if sparse:  # non-negative with many zeros, like TopK codes
    x = np.where(x > 0.5, x, 0.0)
  return x.astype(np.float32)


def dot(a, b):
  return sum(float(x) * float(y) for x, y in zip(a, b))


def reference_info_nce(q, d_pos, d_neg, tau):
  b, h = q.shape[0], d_neg.shape[1]
  candidates = [d_pos[j] for j in range(b)] + [d_neg[j, t] for j in range(b) for t in range(h)]
  losses_, correct, pos, neg, hard = [], 0, [], [], []
  for i in range(b):
    scores = [dot(q[i], c) for c in candidates]
    logits = [s / tau for s in scores]
    top = max(logits)
    lse = top + math.log(sum(math.exp(l - top) for l in logits))
    losses_.append(lse - logits[i])
    correct += all(scores[i] > s for j, s in enumerate(scores) if j != i)
    pos.append(scores[i])
    neg += [s for j, s in enumerate(scores) if j != i]
    hard += [dot(q[i], d_neg[i, t]) for t in range(h)]
  return (np.mean(losses_), correct / b, np.mean(pos), np.mean(neg),
          np.mean(hard) if h else None)


@pytest.mark.parametrize("h", [0, 2])
def test_info_nce_matches_loops(h):
  b, s, tau = 5, 12, 0.3
  q, d_pos = rand(0, b, s, sparse=True), rand(1, b, s, sparse=True)
  d_neg = rand(2, b, h, s, sparse=True)
  d_pos[:3] += q[:3]  # a few queries should win, so accuracy is not trivially 0
  loss, metrics = losses.info_nce(jnp.asarray(q), jnp.asarray(d_pos), jnp.asarray(d_neg), tau)
  ref_loss, ref_acc, ref_pos, ref_neg, ref_hard = reference_info_nce(q, d_pos, d_neg, tau)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["info_nce"], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], ref_acc)
  assert 0 < ref_acc < 1
  np.testing.assert_allclose(metrics["pos_score"], ref_pos, rtol=1e-5)
  np.testing.assert_allclose(metrics["neg_score"], ref_neg, rtol=1e-5)
  if h:
    np.testing.assert_allclose(metrics["hard_neg_score"], ref_hard, rtol=1e-5)
  else:
    assert "hard_neg_score" not in metrics


def test_info_nce_hard_negative_of_another_query_is_a_candidate():
  q = np.eye(3, 6, dtype=np.float32)
  d_pos = np.zeros((3, 6), np.float32)
  d_neg = np.zeros((3, 1, 6), np.float32)
  d_neg[2, 0, 0] = 5.0  # query 2's hard negative matches query 0 only
  _, metrics = losses.info_nce(jnp.asarray(q), jnp.asarray(d_pos), jnp.asarray(d_neg), 1.0)
  # query 0 loses to it; queries 1 and 2 tie all-zero scores, which is not a win
  assert float(metrics["accuracy"]) == 0.0
  d_pos[1:] = q[1:] * 2
  _, metrics = losses.info_nce(jnp.asarray(q), jnp.asarray(d_pos), jnp.asarray(d_neg), 1.0)
  np.testing.assert_allclose(metrics["accuracy"], 2 / 3)


def test_info_nce_all_zero_codes_is_log_of_candidates():
  z = jnp.zeros((4, 8))
  loss, metrics = losses.info_nce(z, z, jnp.zeros((4, 2, 8)), 0.05)
  np.testing.assert_allclose(loss, math.log(12), rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.0
  grads = jax.grad(lambda a: losses.info_nce(a, z, jnp.zeros((4, 2, 8)), 0.05)[0])(z)
  # d loss / d q_i = (sum_c p_ic d_c - d_pos_i) / (B tau): zero when every candidate is zero.
  np.testing.assert_array_equal(grads, 0.0)


def test_info_nce_rejects_bad_shapes_and_temperature():
  z = jnp.zeros((4, 8))
  with pytest.raises(ShapeError, match=r"d_pos \(4, 7\)"):
    losses.info_nce(z, jnp.zeros((4, 7)), jnp.zeros((4, 0, 8)), 1.0)
  with pytest.raises(ShapeError, match="d_neg"):
    losses.info_nce(z, z, jnp.zeros((4, 8)), 1.0)
  with pytest.raises(ConfigError, match="temperature"):
    losses.info_nce(z, z, jnp.zeros((4, 0, 8)), 0.0)


def test_fvu_matches_loops():
  v, v_hat = rand(3, 6, 5), rand(4, 6, 5)
  mean = [sum(v[i, d] for i in range(6)) / 6 for d in range(5)]
  err = sum((v[i, d] - v_hat[i, d]) ** 2 for i in range(6) for d in range(5))
  var = sum((v[i, d] - mean[d]) ** 2 for i in range(6) for d in range(5))
  loss, metrics = losses.fvu(jnp.asarray(v), jnp.asarray(v_hat))
  np.testing.assert_allclose(loss, err / var, rtol=1e-5)
  np.testing.assert_allclose(metrics["fvu"], err / var, rtol=1e-5)
  mean_only = np.broadcast_to(np.mean(v, 0), v.shape)
  np.testing.assert_allclose(losses.fvu(jnp.asarray(v), jnp.asarray(mean_only))[0], 1.0, rtol=1e-5)
  np.testing.assert_allclose(losses.fvu(jnp.asarray(v) * 7, jnp.asarray(v_hat) * 7)[0], err / var,
                             rtol=1e-5)  # scale-invariant
  with pytest.raises(ShapeError):
    losses.fvu(jnp.asarray(v), jnp.asarray(v_hat[:, :4]))
  with pytest.raises(ShapeError, match="at least 2"):
    losses.fvu(jnp.asarray(v[:1]), jnp.asarray(v_hat[:1]))


def test_fvu_constant_batch_and_zero_codes_give_no_nan():
  v = jnp.ones((4, 3))
  loss, _ = losses.fvu(v, v)
  assert float(loss) == 0.0
  grad = jax.grad(lambda x: losses.fvu(x, jnp.zeros((4, 3)))[0])(v)
  assert np.all(np.isfinite(grad))


def test_multi_k_fvu_weights_each_k():
  v, r4, r16 = rand(5, 6, 5), rand(6, 6, 5), rand(7, 6, 5)
  loss, metrics = losses.multi_k_fvu(jnp.asarray(v), {4: jnp.asarray(r4), 16: jnp.asarray(r16)},
                                     {4: 1.0, 16: 0.125})
  f4 = float(losses.fvu(jnp.asarray(v), jnp.asarray(r4))[0])
  f16 = float(losses.fvu(jnp.asarray(v), jnp.asarray(r16))[0])
  np.testing.assert_allclose(loss, f4 + f16 / 8, rtol=1e-6)
  np.testing.assert_allclose([metrics["fvu_k4"], metrics["fvu_k16"]], [f4, f16], rtol=1e-6)
  with pytest.raises(ConfigError, match=r"k=\[4\]"):
    losses.multi_k_fvu(jnp.asarray(v), {4: jnp.asarray(r4)}, {8: 1.0})


def test_auxk_loss_matches_loops_and_detaches_residual():
  res, aux = rand(8, 5, 4), rand(9, 5, 4)
  mean = [sum(res[i, d] for i in range(5)) / 5 for d in range(4)]
  err = sum((aux[i, d] - res[i, d]) ** 2 for i in range(5) for d in range(4))
  var = sum((res[i, d] - mean[d]) ** 2 for i in range(5) for d in range(4))
  is_dead = jnp.asarray([False, True, False, False, True, False])
  loss, metrics = losses.auxk_loss(jnp.asarray(res), jnp.asarray(aux), is_dead)
  np.testing.assert_allclose(loss, err / var, rtol=1e-5)
  np.testing.assert_allclose(metrics["dead_fraction"], 2 / 6)
  g_res, g_aux = jax.grad(lambda r, a: losses.auxk_loss(r, a, is_dead)[0], argnums=(0, 1))(
      jnp.asarray(res), jnp.asarray(aux))
  assert not np.any(np.asarray(g_res)) and np.any(np.asarray(g_aux))


def test_auxk_loss_is_zero_without_dead_latents():
  res = jnp.asarray(rand(10, 5, 4))
  for residual in (res, jnp.zeros((5, 4))):  # also a residual without variance
    loss, metrics = losses.auxk_loss(residual, jnp.zeros((5, 4)), jnp.zeros(6, bool))
    assert float(loss) == 0.0 and float(metrics["dead_fraction"]) == 0.0
    grad = jax.grad(lambda a, r=residual: losses.auxk_loss(r, a, jnp.zeros(6, bool))[0])(
        jnp.zeros((5, 4)))
    assert np.all(np.isfinite(grad)) and not np.any(np.asarray(grad))
  dead_but_flat, _ = losses.auxk_loss(jnp.zeros((5, 4)), jnp.zeros((5, 4)), jnp.ones(6, bool))
  assert float(dead_but_flat) == 0.0  # nothing left to explain: 0 / (0 + eps), not NaN


def test_flops_matches_loops():
  z = rand(11, 6, 9, sparse=True) * np.sign(rand(12, 6, 9))  # mixed signs: |z| matters
  ref = sum((sum(abs(z[i, j]) for i in range(6)) / 6) ** 2 for j in range(9))
  loss, metrics = losses.flops(jnp.asarray(z))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(metrics["l0"], np.count_nonzero(z) / 6)
  zero_loss, _ = losses.flops(jnp.zeros((3, 4)))
  assert float(zero_loss) == 0.0
  # d/dz_ij = 2 mean_i|z_ij| sign(z_ij) / B: zero at zero (not NaN from |z|).
  np.testing.assert_array_equal(jax.grad(lambda x: losses.flops(x)[0])(jnp.zeros((3, 4))), 0.0)


def test_flops_weight_quadratic_ramp():
  for step, expect in [(0, 0.0), (25, 0.5 * 0.25 ** 2), (50, 0.5 * 0.25), (100, 0.5), (400, 0.5)]:
    np.testing.assert_allclose(losses.flops_weight(step, 0.5, 100), expect, rtol=1e-6)
  np.testing.assert_allclose(losses.flops_weight(0, 0.5, 0), 0.5)
  ramp = jax.jit(losses.flops_weight, static_argnums=(1, 2))
  np.testing.assert_allclose(ramp(jnp.asarray(50), 2.0, 100), 0.5)


def reference_second_moment(x):
  b = x.shape[0]
  unit = [row / max(np.linalg.norm(row), 1e-6) for row in x.astype(np.float64)]
  pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
  return sum(dot(unit[i], unit[j]) ** 2 for i, j in pairs) / len(pairs)


def test_spread_out_matches_loops():
  q, d = rand(13, 5, 7), rand(14, 5, 7, sparse=True)
  d[0] = 0.0  # an all-zero code: counts as a zero vector, no NaN
  loss, metrics = losses.spread_out(jnp.asarray(q), jnp.asarray(d))
  mq, md = reference_second_moment(q), reference_second_moment(d)
  np.testing.assert_allclose([metrics["spread_out_q"], metrics["spread_out_d"]], [mq, md],
                             rtol=1e-5)
  np.testing.assert_allclose(loss, mq + md, rtol=1e-5)
  disjoint = jnp.eye(4, 8)
  np.testing.assert_allclose(losses.spread_out(disjoint, disjoint)[0], 0.0, atol=1e-7)
  z = jnp.zeros((4, 8))
  assert float(losses.spread_out(z, z)[0]) == 0.0
  # Squared cosines are quartic in a zero row (its norm is floored by eps): gradient 0, not NaN.
  np.testing.assert_array_equal(jax.grad(lambda a: losses.spread_out(a, a)[0])(z), 0.0)
  with pytest.raises(ShapeError, match="B >= 2"):
    losses.spread_out(z[:1], z[:1])


def test_losses_jit():
  q, d_pos, d_neg = (jnp.asarray(rand(i, *shape, sparse=True))
                     for i, shape in enumerate([(4, 8), (4, 8), (4, 1, 8)]))
  eager = losses.info_nce(q, d_pos, d_neg, 0.1)[0]
  np.testing.assert_allclose(jax.jit(losses.info_nce, static_argnums=3)(q, d_pos, d_neg, 0.1)[0],
                             eager, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.info_nce)(q, d_pos, d_neg, jnp.float32(0.1))[0], eager,
                             rtol=1e-6)  # a traced (e.g. learned) temperature works too
  for fn, args in [(losses.fvu, (q, d_pos)), (losses.flops, (q,)), (losses.spread_out, (q, d_pos)),
                   (losses.auxk_loss, (q, d_pos, jnp.ones(3, bool)))]:
    np.testing.assert_allclose(jax.jit(fn)(*args)[0], fn(*args)[0], rtol=1e-6)
  multi = jax.jit(lambda v, a, b: losses.multi_k_fvu(v, {2: a, 8: b}, {2: 1.0, 8: 0.125})[0])
  np.testing.assert_allclose(multi(q, d_pos, q * 0.5),
                             losses.multi_k_fvu(q, {2: d_pos, 8: q * 0.5}, {2: 1.0, 8: 0.125})[0],
                             rtol=1e-6)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from saejax.sae import losses
    rng = np.random.default_rng(0)
    q, d_pos = (np.maximum(rng.standard_normal((8, 16)), 0).astype(np.float32) for _ in range(2))
    d_neg = np.maximum(rng.standard_normal((8, 2, 16)), 0).astype(np.float32)
    ref = losses.info_nce(q, d_pos, d_neg, 0.2)[1]
    fn = jax.jit(lambda a, b, c: losses.info_nce(a, b, c, 0.2))
    for axis_type in (AxisType.Explicit, AxisType.Auto):  # Explicit is make_mesh's default
      mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
      put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
      assert len(put(q).sharding.device_set) == 4
      with jax.set_mesh(mesh):
        sharded = fn(put(q), put(d_pos), put(d_neg))[1]
      for key in ref:
        np.testing.assert_allclose(sharded[key], ref[key], rtol=1e-5, err_msg=f"{axis_type} {key}")
    print("OK")
""")


def test_info_nce_on_batch_sharded_arrays_uses_global_batch():
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
