"""Training losses: pure functions, arrays in, ``(scalar, metrics)`` out.

Every weight, temperature and k is an argument; the train step multiplies each loss by its config
weight and logs every metric (a caller that applies one loss twice, e.g. FLOPS to queries and to
documents, prefixes the metric names).

Similarity. Training scores a query against a document with exactly the score the sparse index
ranks by. The step hands these functions the retrieval embeddings: by default the unit-normalised
TopK codes (`saejax.sae.topk.SAEConfig.normalize_codes`), so the score is the cosine of the two
codes, which an inverted index computes exactly by walking the query's k posting lists when
documents are stored unit-normalised (a query's norm does not change its ranking). Raw dot products
of unnormalised codes reward making codes larger: a few latents grow until they win TopK for every
text and the dictionary collapses (measured in benchmarks/RESULTS.md, "Sweep"). Scores are divided
by a temperature ``tau`` (logit scale ``1/tau``).

Losses and sources:
  * `info_nce`    InfoNCE / contrastive cross-entropy with in-batch and hard negatives (van den
                  Oord et al. 2018; DPR, Karpukhin et al. 2020).
  * `distill_kl`  in-batch distillation from a dense teacher's similarities (TAS-B, RocketQAv2).
  * `fvu`         fraction of variance unexplained, Gao et al. 2024's normalised MSE.
  * `multi_k_fvu` the Multi-TopK objective, L(k) + L(4k)/8 in Gao et al. sec. 5.3.
  * `auxk_loss`   AuxK: dead latents reconstruct the residual (Gao et al. appendix A.2).
  * `flops`       FLOPS regulariser (Paria et al. 2020), `flops_weight` SPLADE's quadratic warm-up
                  (Formal et al. 2021).
  * `spread_out`  second-moment term of the Global Orthogonal Regularizer (Zhang et al. 2017), as
                  used by EmbeddingGemma (2025).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from saejax.errors import ConfigError, ShapeError
from saejax.sharding import sharding_like

Metrics = dict[str, Float[Array, ""]]


def info_nce(q: Float[Array, "B S"], d_pos: Float[Array, "B S"], d_neg: Float[Array, "B H S"],
             temperature: float, extra: Float[Array, "B M"] | None = None
             ) -> tuple[Float[Array, ""], Metrics]:
  """InfoNCE over the whole batch: each query against every positive and every hard negative.

  Candidates are the B positives followed by the B*H hard negatives (H may be 0); query i's label is
  its own positive i. Codes are dense (`sae.densify` them first). Called inside jit on batch-sharded
  arrays, the candidates are all-gathered for the score matrix, so the negatives are the global
  batch. A repeated text makes a false negative: a document that is the positive of two queries
  (or one query's positive and another's hard negative), or one query twice with two positives
  (SciFact train has 919 pairs over 809 claims). The training pipeline (`saejax.data.pipeline`)
  builds global batches without them, by exact text: no query text twice, no text that is the
  positive of one record and the positive or hard negative of another; a record that would repeat
  one waits for a later batch (or, past a queue of a few batches, is dropped and counted). This
  function does not check it: batches built elsewhere, and near-duplicates (a document edited by one
  character), can still hold false negatives.

  Args:
    q: query codes.
    d_pos: the positive document code of each query.
    d_neg: H hard-negative codes per query.
    temperature: tau; logits are dot scores / tau.
    extra: more negatives' scores per query, already computed (`saejax.sae.memory`'s bank of
      recent documents); an entry at -inf is not a candidate.

  Returns:
    Mean cross-entropy, and metrics: ``info_nce``; ``accuracy`` (own positive strictly above every
    other candidate); ``pos_score`` and ``neg_score``, the mean raw dot score of the label and of
    all other in-batch candidates; ``hard_neg_score`` (when H > 0), the mean score of each query's
    own hard negatives; ``bank_score`` (with `extra`), the mean score of its candidates.
  """
  b, s = q.shape
  if d_pos.shape != (b, s) or d_neg.ndim != 3 or d_neg.shape[0] != b or d_neg.shape[2] != s:
    raise ShapeError(f"info_nce: q {q.shape}, d_pos {d_pos.shape} and d_neg {d_neg.shape} must be "
                     "[B, S], [B, S] and [B, H, S]")
  h = d_neg.shape[1]
  if b * (1 + h) < 2:
    raise ShapeError(f"info_nce needs at least 2 candidates; got B={b}, H={h}")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ConfigError(f"info_nce temperature must be > 0, got {temperature}")
  q = q.astype(jnp.float32)
  candidates = jnp.concatenate([d_pos, d_neg.reshape(b * h, s)], 0).astype(jnp.float32)
  # On an Explicit mesh the product of two batch-sharded operands needs its output sharding stated:
  # rows stay sharded like q, the candidate axis is whole (the all-gather). Auto meshes infer it.
  scores = jnp.einsum("bs,cs->bc", q, candidates, out_sharding=sharding_like(q, 1, 1))
  pos = jnp.sum(q * d_pos.astype(jnp.float32), -1)  # the label logits, without a sharded gather
  is_label = jnp.arange(scores.shape[1])[None, :] == jnp.arange(b)[:, None]
  best_other = jnp.max(jnp.where(is_label, -jnp.inf, scores), -1)
  log_norm = jax.nn.logsumexp(scores / temperature, -1)
  if extra is not None:
    if extra.shape[0] != b:
      raise ShapeError(f"info_nce: extra scores {extra.shape} must be [B={b}, M]")
    extra = extra.astype(jnp.float32)
    # Two log-sum-exps joined, not one over concatenated logits: the backward pass of a concat of
    # a batch-sharded and a replicated block makes XLA's SPMD partitioner rematerialise it whole.
    log_norm = jnp.logaddexp(log_norm, jax.nn.logsumexp(extra / temperature, -1))
    best_other = jnp.maximum(best_other, jnp.max(extra, -1))
  loss = jnp.mean(log_norm - pos / temperature)
  metrics = {
      "info_nce": loss,
      "accuracy": jnp.mean(pos > best_other),
      "pos_score": jnp.mean(pos),
      "neg_score": (jnp.sum(scores) - jnp.sum(pos)) / (scores.size - b),
  }
  if h:
    own_neg = jnp.einsum("bs,bhs->bh", q, d_neg.astype(jnp.float32))
    metrics["hard_neg_score"] = jnp.mean(own_neg)
  if extra is not None:
    live = jnp.isfinite(extra)
    metrics["bank_score"] = jnp.sum(jnp.where(live, extra, 0.0)) / jnp.maximum(jnp.sum(live), 1)
  return loss, metrics


def _candidate_scores(q: Float[Array, "B E"], d_pos: Float[Array, "B E"],
                      d_neg: Float[Array, "B H E"]) -> Float[Array, "B C"]:
  """Each query's score against every positive then every hard negative of the batch."""
  b, e = q.shape
  candidates = jnp.concatenate([d_pos, d_neg.reshape(-1, e)], 0).astype(jnp.float32)
  return jnp.einsum("be,ce->bc", q.astype(jnp.float32), candidates,
                    out_sharding=sharding_like(q, 1, 1))


