"""TopK SAE head: config checks, init invariants, encode/decode against explicit numpy loops,
decoder-norm invariants, dead-latent bookkeeping, AuxK selection, b_pre init, jit."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from flax import nnx

from saejax.errors import ConfigError
from saejax.errors import ShapeError
from saejax.sae import topk as sae_lib
from saejax.sae.topk import SAE, SAEConfig

D, S, K = 8, 32, 4
REPO = Path(__file__).resolve().parents[1]


def make_sae(seed=0, **overrides):
  cfg = SAEConfig(**{"d_model": D, "num_latents": S, "k": K, "k_aux": 6, "dead_after_tokens": 10,
                     **overrides})
  return SAE(cfg, rngs=nnx.Rngs(seed))


def randn(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("field,kwargs", [
    ("SAEConfig.k", {"k": S + 1}),
    ("SAEConfig.k_aux", {"k_aux": S + 1}),
    ("SAEConfig.k", {"k": 0}),
    ("SAEConfig.dead_after_tokens", {"dead_after_tokens": 0}),
    ("SAEConfig.d_model", {"d_model": 0}),
    ("SAEConfig.b_pre_init", {"b_pre_init": "median"}),
])
def test_config_rejects_bad_fields_by_name(field, kwargs):
  base = {"d_model": D, "num_latents": S, "k": K, "k_aux": 6}
  with pytest.raises(ConfigError, match=field):
    SAEConfig(**{**base, **kwargs})


def test_defaults_match_csr():
  """What saejax shares with CSR as sentence-transformers implements it, read from the installed
  library: AuxK over the k_aux = 512 top dead latents, the contrastive term at weight gamma = 1, and
  the same head (zero-initialised biases, no input normalisation, ReLU(TopK(W_enc (v - b_pre) +
  b_lat)), tied decoder at init, v_hat = z W_dec + b_pre). Departures are deliberate and documented
  in SAEConfig / LossConfig: S and k (the module's 512 and 8 are toy sizes), cosine codes at tau
  0.05 (CSR's loss: raw dot products at scale 1), the AuxK weight (Gao et al. 1/32, CSR 0.1), the
  dead-latent window (texts, not steps) and b_pre from data."""
  import inspect
  import torch
  pytest.importorskip("sentence_transformers")
  from sentence_transformers.sparse_encoder.losses import CSRLoss
  from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder
  from saejax.train.step import LossConfig

  def default(cls, name):
    return inspect.signature(cls.__init__).parameters[name].default

  assert SAEConfig(d_model=768).k_aux == default(SparseAutoEncoder, "k_aux")
  assert LossConfig().w_contrastive == default(CSRLoss, "gamma")
  csr, ours = SparseAutoEncoder(input_dim=D, hidden_dim=S, k=K), make_sae()
  for theirs, mine in ((csr.pre_bias, ours.b_pre), (csr.latent_bias, ours.b_lat)):
    assert theirs.shape == mine.shape and not theirs.any() and not np.any(np.asarray(mine[...]))
  # The same head: CSR's module holding saejax's (tied, as initialised) weights and random biases.
  ours.b_lat[...], ours.b_pre[...] = jnp.asarray(randn(1, S)), jnp.asarray(randn(2, D))
  with torch.no_grad():
    csr.encoder.weight.copy_(torch.tensor(np.asarray(ours.w_enc[...]).T))
    csr.latent_bias.copy_(torch.tensor(np.asarray(ours.b_lat[...])))
    csr.pre_bias.copy_(torch.tensor(np.asarray(ours.b_pre[...])))
  v = randn(3, 5, D)
  with torch.inference_mode():
    z_csr = csr({"sentence_embedding": torch.from_numpy(v)})["sentence_embedding"]
    v_hat_csr = csr.decode(z_csr).numpy()
  code, v_hat = ours(jnp.asarray(v))
  np.testing.assert_allclose(np.asarray(sae_lib.densify(code.values, code.indices, S)),
                             z_csr.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(v_hat), v_hat_csr, rtol=1e-5, atol=1e-5)


def test_init_openai_style_with_axes():
  model = make_sae()
  w_dec, w_enc = np.asarray(model.w_dec[...]), np.asarray(model.w_enc[...])
  assert w_dec.shape == (S, D) and w_enc.shape == (D, S)
  np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(w_enc, w_dec.T)
  assert not np.any(np.asarray(model.b_lat[...])) and not np.any(np.asarray(model.b_pre[...]))
  axes = {name: p.get_metadata()["axes"] for name, p in nnx.state(model, nnx.Param).items()}
  assert axes == {"w_enc": ("embed", "latent"), "b_lat": ("latent",),
                  "w_dec": ("latent", "embed"), "b_pre": (None,)}
  assert not np.allclose(w_dec, np.asarray(make_sae(seed=1).w_dec[...]))


def randomize(model, seed=1):
  """Give every parameter a generic value so the tests do not lean on the init."""
  model.w_enc[...] = jnp.asarray(randn(seed, D, S))
  model.b_lat[...] = jnp.asarray(randn(seed + 1, S))
  model.b_pre[...] = jnp.asarray(randn(seed + 2, D))
  return model


def test_encode_matches_numpy_topk_relu():
  model = randomize(make_sae())
  v = randn(5, 3, 2, D)  # any leading shape
  code = model.encode(jnp.asarray(v))
  w_enc, b_lat, b_pre = (np.asarray(p[...]) for p in (model.w_enc, model.b_lat, model.b_pre))
  assert code.values.shape == code.indices.shape == (3, 2, K)
  assert code.indices.dtype == jnp.int32 and code.pre.shape == (3, 2, S)
  for i in range(3):
    for j in range(2):
      pre = [sum((v[i, j, d] - b_pre[d]) * w_enc[d, s] for d in range(D)) + b_lat[s]
             for s in range(S)]
      np.testing.assert_allclose(code.pre[i, j], pre, rtol=1e-5, atol=1e-5)
      top = sorted(range(S), key=lambda s: -pre[s])[:K]
      assert sorted(np.asarray(code.indices[i, j]).tolist()) == sorted(top)
      np.testing.assert_allclose(code.values[i, j], [max(pre[s], 0.0) for s in top], rtol=1e-5,
                                 atol=1e-5)


def test_negative_pre_activations_give_zeros_but_k_indices():
  z_pre = jnp.asarray(np.array([[-3.0, 2.0, -1.0, 0.5, -0.2, -7.0]], np.float32))
  code = sae_lib.topk_relu(z_pre, 4)
  assert code.indices.shape == (1, 4) and len(set(np.asarray(code.indices[0]).tolist())) == 4
  np.testing.assert_allclose(code.values, [[2.0, 0.5, 0.0, 0.0]])
  all_negative = sae_lib.topk_relu(-jnp.abs(z_pre) - 1.0, 3)
  assert not np.any(np.asarray(all_negative.values))


def test_k_may_differ_at_inference_and_is_checked():
  model = randomize(make_sae())
  v = jnp.asarray(randn(2, 4, D))
  small, large = model.encode(v, 2), model.encode(v, 10)
  assert small.values.shape == (4, 2) and large.values.shape == (4, 10)
  np.testing.assert_array_equal(small.indices, large.indices[:, :2])
  with pytest.raises(ConfigError, match="k=33"):
    model.encode(v, S + 1)
  with pytest.raises(ShapeError, match="d_model=8"):
    model.encode(jnp.zeros((4, D + 1)))


def test_densify_and_decode_match_dense_matmul():
  model = randomize(make_sae())
  code = model.encode(jnp.asarray(randn(3, 5, D)))
  dense = np.asarray(sae_lib.densify(code.values, code.indices, S))
  for b in range(5):
    expect = np.zeros(S, np.float32)
    for val, idx in zip(np.asarray(code.values[b]), np.asarray(code.indices[b])):
      expect[idx] = val
    np.testing.assert_array_equal(dense[b], expect)
  w_dec, b_pre = np.asarray(model.w_dec[...]), np.asarray(model.b_pre[...])
  np.testing.assert_allclose(model.decode(code.values, code.indices), dense @ w_dec + b_pre,
                             rtol=1e-5, atol=1e-5)
  _, v_hat = model(jnp.asarray(randn(3, 5, D)))
  np.testing.assert_allclose(v_hat, model.decode(code.values, code.indices), rtol=1e-6)


def test_sparse_decode_gradient_matches_dense():
  values, indices = jnp.asarray(np.abs(randn(1, 3, K))), jnp.asarray([[0, 5, 9, 2], [5, 1, 7, 30],
                                                                        [3, 4, 6, 8]], jnp.int32)
  w_dec, target = jnp.asarray(randn(2, S, D)), jnp.asarray(randn(3, 3, D))
  sparse = lambda w: jnp.sum((sae_lib.decode_sparse(values, indices, w) - target) ** 2)
  dense = lambda w: jnp.sum((sae_lib.densify(values, indices, S) @ w - target) ** 2)
  np.testing.assert_allclose(jax.grad(sparse)(w_dec), jax.grad(dense)(w_dec), rtol=1e-5, atol=1e-5)


def test_normalize_decoder_gives_unit_rows():
  w = jnp.asarray(randn(0, S, D) * 5.0)
  np.testing.assert_allclose(np.linalg.norm(sae_lib.normalize_decoder(w), axis=1), 1.0, rtol=1e-6)
  zero_row = sae_lib.normalize_decoder(jnp.zeros((2, D)))
  assert np.all(np.isfinite(zero_row)) and not np.any(np.asarray(zero_row))


def test_projected_gradient_is_orthogonal_and_sgd_keeps_unit_norm():
  w = sae_lib.normalize_decoder(jnp.asarray(randn(0, S, D)))
  g = jnp.asarray(randn(1, S, D))
  g_proj = np.asarray(sae_lib.project_out_parallel_grad(w, g))
  w_np, g_np = np.asarray(w), np.asarray(g)
  for s in range(S):
    assert abs(float(np.dot(g_proj[s], w_np[s]))) < 1e-5
    # what was removed is exactly a multiple of the row
    np.testing.assert_allclose(g_np[s] - g_proj[s], np.dot(g_np[s], w_np[s]) * w_np[s], atol=1e-5)
  parallel = sae_lib.project_out_parallel_grad(w, 3.0 * w)
  np.testing.assert_allclose(parallel, 0.0, atol=1e-6)
  stepped = w - 0.01 * g_proj
  # orthogonal step: the norm moves only to second order, sqrt(1 + lr^2 |g|^2)
  np.testing.assert_allclose(np.linalg.norm(stepped, axis=1),
                             np.sqrt(1 + 1e-4 * np.sum(g_proj ** 2, axis=1)), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(sae_lib.normalize_decoder(stepped), axis=1), 1.0,
                             rtol=1e-6)
  with pytest.raises(ShapeError):
    sae_lib.project_out_parallel_grad(w, g[:, :-1])


def test_fired_counter_and_dead_mask():
  indices = jnp.asarray([[0, 3, 5], [3, 7, 9]], jnp.int32)
  values = jnp.asarray([[1.0, 0.5, 0.0], [2.0, 0.0, 0.1]])
  has_fired = np.asarray(sae_lib.fired(indices, values, 12))
  expect = np.zeros(12, bool)
  for row_i, row_v in zip(np.asarray(indices), np.asarray(values)):
    for i, val in zip(row_i, row_v):
      expect[i] |= val > 0
  np.testing.assert_array_equal(has_fired, expect)  # 5 and 7 were selected with value 0: not fired
  counter = jnp.asarray([4, 0, 9, 100, 3, 8, 8, 2, 1, 0, 7, 6], jnp.int32)
  new = np.asarray(sae_lib.update_since_fired(counter, jnp.asarray(has_fired), 3))
  np.testing.assert_array_equal(new, [0 if f else c + 3
                                      for c, f in zip(np.asarray(counter), expect)])
  np.testing.assert_array_equal(sae_lib.dead_mask(jnp.asarray(new), 10),
                                [c >= 10 for c in new])
  top = jnp.iinfo(jnp.int32).max
  saturated = sae_lib.update_since_fired(jnp.asarray([top - 1, top], jnp.int32),
                                         jnp.zeros(2, bool), 5)
  np.testing.assert_array_equal(saturated, [top, top])


def test_auxk_selects_only_dead_latents():
  z_pre = randn(3, 6, S) * 3.0
  is_dead = np.zeros(S, bool)
  is_dead[[1, 4, 8, 15, 16, 23, 29, 31, 2, 11]] = True
  values, indices = sae_lib.auxk(jnp.asarray(z_pre), jnp.asarray(is_dead), 5)
  for b in range(6):
    dead_ids = [s for s in range(S) if is_dead[s]]
    best = sorted(dead_ids, key=lambda s: -z_pre[b, s])[:5]
    assert sorted(np.asarray(indices[b]).tolist()) == sorted(best)
    np.testing.assert_allclose(values[b], [max(z_pre[b, s], 0.0) for s in best], rtol=1e-6)
  assert np.all(is_dead[np.asarray(indices)[np.asarray(values) > 0]])


def test_auxk_with_fewer_dead_than_k_aux_contributes_nothing_from_live():
  z_pre = jnp.asarray(np.abs(randn(4, 3, S)) + 0.1)  # every latent positive
  is_dead = jnp.zeros(S, bool).at[jnp.asarray([2, 9])].set(True)
  w_dec = jnp.asarray(randn(5, S, D))
  values, indices = sae_lib.auxk(z_pre, is_dead, 6)
  assert values.shape == (3, 6)
  for b in range(3):
    live_slots = ~np.asarray(is_dead)[np.asarray(indices[b])]
    assert live_slots.sum() == 4 and not np.any(np.asarray(values[b])[live_slots])
  only_dead = np.asarray(z_pre)[:, [2, 9]] @ np.asarray(w_dec)[[2, 9]]
  np.testing.assert_allclose(sae_lib.decode_sparse(values, indices, w_dec), only_dead, rtol=1e-5)

  def aux_energy(z):
    return jnp.sum(sae_lib.decode_sparse(*sae_lib.auxk(z, is_dead, 6), w_dec) ** 2)

  grad = np.asarray(jax.grad(aux_energy)(z_pre))
  assert np.all(np.isfinite(grad)) and not np.any(grad[:, ~np.asarray(is_dead)])
  none_dead = sae_lib.auxk(z_pre, jnp.zeros(S, bool), 6)[0]
  assert not np.any(np.asarray(none_dead))
  assert np.all(np.isfinite(jax.grad(lambda z: jnp.sum(sae_lib.auxk(z, jnp.zeros(S, bool), 6)[0]))(
      z_pre)))
  with pytest.raises(ShapeError):
    sae_lib.auxk(z_pre, jnp.zeros(S - 1, bool), 6)


def test_geometric_median_matches_scipy():
  points = randn(7, 25, 3) + np.array([5.0, -2.0, 0.0], np.float32)
  points[:3] += 40.0  # outliers drag the mean, barely the median
  gm = np.asarray(sae_lib.init_b_pre(jnp.asarray(points), "geometric_median", num_iters=300))
  objective = lambda y: np.sum(np.linalg.norm(points.astype(np.float64) - y, axis=1))
  ref = scipy.optimize.minimize(objective, points.mean(0), method="Nelder-Mead",
                                options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000}).x
  np.testing.assert_allclose(gm, ref, atol=1e-3)
  assert objective(gm) <= objective(ref) + 1e-4
  assert np.linalg.norm(points.mean(0) - ref) > 1.0
  np.testing.assert_allclose(sae_lib.init_b_pre(jnp.asarray(points), "mean"), points.mean(0),
                             rtol=1e-6)
  on_a_point = sae_lib.geometric_median(jnp.asarray([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
  np.testing.assert_allclose(on_a_point, [0.0, 0.0], atol=1e-6)  # eps guard: no NaN on a data point
  with pytest.raises(ShapeError, match=r"\[N, D\]"):
    sae_lib.init_b_pre(jnp.zeros((2, 3, 4)), "mean")
  with pytest.raises(ConfigError):
    sae_lib.init_b_pre(jnp.zeros((2, 3)), "median")


def test_everything_jits():
  model = randomize(make_sae())
  v = jnp.asarray(randn(2, 5, D))

  @nnx.jit(static_argnums=2)
  def forward(m, x, k):
    return m(x, k)

  code, v_hat = forward(model, v, 3)
  eager_code, eager_hat = model(v, 3)
  np.testing.assert_allclose(v_hat, eager_hat, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(code.indices, eager_code.indices)
  dense = jax.jit(sae_lib.densify, static_argnums=2)(code.values, code.indices, S)
  assert dense.shape == (5, S)
  is_dead = jnp.arange(S) % 2 == 0
  aux_v, aux_i = jax.jit(sae_lib.auxk, static_argnums=2)(code.pre, is_dead, 4)
  assert np.all(np.asarray(is_dead)[np.asarray(aux_i)])
  has_fired = jax.jit(sae_lib.fired, static_argnums=2)(code.indices, code.values, S)
  counter = jax.jit(sae_lib.update_since_fired)(jnp.zeros(S, jnp.int32), has_fired, 5)
  assert jax.jit(sae_lib.dead_mask, static_argnums=1)(counter, 5).sum() == S - has_fired.sum()
  w = jax.jit(sae_lib.normalize_decoder)(model.w_dec[...] * 2)
  g = jax.jit(sae_lib.project_out_parallel_grad)(w, jnp.ones_like(w))
  # What is left of an all-ones gradient is orthogonal to each (unit) decoder row.
  ones = np.ones(D, np.float32)
  np.testing.assert_allclose(g, ones - np.sum(np.asarray(w), 1, keepdims=True) * np.asarray(w),
                             atol=1e-5)
  b = jax.jit(sae_lib.init_b_pre, static_argnums=(1, 2))(v, "geometric_median", 10)
  np.testing.assert_allclose(b, sae_lib.init_b_pre(v, "geometric_median", 10), rtol=1e-5,
                             atol=1e-6)


def test_all_zero_codes_reconstruct_b_pre_without_nan():
  model = randomize(make_sae())
  model.b_lat[...] = jnp.full((S,), -1e3)
  v = jnp.asarray(randn(8, 4, D))
  code, v_hat = model(v)
  assert not np.any(np.asarray(code.values))
  np.testing.assert_allclose(v_hat, np.broadcast_to(np.asarray(model.b_pre[...]), (4, D)))

  def loss(m):
    _, recon = m(v)
    return jnp.sum((recon - v) ** 2)

  grads = nnx.grad(loss)(model)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from saejax.sae import losses, topk as sae_lib

    D, S, K, B = 8, 32, 4, 8
    cfg = sae_lib.SAEConfig(d_model=D, num_latents=S, k=K, k_aux=6)
    rng = np.random.default_rng(0)
    vq, vd, vn = (rng.standard_normal(s).astype(np.float32) for s in [(B, D), (B, D), (B, 2, D)])
    counter = np.arange(S, dtype=np.int32) * 3

    def make():
      model = sae_lib.SAE(cfg, rngs=nnx.Rngs(0))
      model.b_lat[...] = jnp.asarray(np.random.default_rng(1).standard_normal(S), jnp.float32)
      return model

    def step(model, vq, vd, vn, counter):
      def loss_fn(m):
        (cq, hq), (cd, _), (cn, _) = m(vq), m(vd), m(vn)
        dq, dd, dn = (sae_lib.densify(c.values, c.indices, S) for c in (cq, cd, cn))
        dead = sae_lib.dead_mask(counter, 40)
        aux = sae_lib.decode_sparse(*sae_lib.auxk(cq.pre, dead, 6), m.w_dec[...])
        wide = sae_lib.topk_relu(cq.pre, 2 * K)
        parts = [losses.info_nce(dq, dd, dn, 0.1), losses.fvu(vq, hq),
                 losses.auxk_loss(vq - hq, aux, dead), losses.flops(dq), losses.spread_out(dq, dd),
                 losses.multi_k_fvu(vq, {K: hq, 2 * K: m.decode(wide.values, wide.indices)},
                                    {K: 1.0, 2 * K: 0.125})]
        metrics = {key: val for _, part in parts for key, val in part.items()}
        return sum(loss for loss, _ in parts), (sae_lib.fired(cq.indices, cq.values, S), metrics)

      (loss, (fired, metrics)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      g_dec = sae_lib.project_out_parallel_grad(model.w_dec[...], grads["w_dec"][...])
      new_counter = sae_lib.update_since_fired(counter, fired, B)
      return loss, metrics, g_dec, grads["w_enc"][...], new_counter

    ref = nnx.jit(step)(make(), vq, vd, vn, counter)
    for axis_type, latent_axis in [(AxisType.Explicit, None), (AxisType.Explicit, "model"),
                                   (AxisType.Auto, "model")]:
      mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
      put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
      with jax.set_mesh(mesh):
        model = make()
        state = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(
            lambda p: p.replace(put(p[...], *[latent_axis if a == "latent" else None
                                               for a in p.get_metadata()["axes"]])),
            state, is_leaf=lambda x: isinstance(x, nnx.Param)))
        assert model.w_dec[...].sharding.spec[0] == latent_axis
        out = nnx.jit(step)(model, put(vq, "data"), put(vd, "data"), put(vn, "data"),
                            put(counter, latent_axis))
      for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5,
                                   err_msg=f"{axis_type} latent->{latent_axis}")
    print("OK")
""")


def test_train_step_shaped_function_matches_on_sharded_mesh():
  """Encode, decode, AuxK, dead counters and every loss, with gradients, on a 2x2 (data, model)
  mesh of fake CPU devices (Explicit axes with latents replicated or sharded over "model", Auto
  axes with latents sharded): the same numbers as on one device."""
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]
