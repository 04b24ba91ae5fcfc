"""TopK sparse autoencoder head: the embedding layer of saejax.

A pooled text embedding ``v`` in R^D becomes a sparse code ``z`` in R^S with at most k non-zero,
non-negative entries (k-sparse autoencoders, Makhzani & Frey 2013; Gao et al. 2024, "Scaling and
evaluating sparse autoencoders"; CSR, Wen et al., ICML 2025)::

  z_pre = (v - b_pre) @ w_enc + b_lat        pre-activations, [..., S]
  z     = ReLU(TopK(z_pre, k))               kept sparse as (values, indices), [..., k] each
  v_hat = z @ w_dec + b_pre                  reconstruction,  [..., D]

Training invariants (Gao et al. sec. 2.4 and appendix A; OpenAI's sparse_autoencoder and
EleutherAI's sparsify), each a named pure function here:
  * every decoder row (one latent's direction in R^D) has unit L2 norm: `normalize_decoder` after
    each optimizer step, and `project_out_parallel_grad` before it removes the gradient component
    that would only change a row's norm;
  * the encoder starts as the transpose of a random unit-norm decoder (fewer dead latents);
  * ``b_pre`` starts at the geometric median (or mean) of a data sample: `init_b_pre`;
  * dead latents (silent for `SAEConfig.dead_after_tokens` texts) are revived by the AuxK loss,
    which reconstructs the residual from the top-``k_aux`` dead pre-activations: `auxk`. The
    per-latent texts-since-fired counter lives in the TrainState, never in this module:
    `fired`, `update_since_fired` and `dead_mask` are pure functions of it.

Nothing here mutates state: the `SAE` methods read their own parameters and return arrays.
Every function runs under jit on batch-sharded arrays with Auto or Explicit mesh axes: where an
Explicit mesh leaves an output's sharding ambiguous (top_k, gathers, scatters),
`saejax.sharding.sharding_like` states it.
Shape letters: D model width, S latents, K active latents per row, N sample rows.
"""

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from saejax.errors import ConfigError, ShapeError
from saejax.models.params import param, zeros
from saejax.sharding import sharding_like


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """The TopK SAE head.

  Attributes:
    d_model: width D of the pooled embedding the SAE reads.
    num_latents: dictionary size S (CSR and our default: 16,384).
    k: active latents per text during training; `SAE.encode` may use another k at inference.
    k_aux: dead latents used by the AuxK loss (Gao et al. appendix A.2; CSR: 512).
    dead_after_tokens: a latent is dead once it has not fired for this many embedded texts.
      "Tokens" follows Gao et al., who count SAE inputs; here one input is one text (query,
      positive or hard negative). A latent used uniformly fires on k/S of texts (1/256 at the
      defaults), so 1,000,000 texts is ~3,900 expected firings: a latent silent that long fires
      at under ~1/1000 of the average rate, while a rare but live concept (once per 100k texts)
      stays silent that long with probability e^-10. Short runs should lower it.
    b_pre_init: how `init_b_pre` sets b_pre from a data sample (Gao et al.: geometric median).
    normalize_codes: the embedding is the L2-normalised code ``z / ||z||`` (training scores and
      index search are then cosine); False keeps raw activations (scores are raw dot products).
      With unit-norm documents the inverted index's dot product ranks by cosine at no extra cost
      (a query's norm does not change its ranking). Raw dot products reward inflating codes: in
      InfoNCE a few latents grow to win TopK for every text and the dictionary collapses
      (measured in benchmarks/RESULTS.md "Sweep"). Reconstruction always uses the raw code.
  """
  d_model: int
  num_latents: int = 16384
  k: int = 64
  k_aux: int = 512
  dead_after_tokens: int = 1_000_000
  b_pre_init: Literal["mean", "geometric_median"] = "geometric_median"
  normalize_codes: bool = True

  def __post_init__(self):
    for name in ("d_model", "num_latents", "k", "k_aux", "dead_after_tokens"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"SAEConfig.{name} must be a positive int, got {value!r}")
    for name in ("k", "k_aux"):
      if getattr(self, name) > self.num_latents:
        raise ConfigError(f"SAEConfig.{name}={getattr(self, name)} exceeds "
                          f"SAEConfig.num_latents={self.num_latents}")
    if self.b_pre_init not in ("mean", "geometric_median"):
      raise ConfigError(f"SAEConfig.b_pre_init={self.b_pre_init!r}; "
                        "expected 'mean' or 'geometric_median'")


