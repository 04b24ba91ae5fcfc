"""The whole training objective against an independent NumPy implementation, the gradient routing
of `LossConfig.recon_to_encoder`, `LossConfig.flops_to_encoder` and `LossConfig.band_to_encoder`,
and dictionary recovery on planted synthetic data.

`step.objective` is checked term by term (every weight non-zero, cosine and raw codes) against a
float64 reference written from the loss definitions alone; only the SAE's parameters come from
saejax. The planted-dictionary test trains the head with `headtrain.train_head` on samples built
from known unit directions and asks that the decoder find them, which an untrained SAE does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.errors import ConfigError
from saejax.hub.state import OptimConfig
from saejax.sae import topk as topk_lib
from saejax.sae.embedder import Output, sae_output
from saejax.sae.topk import SAE, SAEConfig
from saejax.train import headtrain, step

# Objective check sizes: B queries, H hard negatives each, width D, S latents.
B, H, D, S, K, K_AUX = 4, 1, 8, 32, 4, 6
DEAD_AFTER = 100
STEP, WARMUP = 4, 10  # inside the FLOPS ramp: weight factor (4/10)^2


def loss_config(**overrides) -> step.LossConfig:
  """Every weight non-zero and distinct, so a term dropped, doubled or swapped shows up."""
  return step.LossConfig(**{
      "temperature": 0.3, "w_contrastive": 1.1, "w_fvu": 0.9, "w_multi_k": 0.35,
      "multi_k_factor": 2, "w_auxk": 0.45, "w_flops_q": 0.7, "w_flops_d": 1.3,
      "flops_warmup_steps": WARMUP, "w_spread_out": 0.6, "w_distill": 0.8,
      "distill_temperature": 0.07, "w_dense_contrastive": 0.25, **overrides})


def make_inputs(normalize_codes: bool):
  """An SAE with non-zero biases and an encoder that is not the decoder's transpose, the pooled
  embeddings of B queries and B*(1+H) documents, and a counter with some latents dead."""
  rng = np.random.default_rng(0)
  sae = SAE(SAEConfig(d_model=D, num_latents=S, k=K, k_aux=K_AUX, dead_after_tokens=DEAD_AFTER,
                      normalize_codes=normalize_codes), rngs=nnx.Rngs(0))
  sae.b_pre.set_value(jnp.asarray(0.3 * rng.standard_normal(D), jnp.float32))
  sae.b_lat.set_value(jnp.asarray(0.2 * rng.standard_normal(S), jnp.float32))
  sae.w_enc.set_value(sae.w_enc[...] + jnp.asarray(0.3 * rng.standard_normal((D, S)), jnp.float32))
  v_q = rng.standard_normal((B, D))
  # documents ordered query i's positive then its H negatives; positives lean towards their query
  v_d = rng.standard_normal((B, 1 + H, D))
  v_d[:, 0] += v_q
  v = np.concatenate([v_q, v_d.reshape(-1, D)]).astype(np.float32)
  since_fired = rng.integers(0, 2 * DEAD_AFTER, S).astype(np.int32)
  n_dead = int(np.sum(since_fired >= DEAD_AFTER))
  assert K_AUX < n_dead < S  # AuxK picks among dead latents only, and some are alive
  return sae, v, since_fired


# ----------------------------------------------------------------------------------------------
# The NumPy reference (float64), written from the definitions in the LossConfig / paper terms.


def ref_topk_relu(pre, k):
  """Dense ReLU(TopK(pre, k)) per row."""
  z = np.zeros_like(pre)
  idx = np.argsort(-pre, -1)[:, :k]
  np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0.0), -1)
  return z


def ref_unit(x):
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.where(norm > 0, x / np.where(norm > 0, norm, 1.0), 0.0)


def ref_log_softmax(logits):
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def ref_scores(q, docs):
  """Each query against the candidates [all positives; all hard negatives]."""
  candidates = np.concatenate([docs[:, 0], docs[:, 1:].reshape(-1, docs.shape[-1])])
  return q @ candidates.T


def ref_info_nce(q, docs, tau):
  log_p = ref_log_softmax(ref_scores(q, docs) / tau)
  return -np.mean(log_p[np.arange(len(q)), np.arange(len(q))])  # label: own positive


def ref_nmse(target, recon):
  return np.sum((target - recon) ** 2) / np.sum((target - target.mean(0)) ** 2)


def ref_offdiag_sq_cos(x):
  u = ref_unit(x)
  sims = u @ u.T
  n = len(x)
  return (np.sum(sims ** 2) - np.sum(np.diag(sims) ** 2)) / (n * (n - 1))


def reference_objective(sae, v, since_fired, step_, cfg: step.LossConfig):
  """Weighted terms and total of the objective for B queries then B*(1+H) documents in ``v``."""
  c = sae.config
  w_enc, b_lat = np.float64(sae.w_enc[...]), np.float64(sae.b_lat[...])
  w_dec, b_pre = np.float64(sae.w_dec[...]), np.float64(sae.b_pre[...])
  v = np.float64(v)
  pre = (v - b_pre) @ w_enc + b_lat
  z = ref_topk_relu(pre, c.k)                      # raw code: reconstruction
  v_hat = z @ w_dec + b_pre
  emb = ref_unit(z) if c.normalize_codes else z    # retrieval embedding: scores, FLOPS
  e_q, e_d = emb[:B], emb[B:].reshape(B, 1 + H, S)
  t = ref_unit(v)
  t_q, t_d = t[:B], t[B:].reshape(B, 1 + H, D)
  out = {}
  out["contrastive"] = cfg.w_contrastive * ref_info_nce(e_q, e_d, cfg.temperature)
  log_p_t = ref_log_softmax(ref_scores(t_q, t_d) / cfg.distill_temperature)
  log_p_s = ref_log_softmax(ref_scores(e_q, e_d) / cfg.temperature)
  out["distill"] = cfg.w_distill * np.mean(np.sum(np.exp(log_p_t) * (log_p_t - log_p_s), -1))
  out["dense_contrastive"] = cfg.w_dense_contrastive * ref_info_nce(t_q, t_d, cfg.temperature)
  out["fvu"] = cfg.w_fvu * ref_nmse(v, v_hat)
  z_big = ref_topk_relu(pre, c.k * cfg.multi_k_factor)
  out["multi_k"] = cfg.w_multi_k * ref_nmse(v, z_big @ w_dec + b_pre)
  dead = since_fired >= c.dead_after_tokens
  aux = ref_topk_relu(np.where(dead, pre, -np.inf), c.k_aux)
  aux = np.where(np.isfinite(aux), aux, 0.0)
  out["auxk"] = cfg.w_auxk * ref_nmse(v - v_hat, aux @ w_dec)  # no bias
  ramp = min(1.0, step_ / cfg.flops_warmup_steps) ** 2
  out["flops_q"] = cfg.w_flops_q * ramp * np.sum(np.abs(e_q).mean(0) ** 2)
  out["flops_d"] = cfg.w_flops_d * ramp * np.sum(np.abs(e_d.reshape(-1, S)).mean(0) ** 2)
  out["spread_out"] = cfg.w_spread_out * (ref_offdiag_sq_cos(e_q) + ref_offdiag_sq_cos(e_d[:, 0]))
  return sum(out.values()), out


def run_objective(sae, v, since_fired, cfg):
  q, d = sae_output(sae, v[:B]), sae_output(sae, v[B:])
  return step.objective(sae, q, d, jnp.asarray(since_fired), jnp.asarray(STEP, jnp.int32), cfg)


@pytest.mark.parametrize("normalize_codes", [True, False])
@pytest.mark.parametrize("recon_to_encoder,flops_to_encoder",
                         [(False, True), (True, True), (False, False), (True, False)])
def test_objective_matches_numpy_reference(normalize_codes, recon_to_encoder, flops_to_encoder):
  """The gradient routing switches change no value (the reference has no such switch)."""
  sae, v, since_fired = make_inputs(normalize_codes)
  cfg = loss_config(recon_to_encoder=recon_to_encoder, flops_to_encoder=flops_to_encoder)
  total, (metrics, codes, entries) = run_objective(sae, jnp.asarray(v), since_fired, cfg)
  ref_total, ref_terms = reference_objective(sae, v, since_fired, STEP, cfg)
  for name, value in ref_terms.items():
    assert value > 1e-4, name  # every term is live, so a wrong one cannot hide at 0
    np.testing.assert_allclose(metrics[f"weighted/{name}"], value, rtol=1e-4, err_msg=name)
  assert {k for k in metrics if k.startswith("weighted/")} == {f"weighted/{n}" for n in ref_terms}
  np.testing.assert_allclose(total, ref_total, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], ref_total, rtol=1e-4)
  np.testing.assert_allclose(metrics["dead_fraction"], np.mean(since_fired >= DEAD_AFTER))
  assert codes[0].shape == codes[1].shape == (B * (2 + H), K)


@pytest.mark.parametrize("normalize_codes", [True, False])
def test_boundary_band_changes_no_value_and_gives_the_next_latents_the_retrieval_gradient(
    normalize_codes):
  """`LossConfig.st_band`: every term's value is unchanged; d(contrastive)/d(pre) is zero past the
  band and on non-positive pre-activations, and on the band the derivative of the NumPy InfoNCE
  with respect to that entry of the retrieval embedding (central differences, float64), times
  1 / |code| for unit-norm codes. Raw codes: unchanged on the TopK latents. Unit-norm codes:
  scale-free, as the code alone is (no gradient along each text's own pre-activations), the TopK
  latents' gradient changed by exactly the band entries' dependence on the code's norm."""
  band = 3
  sae, v, since_fired = make_inputs(normalize_codes)
  v = jnp.asarray(v)
  plain, banded = loss_config(), loss_config(st_band=band)
  with pytest.raises(ConfigError, match="st_band=29 is more than the 28 latents"):
    run_objective(sae, v, since_fired, loss_config(st_band=S - K + 1))
  m0, m1 = (run_objective(sae, v, since_fired, c)[1][0] for c in (plain, banded))
  for name in m0:
    np.testing.assert_allclose(m1[name], m0[name], rtol=1e-6, err_msg=name)

  pre = np.asarray(sae.pre_activations(v), np.float64)

  def contrastive(pre_, cfg):
    def out(rows):
      code = topk_lib.topk_relu(pre_[rows], K)
      return Output(v[rows], pre_[rows], code, sae.decode(code.values, code.indices))
    return step.objective(sae, out(slice(0, B)), out(slice(B, None)), jnp.asarray(since_fired),
                          jnp.asarray(STEP, jnp.int32), cfg)[1][0]["weighted/contrastive"]

  g0, g1 = (np.asarray(jax.grad(contrastive)(jnp.asarray(pre, jnp.float32), c))
            for c in (plain, banded))
  z = ref_topk_relu(pre, K)
  emb = ref_unit(z) if normalize_codes else z
  order = np.argsort(-pre, -1)
  in_code = np.zeros(pre.shape, bool)
  np.put_along_axis(in_code, order[:, :K], True, -1)
  in_band = np.zeros(pre.shape, bool)
  np.put_along_axis(in_band, order[:, K:K + band], True, -1)
  in_band &= pre > 0
  assert in_band.sum() > B  # the band is live, so a missing gradient shows
  assert np.all(g1[~in_code & ~in_band] == 0) and np.all(g0[~in_code] == 0)

  def ref(e):
    return plain.w_contrastive * ref_info_nce(e[:B], e[B:].reshape(B, 1 + H, S), plain.temperature)

  norm = np.linalg.norm(z, axis=-1)
  scale = 1 / norm if normalize_codes else np.ones(len(z))
  d_entry = np.zeros_like(emb)  # d(InfoNCE) / d(retrieval-embedding entry), on the band
  for row, col in zip(*np.nonzero(in_band)):
    step_ = np.zeros_like(emb)
    step_[row, col] = 1e-6
    d_entry[row, col] = (ref(emb + step_) - ref(emb - step_)) / 2e-6
    np.testing.assert_allclose(g1[row, col], d_entry[row, col] * scale[row], rtol=2e-3, atol=1e-6)
  if normalize_codes:  # band entry pre_j / |z|: its d/dz_c is -pre_j z_c / |z|^3
    pull = np.sum(d_entry * np.where(in_band, pre, 0), -1, keepdims=True) / norm[:, None] ** 3
    np.testing.assert_allclose(g1[in_code], (g0 - pull * z)[in_code], rtol=2e-3, atol=1e-6)
    relevant = (in_code & (z > 0)) | in_band
    radial = np.sum(np.where(relevant, g1 * pre, 0), -1)
    assert np.abs(radial).max() < 1e-5 * np.abs(np.where(relevant, g1 * pre, 0)).sum(-1).max()
    assert np.abs(np.sum(np.where(in_band, g1 * pre, 0), -1)).max() > 1e-3  # the band's own part
  else:
    np.testing.assert_allclose(g1[in_code], g0[in_code], rtol=1e-5, atol=1e-7)


def test_normalize_codes_changes_exactly_the_retrieval_terms():
  """The reference itself separates the two modes: cosine moves the scored terms, not the
  reconstruction ones (so the parametrised test above distinguishes raw from normalised codes)."""
  cfg = loss_config()
  _, cos_terms = reference_objective(*make_inputs(True), STEP, cfg)
  _, raw_terms = reference_objective(*make_inputs(False), STEP, cfg)
  for name in ("contrastive", "distill", "flops_q", "flops_d"):
    assert not np.isclose(cos_terms[name], raw_terms[name], rtol=1e-2), name
  for name in ("fvu", "multi_k", "auxk", "spread_out", "dense_contrastive"):
    np.testing.assert_allclose(cos_terms[name], raw_terms[name], rtol=1e-12, err_msg=name)


def test_flops_weight_ramps_quadratically_and_saturates():
  sae, v, since_fired = make_inputs(True)
  cfg = loss_config()

  def flops_q(at_step):
    q, d = sae_output(sae, jnp.asarray(v[:B])), sae_output(sae, jnp.asarray(v[B:]))
    _, (m, *_) = step.objective(sae, q, d, jnp.asarray(since_fired), jnp.asarray(at_step), cfg)
    return float(m["weighted/flops_q"])

  full = flops_q(WARMUP)
  np.testing.assert_allclose(flops_q(WARMUP // 2), full / 4, rtol=1e-5)
  np.testing.assert_allclose(flops_q(3 * WARMUP), full, rtol=1e-6)
  assert flops_q(0) == 0.0


def grads_wrt_v(sae, v, since_fired, cfg, names):
  """{name: d metrics[name] / d v}, where v (queries then documents) feeds every term, as the
  encoder's output does end to end."""
  def terms(v_):
    metrics = run_objective(sae, v_, since_fired, cfg)[1][0]
    return jnp.stack([metrics[n] for n in names])
  jac = np.asarray(jax.jit(jax.jacrev(terms))(jnp.asarray(v)))
  return dict(zip(names, jac))


RECON_TERMS = ("weighted/fvu", "weighted/multi_k", "weighted/auxk")
FLOPS_TERMS = ("weighted/flops_q", "weighted/flops_d")
RETRIEVAL_TERMS = ("weighted/contrastive", "weighted/dense_contrastive", "weighted/spread_out")


def test_reconstruction_is_detached_from_the_encoder_by_default():
  sae, v, since_fired = make_inputs(True)
  cfg = loss_config(recon_to_encoder=False)
  grads = grads_wrt_v(sae, v, since_fired, cfg, RECON_TERMS + RETRIEVAL_TERMS)
  for name in RECON_TERMS:
    assert np.all(grads[name] == 0.0), name
  for name in RETRIEVAL_TERMS:
    assert np.abs(grads[name]).max() > 1e-4, name
  # ... while the SAE itself still learns to reconstruct
  graphdef, state = nnx.split(sae)

  def fvu_of(state_):
    sae_ = nnx.merge(graphdef, state_)
    return run_objective(sae_, jnp.asarray(v), since_fired, cfg)[1][0]["weighted/fvu"]

  sae_grads = jax.jit(jax.grad(fvu_of))(state)
  for param in ("w_enc", "w_dec", "b_lat", "b_pre"):
    assert np.abs(np.asarray(sae_grads[param].get_value())).max() > 1e-4, param


def test_recon_to_encoder_lets_reconstruction_gradients_reach_v():
  sae, v, since_fired = make_inputs(True)
  cfg = loss_config(recon_to_encoder=True)
  grads = grads_wrt_v(sae, v, since_fired, cfg, RECON_TERMS)
  for name in RECON_TERMS:
    assert np.abs(grads[name]).max() > 1e-4, name


@pytest.mark.parametrize("recon_to_encoder", [False, True])
def test_flops_to_encoder_routes_the_flops_gradients(recon_to_encoder):
  """FLOPS reaches v by default; with ``flops_to_encoder=False`` it trains the SAE alone, and the
  other terms' routing is unchanged."""
  sae, v, since_fired = make_inputs(True)
  on = grads_wrt_v(sae, v, since_fired, loss_config(recon_to_encoder=recon_to_encoder),
                   FLOPS_TERMS + RETRIEVAL_TERMS)
  cfg = loss_config(recon_to_encoder=recon_to_encoder, flops_to_encoder=False)
  off = grads_wrt_v(sae, v, since_fired, cfg, FLOPS_TERMS + RETRIEVAL_TERMS + RECON_TERMS)
  for name in FLOPS_TERMS:
    assert np.abs(on[name]).max() > 1e-4, name
    assert np.all(off[name] == 0.0), name
  for name in RETRIEVAL_TERMS:
    np.testing.assert_allclose(off[name], on[name], rtol=1e-5, atol=1e-7, err_msg=name)
  for name in RECON_TERMS:
    assert (np.abs(off[name]).max() > 1e-4) == recon_to_encoder, name
  graphdef, state = nnx.split(sae)

  def flops_of(state_):
    metrics = run_objective(nnx.merge(graphdef, state_), jnp.asarray(v), since_fired, cfg)[1][0]
    return metrics["weighted/flops_q"] + metrics["weighted/flops_d"]

  sae_grads = jax.jit(jax.grad(flops_of))(state)
  for param in ("w_enc", "b_lat", "b_pre"):
    assert np.abs(np.asarray(sae_grads[param].get_value())).max() > 1e-4, param


def test_band_to_encoder_false_keeps_the_band_in_the_sae():
  """``band_to_encoder=False``: the encoder (v) gets exactly the gradient it gets without the band,
  the SAE's parameters exactly the one they get with the band reaching the encoder too."""
  sae, v, since_fired = make_inputs(True)
  names = ("weighted/contrastive", "weighted/distill")
  configs = {"none": loss_config(), "both": loss_config(st_band=3),
             "sae": loss_config(st_band=3, band_to_encoder=False)}
  on_v = {key: grads_wrt_v(sae, v, since_fired, cfg, names) for key, cfg in configs.items()}
  graphdef, state = nnx.split(sae)

  def on_sae(cfg):
    def scored(state_):
      metrics = run_objective(nnx.merge(graphdef, state_), jnp.asarray(v), since_fired, cfg)[1][0]
      return sum(metrics[n] for n in names)
    return jax.tree.leaves(jax.jit(jax.grad(scored))(state))

  for name in names:
    assert np.abs(on_v["both"][name] - on_v["none"][name]).max() > 1e-4, name  # the band is live
    np.testing.assert_allclose(on_v["sae"][name], on_v["none"][name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  both, sae_only, none = (on_sae(configs[key]) for key in ("both", "sae", "none"))
  assert max(np.abs(np.asarray(a) - np.asarray(c)).max() for a, c in zip(both, none)) > 1e-4
  for a, b in zip(sae_only, both):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Planted dictionary: data made of known directions; a trained SAE must find them.

P_D, P_TRUE, P_K, P_S, P_N = 32, 64, 4, 64, 8192  # S = the planted count: no spare latents


def planted_data(seed=0):
  """P_N samples, each a P_K-sparse non-negative combination of P_TRUE random unit directions."""
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((P_TRUE, P_D))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  which = np.argsort(rng.random((P_N, P_TRUE)), 1)[:, :P_K]
  mags = rng.uniform(0.5, 1.5, (P_N, P_K))
  x = np.einsum("nk,nkd->nd", mags, dirs[which])
  return dirs, x.astype(np.float32)


def recovered_fraction(w_dec, dirs, threshold=0.9):
  """Fraction of true directions with some decoder row at cosine above ``threshold``."""
  cos = ref_unit(np.float64(dirs)) @ ref_unit(np.float64(w_dec)).T
  return float(np.mean(cos.max(1) > threshold))


def ref_pre(sae, x):
  return (np.float64(x) - np.float64(sae.b_pre[...])) @ np.float64(sae.w_enc[...]) + np.float64(
      sae.b_lat[...])


def never_fired_fraction(sae, x):
  """Fraction of latents in no sample's TopK code (with a positive value) over the whole data."""
  pre = ref_pre(sae, x)
  return float(np.mean(~np.any(ref_topk_relu(pre, P_K) > 0, 0)))


def reconstruction_fvu(sae, x):
  """FVU of the SAE's TopK reconstruction of every sample."""
  z = ref_topk_relu(ref_pre(sae, x), P_K)
  return ref_nmse(np.float64(x), z @ np.float64(sae.w_dec[...]) + np.float64(sae.b_pre[...]))


def test_head_training_recovers_a_planted_dictionary():
  dirs, x = planted_data()
  config = SAEConfig(d_model=P_D, num_latents=P_S, k=P_K, k_aux=32, dead_after_tokens=4096,
                     b_pre_init="mean")
  untrained = SAE(config, rngs=nnx.Rngs(1))
  assert recovered_fraction(np.asarray(untrained.w_dec[...]), dirs) < 0.1  # the test can fail

  loss_cfg = step.LossConfig(w_contrastive=0.0, w_fvu=1.0, w_auxk=1 / 32)
  steps = 1500
  optim_cfg = OptimConfig(lr_sae=1e-2, warmup_steps=50, total_steps=steps)
  # pure reconstruction: queries and documents are both the samples, contrastive weight 0
  sae, _, _ = headtrain.train_head(SAE(config, rngs=nnx.Rngs(1)), x, x, loss_cfg, optim_cfg,
                                   headtrain.HeadTrainConfig(steps=steps, batch_size=256))
  assert recovered_fraction(np.asarray(sae.w_dec[...]), dirs) >= 0.9  # 0.97-1.0 over data seeds 0-5
  assert never_fired_fraction(sae, x) <= 0.1  # 0-0.03 over the same seeds
  assert reconstruction_fvu(sae, x) < 0.1


def test_encoder_only_loss_settings_leave_a_head_on_cached_embeddings_unchanged():
  """Stage 1 trains the SAE on constant v: the dense InfoNCE on v and the switches that only route
  gradients to the encoder cannot change its head, so `saejax.train.stage1` leaves them out of the
  head's fingerprint and runs that differ only there share stage 1."""
  rng = np.random.default_rng(0)
  q = rng.standard_normal((64, 16)).astype(np.float32)
  d = (q + 0.5 * rng.standard_normal((64, 16))).astype(np.float32)
  config = SAEConfig(d_model=16, num_latents=64, k=4, k_aux=8, dead_after_tokens=32)
  optim_cfg = OptimConfig(lr_sae=1e-2, warmup_steps=2, total_steps=20)

  def trained(**loss):
    cfg = step.LossConfig(w_fvu=1.0, w_auxk=1 / 32, w_flops_q=0.1, w_flops_d=0.1, st_band=4,
                          **loss)
    sae, _, _ = headtrain.train_head(SAE(config, rngs=nnx.Rngs(1)), q, d, cfg, optim_cfg,
                                     headtrain.HeadTrainConfig(steps=20, batch_size=16))
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(sae, nnx.Param))]

  base = trained()
  for a, b in zip(base, trained(w_dense_contrastive=1.0, recon_to_encoder=True,
                                flops_to_encoder=False, band_to_encoder=False)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # a setting the head does read moves it: the comparison can fail
  assert max(np.abs(a - b).max() for a, b in zip(base, trained(temperature=0.5))) > 1e-4


# ----------------------------------------------------------------------------------------------
# The memory bank (`LossConfig.bank_size`): more negatives for both InfoNCE terms.

M = 6


def make_bank(rng):
  """M bank entries: unit sparse codes and unit v's, one of them a copy of query 1's positive
  (masked for query 1 only), one holding query 2's own text, one not yet filled."""
  dense = np.maximum(rng.standard_normal((M, S)), 0.0)
  codes = ref_unit(ref_topk_relu(dense, K))
  indices = np.argsort(-codes, -1)[:, :K]
  values = np.take_along_axis(codes, indices, -1)
  bank_v = ref_unit(rng.standard_normal((M, D)))
  bank = {"values": jnp.asarray(values, jnp.float32), "indices": jnp.asarray(indices, jnp.int32),
          "v": jnp.asarray(bank_v, jnp.float32), "valid": jnp.asarray([1, 1, 1, 1, 1, 0], jnp.int32),
          "text_hash": jnp.asarray([12, 99, 3, 98, 97, 96], jnp.int32)}
  q_hash, pos_hash = jnp.arange(1, B + 1, dtype=jnp.int32), jnp.arange(11, B + 11, dtype=jnp.int32)
  mask = np.ones((B, M), bool)
  mask[1, 0] = False  # entry 0 is query 1's positive (hash 12)
  mask[2, 2] = False  # entry 2 is query 2's own text (hash 3)
  mask[:, 5] = False  # entry 5 was never written
  return bank, (q_hash, pos_hash), codes, bank_v, mask


def ref_info_nce_bank(q, docs, bank, mask, tau):
  logits = np.concatenate([ref_scores(q, docs), np.where(mask, q @ bank.T, -np.inf)], 1) / tau
  log_p = ref_log_softmax(logits)
  return -np.mean(log_p[np.arange(len(q)), np.arange(len(q))])


@pytest.mark.parametrize("normalize_codes", [True, False])
def test_memory_bank_adds_its_entries_as_negatives(normalize_codes):
  sae, v, since_fired = make_inputs(normalize_codes)
  bank, hashes, bank_codes, bank_v, mask = make_bank(np.random.default_rng(1))
  cfg = loss_config()
  q, d = sae_output(sae, jnp.asarray(v[:B])), sae_output(sae, jnp.asarray(v[B:]))
  _, (metrics, _, entries) = step.objective(sae, q, d, jnp.asarray(since_fired),
                                            jnp.asarray(STEP), cfg, bank, hashes)
  _, no_bank = reference_objective(sae, v, since_fired, STEP, cfg)

  c = sae.config
  v64 = np.float64(v)
  pre = (v64 - np.float64(sae.b_pre[...])) @ np.float64(sae.w_enc[...]) + np.float64(sae.b_lat[...])
  z = ref_topk_relu(pre, c.k)
  emb = ref_unit(z) if normalize_codes else z
  e_q, e_d = emb[:B], emb[B:].reshape(B, 1 + H, S)
  t = ref_unit(v64)
  t_q, t_d = t[:B], t[B:].reshape(B, 1 + H, D)
  want = cfg.w_contrastive * ref_info_nce_bank(e_q, e_d, bank_codes, mask, cfg.temperature)
  want_dense = cfg.w_dense_contrastive * ref_info_nce_bank(t_q, t_d, bank_v, mask, cfg.temperature)
  np.testing.assert_allclose(metrics["weighted/contrastive"], want, rtol=1e-4)
  np.testing.assert_allclose(metrics["weighted/dense_contrastive"], want_dense, rtol=1e-4)
  assert want > no_bank["contrastive"] and want_dense > no_bank["dense_contrastive"]
  for name in ("fvu", "auxk", "flops_q", "distill"):  # the bank touches the InfoNCE terms only
    np.testing.assert_allclose(metrics[f"weighted/{name}"], no_bank[name], rtol=1e-4)

  # The bank's next entries: each query's positive, as the retrieval embedding and unit v.
  got = np.zeros((B, S))
  np.put_along_axis(got, np.asarray(entries["indices"]), np.asarray(entries["values"]), -1)
  np.testing.assert_allclose(got, e_d[:, 0], atol=1e-5)
  np.testing.assert_allclose(entries["v"], t_d[:, 0], atol=1e-5)
  np.testing.assert_array_equal(entries["text_hash"], hashes[1])
