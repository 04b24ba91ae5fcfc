"""InfoNCE over a very large global batch with the score matrix built one query block at a time.

`saejax.sae.losses.info_nce` materialises the whole [B, C] score matrix (B queries against C =
B(1+H) candidates), and its gradient keeps a second one: at B = 32k queries with one hard negative
that is 8 GB of fp32 logits per copy. Here the queries are split into blocks, `jax.lax.map` walks
them, and `jax.checkpoint` on the block makes the backward pass recompute each block's scores
instead of storing them, so the live score memory is one [B / num_blocks, C] block in both passes.
This is the memory-bounded contrastive loss of GradCache (Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup") and of blockwise/chunked softmax in large-batch
CLIP-style training (e.g. Cherti et al. 2023), done inside one jitted step: every query still sees
every candidate of the global batch, so the loss, its gradient and the metrics equal `info_nce`'s.

Blocks are strided (block j holds rows j, j + num_blocks, j + 2 num_blocks, ...), so when the batch
axis is sharded over devices, every block takes rows from every device and each device keeps
working on its own rows in every step of the map.

Shape letters: B queries, H hard negatives per query, S latents, C = B (1 + H) candidates,
R = B / num_blocks queries per block.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from saejax.errors import ConfigError, ShapeError
from saejax.sae.losses import Metrics
from saejax.sharding import sharding_like


def _block_sums(q: Float[Array, "R S"], rows: Int[Array, "R"], pos: Float[Array, "R"],
                candidates: Float[Array, "C S"], temperature) -> tuple[Array, Array, Array]:
  """(sum of per-query cross-entropies, correct count, sum of all scores) of one query block."""
  scores = jnp.einsum("rs,cs->rc", q, candidates, out_sharding=sharding_like(q, 1, 1))
  ce = jax.nn.logsumexp(scores / temperature, -1) - pos / temperature
  is_label: Bool[Array, "R C"] = jnp.arange(candidates.shape[0])[None, :] == rows[:, None]
  best_other = jnp.max(jnp.where(is_label, -jnp.inf, scores), -1)
  return jnp.sum(ce), jnp.sum((pos > best_other).astype(jnp.float32)), jnp.sum(scores)


def chunked_info_nce(q: Float[Array, "B S"], d_pos: Float[Array, "B S"],
                     d_neg: Float[Array, "B H S"], temperature: float,
                     num_blocks: int) -> tuple[Float[Array, ""], Metrics]:
  """`saejax.sae.losses.info_nce` with the [B, C] scores computed in `num_blocks` query blocks.

  Args:
    q: query codes (dense).
    d_pos: each query's positive document code.
    d_neg: H hard-negative codes per query (H may be 0).
    temperature: tau; logits are dot scores / tau.
    num_blocks: how many query blocks; must divide B. 1 gives `info_nce`'s memory.

  Returns:
    The mean cross-entropy and the metrics of `info_nce` (``info_nce``, ``accuracy``,
    ``pos_score``, ``neg_score``, and ``hard_neg_score`` when H > 0).
  """
  b, s = q.shape
  if d_pos.shape != (b, s) or d_neg.ndim != 3 or d_neg.shape[0] != b or d_neg.shape[2] != s:
    raise ShapeError(f"chunked_info_nce: q {q.shape}, d_pos {d_pos.shape} and d_neg "
                     f"{d_neg.shape} must be [B, S], [B, S] and [B, H, S]")
  h = d_neg.shape[1]
  if b * (1 + h) < 2:
    raise ShapeError(f"chunked_info_nce needs at least 2 candidates; got B={b}, H={h}")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ConfigError(f"chunked_info_nce temperature must be > 0, got {temperature}")
  if not isinstance(num_blocks, int) or num_blocks < 1 or b % num_blocks:
    raise ConfigError(f"chunked_info_nce num_blocks={num_blocks!r} must be a positive int "
                      f"dividing the batch of {b} queries")
  q = q.astype(jnp.float32)
  candidates = jnp.concatenate([d_pos, d_neg.reshape(b * h, s)], 0).astype(jnp.float32)
  pos = jnp.sum(q * d_pos.astype(jnp.float32), -1)  # the label logits, as in info_nce

  def strided(x):  # [B, ...] -> [num_blocks, R, ...]; block j = rows j, j + num_blocks, ...
    return jnp.swapaxes(x.reshape(b // num_blocks, num_blocks, *x.shape[1:]), 0, 1)

  # Rematerialised: the backward pass recomputes a block's scores rather than keeping all blocks'.
  block = jax.checkpoint(lambda xs: _block_sums(*xs, candidates, temperature))
  ce, correct, score_sum = jax.lax.map(block, (strided(q), strided(jnp.arange(b)), strided(pos)))
  loss = jnp.sum(ce) / b
  n_scores = b * candidates.shape[0]
  metrics = {
      "info_nce": loss,
      "accuracy": jnp.sum(correct) / b,
      "pos_score": jnp.mean(pos),
      "neg_score": (jnp.sum(score_sum) - jnp.sum(pos)) / (n_scores - b),
  }
  if h:
    own_neg = jnp.einsum("bs,bhs->bh", q, d_neg.astype(jnp.float32))
    metrics["hard_neg_score"] = jnp.mean(own_neg)
  return loss, metrics