class SparseCode(NamedTuple):
  """A batch of TopK codes: the k kept values and their latent ids, plus all pre-activations."""
  values: Float[Array, "... K"]
  indices: Int[Array, "... K"]
  pre: Float[Array, "... S"]


def _whole_last_axis(x: Array) -> Array:
  """x with its last axis unsharded: `jax.lax.top_k` runs along an axis that must be whole."""
  sharding = sharding_like(x, x.ndim - 1, 1)
  return x if sharding is None else jax.sharding.reshard(x, sharding)


def _check_k(name: str, k: int, num_latents: int):
  if not isinstance(k, int) or not 1 <= k <= num_latents:
    raise ConfigError(f"{name}={k!r} must be an int in [1, num_latents={num_latents}]")


def topk_relu(z_pre: Float[Array, "... S"], k: int) -> SparseCode:
  """``ReLU(TopK(z_pre, k))`` as a sparse code. ReLU after TopK: a row may have fewer than k
  positive latents; the rest are kept with value 0 (and count as not fired)."""
  _check_k("k", k, z_pre.shape[-1])
  values, indices = jax.lax.top_k(_whole_last_axis(z_pre), k)
  return SparseCode(jax.nn.relu(values), indices.astype(jnp.int32), z_pre)


def unit_norm(values: Float[Array, "... K"], eps: float = 1e-12) -> Float[Array, "... K"]:
  """Rows scaled to unit L2 norm (an all-zero row stays zero): the embedding of a code whose
  `SAEConfig.normalize_codes` is set. The norm of the k kept values is the norm of the dense code,
  so this commutes with `densify`."""
  values = values.astype(jnp.float32)
  return values * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(values), -1, keepdims=True), eps))


def densify(values: Float[Array, "... K"], indices: Int[Array, "... K"],
            num_latents: int) -> Float[Array, "... S"]:
  """Scatter a sparse code into a dense ``[..., S]`` vector (repeated indices add up, as in
  `decode_sparse`)."""
  if values.shape != indices.shape:
    raise ShapeError(f"densify: values {values.shape} and indices {indices.shape} differ")

  def scatter_row(row_values, row_indices):
    return jnp.zeros(num_latents, row_values.dtype).at[row_indices].add(row_values)

  for _ in range(values.ndim - 1):  # vmap keeps each batch axis (and its sharding) as it is
    scatter_row = jax.vmap(scatter_row)
  return scatter_row(values, indices)


def decode_sparse(values: Float[Array, "... K"], indices: Int[Array, "... K"],
                  w_dec: Float[Array, "S D"]) -> Float[Array, "... D"]:
  """``z @ w_dec`` without the bias, from the sparse code: gathers only the k decoder rows.

  Why not densify and matmul: that costs S*D multiply-adds per text, this K*D (256x fewer at the
  defaults), which is what matters on CPU and in serving; the decoder's gradient is then a
  scatter-add into the K fired rows. Gao et al. decode sparsely for the same reason (their Triton
  kernel). The gathered ``[..., K, D]`` block is larger than a dense ``[..., S]`` code when
  K*D > S, a fair trade on accelerators only because the flops drop by S/K.
  """
  if values.shape != indices.shape:
    raise ShapeError(f"decode: values {values.shape} and indices {indices.shape} differ")
  rows = w_dec.at[indices].get(out_sharding=sharding_like(indices, indices.ndim, 1))
  return jnp.einsum("...k,...kd->...d", values, rows)


