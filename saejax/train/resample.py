"""Resampling dead latents (Bricken et al. 2023, "Towards Monosemanticity", "Neuron resampling").

A latent that has not fired for a long stretch of training gets no gradient from the main loss
(TopK passes none to losers) and AuxK revives few of them at S = 16,384 (benchmarks/RESULTS.md
"Sweep"). Resampling gives each dead latent a fresh start pointing at what the SAE reconstructs
worst: an input drawn with probability proportional to its squared reconstruction loss, centred by
b_pre and unit-normalised, becomes the latent's decoder row; its encoder column is the same
direction scaled to `enc_scale` times the mean norm of the live latents' encoder columns; its bias
is 0; and the optimiser's moments of its row, column and bias are zeroed, so stale Adam statistics
do not throw it straight back.

Bricken et al. scale the encoder column to 0.2 of the live norm, for a ReLU SAE whose latents fire
on their own. A TopK latent fires only where it beats the others, so the default here is 1 (the
OpenAI initialisation's encoder = decoder transpose): on its seed input the new latent's
pre-activation is ||x - b_pre|| times the live norm, at least any live latent's projection there
(before biases), so it enters that input's TopK and the inputs like it.

Pure and jittable: every latent gets a candidate direction and ``jnp.where`` keeps the live ones,
so shapes do not depend on how many latents are dead.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Bool, Float

from saejax.hub.state import TrainState
from saejax.sae import topk as sae_lib

# The SAE parameters resampling rewrites, with the axis of each that runs over latents.
LATENT_AXIS = {"w_dec": 0, "w_enc": 1, "b_lat": 0}


def _latent_param(path) -> str | None:
  """"w_dec" / "w_enc" / "b_lat" for a path inside the SAE's parameters, else None."""
  names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
  if "sae" not in names:
    return None
  return next((n for n in names if n in LATENT_AXIS), None)


def _select(dead: Bool[jax.Array, "S"], name: str, new, old):
  """``new`` where the latent is dead, ``old`` elsewhere, along ``name``'s latent axis."""
  shape = [1] * old.ndim
  shape[LATENT_AXIS[name]] = -1
  return jnp.where(dead.reshape(shape), new, old)


def reset_latent_moments(opt_state, dead: Bool[jax.Array, "S"], num_latents: int):
  """Zero every optimiser-state leaf that mirrors a latent parameter (Adam's mu and nu) at the
  dead latents; counts and other leaves pass through."""
  def reset(path, leaf):
    name = _latent_param(path)
    if name is None or not hasattr(leaf, "shape") or leaf.ndim <= LATENT_AXIS[name] or (
        leaf.shape[LATENT_AXIS[name]] != num_latents):
      return leaf
    return _select(dead, name, jnp.zeros_like(leaf), leaf)
  return jax.tree_util.tree_map_with_path(reset, opt_state)


def resample_dead(state: TrainState, graphdef: nnx.GraphDef, v: Float[jax.Array, "N D"],
                  dead: Bool[jax.Array, "S"], key: jax.Array,
                  enc_scale: float = 1.0) -> tuple[TrainState, dict]:
  """Re-initialise the ``dead`` latents from inputs ``v`` the SAE reconstructs worst.

  ``v``: a sample of the SAE's inputs (pooled embeddings). Returns the new state (parameters,
  optimiser moments, and the dead latents' ``since_fired`` counters set to 0) and metrics: how many
  latents were resampled and the sample's mean squared reconstruction error.
  """
  sae = nnx.merge(graphdef, state.params).sae
  _, v_hat = sae(v)
  err = jnp.sum((v - v_hat) ** 2, axis=-1)
  weights = err ** 2
  p = jnp.where(jnp.sum(weights) > 0, weights / jnp.sum(weights), 1.0 / v.shape[0])
  s = sae.config.num_latents
  rows = jax.random.choice(key, v.shape[0], (s,), p=p)
  u = v[rows] - sae.b_pre[...]
  u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
  enc_norm = jnp.linalg.norm(sae.w_enc[...], axis=0)
  alive = ~dead
  live_norm = jnp.where(alive.any(), jnp.sum(enc_norm * alive) / jnp.maximum(alive.sum(), 1), 1.0)
  fresh = {"w_dec": u, "w_enc": u.T * enc_scale * live_norm, "b_lat": jnp.zeros((s,))}

  def rewrite(path, leaf):
    name = _latent_param(path)
    return leaf if name is None else _select(dead, name, fresh[name].astype(leaf.dtype), leaf)

  params = jax.tree_util.tree_map_with_path(rewrite, state.params)
  new_state = state.replace(params=params,
                            opt_state=reset_latent_moments(state.opt_state, dead, s),
                            since_fired=jnp.where(dead, 0, state.since_fired))
  return new_state, {"resampled": jnp.sum(dead), "resample_mse": jnp.mean(err)}