def distill_kl(q: Float[Array, "B S"], d_pos: Float[Array, "B S"], d_neg: Float[Array, "B H S"],
               t_q: Float[Array, "B D"], t_pos: Float[Array, "B D"], t_neg: Float[Array, "B H D"],
               temperature: float, teacher_temperature: float) -> tuple[Float[Array, ""], Metrics]:
  """KL(teacher || student) between the two softmax distributions over in-batch candidates.

  The student ranks each query's candidates (all positives and hard negatives of the batch, as in
  `info_nce`) by its code scores / ``temperature``; the teacher by its own embeddings' scores /
  ``teacher_temperature`` (saejax: cosine of the dense pooled embedding, detached). Unlike InfoNCE,
  which only says which candidate is right, this passes on how the dense model orders all of them,
  the signal RocketQAv2 / in-batch distillation (Hofstaetter et al. 2021, TAS-B) use. Metrics:
  ``distill_kl``; ``distill_top1``, how often the student's top candidate is the teacher's.
  """
  student = _candidate_scores(q, d_pos, d_neg) / temperature
  teacher = _candidate_scores(t_q, t_pos, t_neg) / teacher_temperature
  log_p_s = jax.nn.log_softmax(student, -1)
  log_p_t = jax.nn.log_softmax(teacher, -1)
  loss = jnp.mean(jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), -1))
  agree = jnp.mean((jnp.argmax(student, -1) == jnp.argmax(teacher, -1)).astype(jnp.float32))
  return loss, {"distill_kl": loss, "distill_top1": agree}