def auxk(z_pre: Float[Array, "... S"], is_dead: Bool[Array, "S"],
         k_aux: int) -> tuple[Float[Array, "... A"], Int[Array, "... A"]]:
  """Top-``k_aux`` ReLU pre-activations among dead latents only (Gao et al. appendix A.2).

  Live latents are set to -inf before `jax.lax.top_k`, so with fewer than ``k_aux`` dead latents the
  extra slots hold live ids with value ReLU(-inf) = 0: they add nothing to the reconstruction and
  receive no gradient. Decode with `decode_sparse` and train with `losses.auxk_loss`.
  """
  if is_dead.shape != z_pre.shape[-1:]:
    raise ShapeError(f"auxk: dead mask {is_dead.shape} does not match pre-activations "
                     f"{z_pre.shape}")
  _check_k("k_aux", k_aux, z_pre.shape[-1])
  values, indices = jax.lax.top_k(_whole_last_axis(jnp.where(is_dead, z_pre, -jnp.inf)), k_aux)
  return jax.nn.relu(values), indices.astype(jnp.int32)


def fired(indices: Int[Array, "... K"], values: Float[Array, "... K"],
          num_latents: int) -> Bool[Array, "S"]:
  """Which latents have a positive value anywhere in the batch.

  Called inside jit on the global batch-sharded code, the scatter spans every shard, so XLA does the
  cross-shard reduction (the MIN of per-shard texts-since-fired counters, done for us).
  """
  hit = (values > 0).reshape(-1).astype(jnp.int32)
  flat = indices.reshape(-1)
  counts = jnp.zeros(num_latents, jnp.int32).at[flat].max(
      hit, out_sharding=sharding_like(flat, 0, 1))
  return counts > 0


def update_since_fired(counter: Int[Array, "S"], has_fired: Bool[Array, "S"],
                       n_texts: int | Int[Array, ""]) -> Int[Array, "S"]:
  """Texts since each latent last fired: 0 where it fired in this batch of ``n_texts``, else
  ``+ n_texts``.

  The sum saturates at the dtype's maximum rather than wrapping to a negative (i.e. "alive") count.
  """
  if sharding_like(counter, 1, 0) is not None:  # Explicit mesh: select needs matching shardings
    has_fired = jax.sharding.reshard(has_fired, jax.typeof(counter).sharding)
  n = jnp.asarray(n_texts, counter.dtype)
  grown = jnp.minimum(counter, jnp.iinfo(counter.dtype).max - n) + n
  return jnp.where(has_fired, jnp.zeros_like(counter), grown)


def dead_mask(counter: Int[Array, "S"], dead_after_tokens: int) -> Bool[Array, "S"]:
  """Latents that have not fired for at least ``dead_after_tokens`` texts."""
  return counter >= dead_after_tokens


def normalize_decoder(w_dec: Float[Array, "S D"], eps: float = 1e-12) -> Float[Array, "S D"]:
  """Rescale each decoder row to unit L2 norm (an all-zero row stays zero)."""
  norm = jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  return w_dec / jnp.maximum(norm, eps)


def project_out_parallel_grad(w_dec: Float[Array, "S D"], g_dec: Float[Array, "S D"],
                              eps: float = 1e-12) -> Float[Array, "S D"]:
  """Remove from each row's gradient its component along that decoder row.

  With unit-norm rows that component only changes a row's length, which `normalize_decoder`
  undoes after the step; left in, it would feed the optimizer's moments with updates that are
  thrown away. Divides by ||w||^2 so it is exact even if a row drifted from norm 1.
  """
  if w_dec.shape != g_dec.shape:
    raise ShapeError(f"decoder {w_dec.shape} and its gradient {g_dec.shape} differ")
  along = jnp.sum(g_dec * w_dec, -1, keepdims=True)
  return g_dec - along / jnp.maximum(jnp.sum(w_dec * w_dec, -1, keepdims=True), eps) * w_dec


