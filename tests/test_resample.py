"""Dead-latent resampling (`saejax.train.resample`) against a hand-built case checked in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saejax.hub.state import OptimConfig, init_state, make_optimizer
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder
from saejax.train import headtrain
from saejax.train import resample as resample_lib
from saejax.train import step as step_lib

D, S, K = 8, 16, 2


def _state_after_steps(seed=0):
  """A TrainState whose Adam moments are non-zero everywhere (a few steps of head training)."""
  rng = np.random.default_rng(seed)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=D, num_latents=S, k=K, k_aux=4), rngs=nnx.Rngs(seed))
  model = Embedder(None, sae)
  graphdef, params = nnx.split(model, nnx.Param)
  optim = OptimConfig(lr_sae=1e-2, warmup_steps=0, total_steps=10, freeze_encoder=True)
  tx = make_optimizer(optim, params)
  state = init_state(model, tx)
  step = jax.jit(lambda st, b: step_lib.train_step(
      st, b, graphdef=graphdef, tx=tx, loss_cfg=step_lib.LossConfig(), optim_cfg=optim,
      loss_fn=headtrain.head_loss))
  for _ in range(3):
    q = rng.normal(size=(16, D)).astype(np.float32)
    state, _ = step(state, {"q_v": q, "d_v": (q + 0.1 * rng.normal(size=q.shape))[:, None]})
  return state, graphdef


def _leaf(tree, name, moment=None):
  """The array of SAE parameter `name` in params, or in the optimiser's `moment` ("mu"/"nu")."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = jax.tree_util.keystr(path)
    if f"['sae']['{name}']" in keys and (moment is None or f".{moment}[" in keys):
      return np.asarray(leaf)
  raise KeyError(name)


def test_dead_latents_take_the_worst_reconstructed_input_and_lose_their_moments():
  state, graphdef = _state_after_steps()
  sae = nnx.merge(graphdef, state.params).sae
  b_pre = np.asarray(sae.b_pre[...])
  # Inputs equal to b_pre with the latent biases zeroed code to nothing and reconstruct exactly
  # (error 0): only the one planted far input can be drawn.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "b_lat" in jax.tree_util.keystr(p) else x, state.params)
  state = state.replace(params=params)
  far = b_pre + 5.0 * np.eye(D, dtype=np.float32)[3] + 2.0 * np.eye(D, dtype=np.float32)[5]
  v = np.tile(b_pre, (32, 1)).astype(np.float32)
  v[17] = far
  dead = np.zeros(S, bool)
  dead[[1, 4, 9]] = True
  since = np.arange(S, dtype=np.int32) * 7
  state = state.replace(since_fired=jnp.asarray(since))

  new, metrics = resample_lib.resample_dead(state, graphdef, jnp.asarray(v), jnp.asarray(dead),
                                            jax.random.key(0))

  u = (far - b_pre) / np.linalg.norm(far - b_pre)
  old_enc, new_enc = _leaf(state.params, "w_enc"), _leaf(new.params, "w_enc")
  live_norm = np.linalg.norm(old_enc, axis=0)[~dead].mean()
  np.testing.assert_allclose(_leaf(new.params, "w_dec")[dead], np.tile(u, (3, 1)), atol=1e-6)
  np.testing.assert_allclose(new_enc[:, dead], np.tile(u[:, None], (1, 3)) * live_norm,
                             atol=1e-6)
  np.testing.assert_array_equal(_leaf(new.params, "b_lat")[dead], 0.0)
  for name in ("w_dec", "w_enc", "b_lat"):
    axis = resample_lib.LATENT_AXIS[name]
    live = np.take(_leaf(new.params, name), np.flatnonzero(~dead), axis=axis)
    np.testing.assert_array_equal(live, np.take(_leaf(state.params, name), np.flatnonzero(~dead),
                                                axis=axis))
    for moment in ("mu", "nu"):
      before, after = _leaf(state.opt_state, name, moment), _leaf(new.opt_state, name, moment)
      assert np.abs(np.take(before, np.flatnonzero(dead), axis=axis)).sum() > 0  # had moments
      np.testing.assert_array_equal(np.take(after, np.flatnonzero(dead), axis=axis), 0.0)
      np.testing.assert_array_equal(np.take(after, np.flatnonzero(~dead), axis=axis),
                                    np.take(before, np.flatnonzero(~dead), axis=axis))
  np.testing.assert_array_equal(_leaf(new.params, "b_pre"), b_pre)
  np.testing.assert_array_equal(np.asarray(new.since_fired), np.where(dead, 0, since))
  assert int(metrics["resampled"]) == 3
  # The far input's error, by a NumPy TopK SAE forward (b_lat is 0): the others' is 0.
  pre = (far - b_pre) @ old_enc
  top = np.argsort(-pre)[:K]
  far_hat = np.maximum(pre[top], 0) @ _leaf(state.params, "w_dec")[top] + b_pre
  np.testing.assert_allclose(float(metrics["resample_mse"]), np.sum((far - far_hat) ** 2) / 32,
                             rtol=1e-4)


def test_resampling_revives_latents_that_head_training_leaves_dead():
  """Planted: the data lives in the first half of the dimensions and 56 of the 64 latents point
  into the other half, so they never win a TopK and (AuxK off) get no gradient. Resampling must
  give them directions where the data is and make them fire."""
  rng = np.random.default_rng(0)
  half = D // 2
  centres = np.zeros((32, D), np.float32)
  centres[:, :half] = rng.normal(size=(32, half))
  labels = rng.integers(0, 32, 4096)
  noise = lambda: np.pad(0.3 * rng.normal(size=(4096, half)), ((0, 0), (0, half)))  # noqa: E731
  q, d = (centres[labels] + noise()).astype(np.float32), (centres[labels] + noise()).astype(
      np.float32)
  w_dec = np.zeros((64, D), np.float32)
  w_dec[:8, :half] = rng.normal(size=(8, half))
  w_dec[8:, half:] = rng.normal(size=(56, half))
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)

  def never_fire(resample_every):
    sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=D, num_latents=64, k=2, k_aux=8,
                                        dead_after_tokens=1000),
                      rngs=nnx.Rngs(0))
    sae.w_dec.set_value(jnp.asarray(w_dec))
    sae.w_enc.set_value(jnp.asarray(w_dec.T))
    cfg = headtrain.HeadTrainConfig(steps=200, batch_size=64, resample_every=resample_every,
                                    resample_until=0.6)
    loss_cfg = step_lib.LossConfig(w_auxk=0.0)
    optim = OptimConfig(lr_sae=3e-3, warmup_steps=10, total_steps=200, freeze_encoder=True)
    trained, _, _ = headtrain.train_head(sae, q, d, loss_cfg, optim, cfg)
    code = trained.encode(jnp.asarray(np.concatenate([q, d])))
    fired = np.zeros(64, bool)
    fired[np.asarray(code.indices)[np.asarray(code.values) > 0]] = True
    return 1 - fired.mean()

  without, with_resampling = never_fire(0), never_fire(25)
  assert without >= 56 / 64, without  # the planted latents stay silent without resampling
  assert with_resampling < 0.25, (with_resampling, without)