def _normalized_mse(target: Float[Array, "... D"], recon: Float[Array, "... D"],
                    eps: float) -> Float[Array, ""]:
  """Sum of squared error / sum of squared deviation of ``target`` from its batch mean."""
  if target.shape != recon.shape:
    raise ShapeError(f"reconstruction {recon.shape} does not match its target {target.shape}")
  target = target.reshape(-1, target.shape[-1]).astype(jnp.float32)
  recon = recon.reshape(-1, recon.shape[-1]).astype(jnp.float32)
  if target.shape[0] < 2:
    raise ShapeError(f"a normalised MSE needs a batch of at least 2 rows, got {target.shape}")
  err = jnp.sum(jnp.square(target - recon))
  var = jnp.sum(jnp.square(target - jnp.mean(target, 0)))
  return err / jnp.maximum(var, eps)


def fvu(v: Float[Array, "B D"], v_hat: Float[Array, "B D"],
        eps: float = 1e-12) -> tuple[Float[Array, ""], Metrics]:
  """Fraction of variance unexplained: ``sum (v - v_hat)^2 / sum (v - mean_batch(v))^2``.

  The denominator is not detached: FVU does not change when v is scaled, so an encoder trained end
  to end cannot lower it by shrinking its embeddings, as it could a plain MSE. ``eps`` only guards a
  batch of identical embeddings.
  """
  loss = _normalized_mse(v, v_hat, eps)
  return loss, {"fvu": loss}


def multi_k_fvu(v: Float[Array, "B D"], v_hat_by_k: Mapping[int, Float[Array, "B D"]],
                weight_by_k: Mapping[int, float],
                eps: float = 1e-12) -> tuple[Float[Array, ""], Metrics]:
  """Multi-TopK: ``sum_k weight_k * fvu(v, v_hat_k)`` (Gao et al. sec. 5.3 use {k: 1, 4k: 1/8}).

  The caller reconstructs once per k from the same pre-activations
  (``sae.topk_relu(code.pre, 4 * k)`` then ``SAE.decode``). Training the larger k too makes the
  code progressive: it still reconstructs well when more latents are kept, as when queries are
  encoded with a larger k at inference. Metrics: ``fvu_k{k}`` for each k.
  """
  if set(v_hat_by_k) != set(weight_by_k):
    raise ConfigError(f"multi_k_fvu: reconstructions for k={sorted(v_hat_by_k)} but weights for "
                      f"k={sorted(weight_by_k)}")
  metrics = {f"fvu_k{k}": fvu(v, v_hat, eps)[0] for k, v_hat in sorted(v_hat_by_k.items())}
  loss = sum(weight_by_k[k] * metrics[f"fvu_k{k}"] for k in sorted(v_hat_by_k))
  return jnp.asarray(loss, jnp.float32), metrics