def geometric_median(points: Float[Array, "N D"], num_iters: int = 100,
                     eps: float = 1e-8) -> Float[Array, "D"]:
  """The point minimising the sum of Euclidean distances to ``points`` (Weiszfeld iterations).

  A fixed number of steps keeps it jittable; distances are floored at ``eps`` so an iterate that
  lands on a data point does not divide by zero (it then stays there, a fine b_pre).
  """
  points = points.astype(jnp.float32)

  def step(_, y):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(points - y, axis=-1), eps)
    return (w @ points) / jnp.sum(w)

  return jax.lax.fori_loop(0, num_iters, step, jnp.mean(points, 0))


def init_b_pre(sample: Float[Array, "N D"], method: Literal["mean", "geometric_median"],
               num_iters: int = 100) -> Float[Array, "D"]:
  """b_pre from a sample of embeddings; assign it with ``sae.b_pre[...] = init_b_pre(...)``.

  The geometric median is robust to the outlier embeddings that drag a mean (Gao et al. sec. 2.4).
  """
  if sample.ndim != 2:
    raise ShapeError(f"init_b_pre: sample must be [N, D], got shape {sample.shape}")
  if method == "mean":
    return jnp.mean(sample.astype(jnp.float32), 0)
  if method == "geometric_median":
    return geometric_median(sample, num_iters)
  raise ConfigError(f"b_pre_init={method!r}; expected 'mean' or 'geometric_median'")


def _unit_rows(key, shape, dtype):
  return normalize_decoder(jax.random.normal(key, shape, dtype))


class SAE(nnx.Module):
  """TopK SAE parameters and the forward maps that use them.

  Parameters (logical axes): ``w_enc`` [D, S] ("embed", "latent"), ``b_lat`` [S] ("latent",),
  ``w_dec`` [S, D] ("latent", "embed") with unit-norm rows, ``b_pre`` [D] (None,).
  """

  def __init__(self, config: SAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    s, d = config.num_latents, config.d_model
    self.w_dec = param(rngs, _unit_rows, (s, d), ("latent", "embed"))
    dec = self.w_dec[...]  # OpenAI init: the encoder is the decoder's transpose.
    self.w_enc = param(rngs, lambda _key, shape, dtype: dec.T.astype(dtype), (d, s),
                       ("embed", "latent"))
    self.b_lat = param(rngs, zeros(), (s,), ("latent",))
    self.b_pre = param(rngs, zeros(), (d,), (None,))

  def pre_activations(self, v: Float[Array, "... D"]) -> Float[Array, "... S"]:
    """``(v - b_pre) @ w_enc + b_lat``."""
    if v.shape[-1] != self.config.d_model:
      raise ShapeError(f"SAE input width {v.shape[-1]} (shape {v.shape}) != "
                       f"SAEConfig.d_model={self.config.d_model}")
    return (v - self.b_pre[...]) @ self.w_enc[...] + self.b_lat[...]

  def encode(self, v: Float[Array, "... D"], k: int | None = None) -> SparseCode:
    """The TopK code of ``v``; ``k`` defaults to the training k (queries and documents may
    use different ones at inference)."""
    return topk_relu(self.pre_activations(v), self.config.k if k is None else k)

  def embed(self, v: Float[Array, "... D"],
            k: int | None = None) -> tuple[Float[Array, "... K"], Int[Array, "... K"]]:
    """The retrieval embedding of ``v``: the TopK code, unit-normalised when
    `SAEConfig.normalize_codes` (what the index stores and searches with)."""
    code = self.encode(v, k)
    return (unit_norm(code.values) if self.config.normalize_codes else code.values), code.indices

  def decode(self, values: Float[Array, "... K"],
             indices: Int[Array, "... K"]) -> Float[Array, "... D"]:
    """``v_hat = z @ w_dec + b_pre``, computed sparsely (see `decode_sparse`)."""
    return decode_sparse(values, indices, self.w_dec[...]) + self.b_pre[...]

  def __call__(self, v: Float[Array, "... D"],
               k: int | None = None) -> tuple[SparseCode, Float[Array, "... D"]]:
    """Encode and reconstruct: ``(code, v_hat)``."""
    code = self.encode(v, k)
    return code, self.decode(code.values, code.indices)