def auxk_loss(residual: Float[Array, "B D"], aux_recon: Float[Array, "B D"],
              is_dead: Bool[Array, "S"], eps: float = 1e-12) -> tuple[Float[Array, ""], Metrics]:
  """AuxK: normalised MSE of the dead latents' reconstruction of the residual (Gao et al. A.2).

  Args:
    residual: ``v - v_hat`` of the main reconstruction. Detached here (as in OpenAI's code): it is a
      fixed target for the dead latents, not something for the main path to move towards them.
    aux_recon: ``sae.decode_sparse(*sae.auxk(code.pre, is_dead, k_aux), w_dec)``, without b_pre.
    is_dead: the dead-latent mask the auxiliary code was selected with.
    eps: guards a residual without variance.

  Returns:
    The loss, 0 (with zero gradient) when no latent is dead; the 1/32 weight of Gao et al. is the
    caller's config weight. Metrics: ``auxk`` and ``dead_fraction``.
  """
  nmse = _normalized_mse(jax.lax.stop_gradient(residual), aux_recon, eps)
  loss = jnp.where(jnp.any(is_dead), nmse, 0.0)
  return loss, {"auxk": loss, "dead_fraction": jnp.mean(is_dead.astype(jnp.float32))}


def flops(z: Float[Array, "B S"]) -> tuple[Float[Array, ""], Metrics]:
  """FLOPS regulariser ``sum_j (mean_i |z_ij|)^2`` (Paria et al. 2020): a smooth proxy for the
  expected number of multiply-adds of an inverted-index search, so it pushes mass off the latents
  that fire for many texts (long posting lists). Metrics: ``flops``; ``l0``, mean non-zeros per row.
  """
  z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  loss = jnp.sum(jnp.square(jnp.mean(jnp.abs(z), 0)))
  return loss, {"flops": loss, "l0": jnp.mean(jnp.sum(z != 0, -1).astype(jnp.float32))}


def flops_weight(step: int | Float[Array, ""], max_weight: float,
                 warmup_steps: int) -> Float[Array, ""]:
  """SPLADE's quadratic ramp: ``max_weight * min(1, step / warmup_steps)^2`` (no ramp if 0)."""
  if warmup_steps <= 0:
    return jnp.asarray(max_weight, jnp.float32)
  frac = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
  return max_weight * jnp.square(frac)


def _offdiag_second_moment(x: Float[Array, "B E"], eps: float) -> Float[Array, ""]:
  b = x.shape[0]
  if x.ndim != 2 or b < 2:
    raise ShapeError(f"spread_out needs [B, E] embeddings with B >= 2, got {x.shape}")
  x = x.astype(jnp.float32)
  # rsqrt of a floored squared norm: jnp.linalg.norm has a NaN gradient at an all-zero row.
  x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps))
  sims = jnp.einsum("be,ce->bc", x, x, out_sharding=sharding_like(x, 1, 1))
  diag = jnp.sum(jnp.square(x), -1)  # = diagonal(sims), without a gather on a sharded matrix
  off_diag = jnp.sum(jnp.square(sims)) - jnp.sum(jnp.square(diag))
  return off_diag / (b * (b - 1))


def spread_out(q: Float[Array, "B E"], d: Float[Array, "B E"],
               eps: float = 1e-12) -> tuple[Float[Array, ""], Metrics]:
  """Spread-out regulariser: second moment of off-diagonal cosine similarities.

  ``L = 1/(B(B-1)) sum_{i != j} (q^_i . q^_j)^2 + 1/(B(B-1)) sum_{i != j} (d^_i . d^_j)^2`` with
  ``x^ = x / ||x||``, the form EmbeddingGemma uses. Zhang et al.'s GOR adds the squared first
  moment and a hinge at 1/E (the value for random directions); EmbeddingGemma keeps only the
  second moment, as here. An all-zero row stays a zero vector (``eps`` floors the squared norm).
  Metrics: ``spread_out``, ``spread_out_q``, ``spread_out_d``.
  """
  mq, md = _offdiag_second_moment(q, eps), _offdiag_second_moment(d, eps)
  loss = mq + md
  return loss, {"spread_out": loss, "spread_out_q": mq, "spread_out_d": md}
