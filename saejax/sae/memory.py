"""A cross-batch memory of recent documents, used as extra negatives (XBM, Wang et al. 2020).

Stage 2 trains the encoder at a small batch (32 pairs on a CPU): the in-batch task is solved within
a few steps (InfoNCE ~0.001) and the retrieval terms stop teaching anything. The memory keeps the
retrieval embeddings of the last M positives, detached, in a ring, and every query is also scored
against them: M more negatives at the cost of a [B, M] score matrix, no encoder compute. The
entries are a few steps stale; at stage 2's learning rates they move little in M / B steps, which
is what XBM relies on.

A bank entry is the positive's unit code as (values, indices), so the score against a dense query
code is a gather over k indices (no [M, S] matrix), and its unit pooled embedding v for the dense
InfoNCE term (the dense arm keeps only v). Each entry also keeps a hash of its token ids: an entry
holding the same text as a query's own positive or as the query itself would be a false negative,
and is masked out of that query's candidates (data repeats within M / B steps when a small source
cycles).

Pure functions over a dict of arrays that lives in `saejax.hub.state.TrainState`, so the bank is
checkpointed with the run and a resumed run continues with the same negatives.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from saejax.errors import ShapeError

Bank = dict[str, Array]  # "v" [M, D], "valid" [M] (0/1), "text_hash" [M]; "values"/"indices" [M, k]

_HASH_BASE = 1_000_003  # any odd multiplier: the hash is a polynomial in it, mod 2^32


def init_bank(size: int, d_model: int, k: int | None) -> Bank:
  """An empty bank of `size` entries of width ``d_model`` (and k code values when `k`)."""
  bank = {"v": jnp.zeros((size, d_model), jnp.float32), "valid": jnp.zeros((size,), jnp.int32),
          "text_hash": jnp.zeros((size,), jnp.int32)}
  if k is not None:
    bank["values"] = jnp.zeros((size, k), jnp.float32)
    bank["indices"] = jnp.zeros((size, k), jnp.int32)
  return bank


def text_hash(ids: Int[Array, "N T"], valid: Bool[Array, "N T"]) -> Int[Array, "N"]:
  """A 32-bit hash of each row's real tokens, the same at any padded length (padding adds 0)."""
  t = ids.shape[-1]
  powers = jnp.cumprod(jnp.full((t,), _HASH_BASE, jnp.uint32))  # wraps mod 2^32, deterministically
  terms = (ids.astype(jnp.uint32) + 1) * powers * valid.astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(jnp.sum(terms, -1, dtype=jnp.uint32), jnp.int32)


def sparse_scores(q: Float[Array, "B S"], values: Float[Array, "M K"],
                  indices: Int[Array, "M K"]) -> Float[Array, "B M"]:
  """Dot products of dense query codes with sparse bank codes: a gather over the k indices."""
  if values.shape != indices.shape:
    raise ShapeError(f"bank values {values.shape} and indices {indices.shape} differ")
  return jnp.einsum("bmk,mk->bm", q.astype(jnp.float32)[:, indices], values.astype(jnp.float32))


def candidate_mask(bank: Bank, q_hash: Int[Array, "B"], pos_hash: Int[Array, "B"]
                   ) -> Bool[Array, "B M"]:
  """Which bank entries are negatives for each query: filled, and neither its positive's text nor
  its own."""
  h = bank["text_hash"][None, :]
  return (bank["valid"][None, :] > 0) & (h != pos_hash[:, None]) & (h != q_hash[:, None])


def masked(scores: Float[Array, "B M"], mask: Bool[Array, "B M"]) -> Float[Array, "B M"]:
  """Scores with the excluded entries at -inf (they drop out of a softmax)."""
  return jnp.where(mask, scores, -jnp.inf)


def push(bank: Bank, entries: Bank, step: Int[Array, ""]) -> Bank:
  """Write B new entries over the oldest ones: slot ``(step mod M/B) * B`` (M a multiple of B)."""
  size, b = bank["valid"].shape[0], entries["text_hash"].shape[0]
  if size % b:
    raise ShapeError(f"memory bank size {size} is not a multiple of the global batch {b}")
  start = (step % (size // b)) * b
  entries = {**entries, "valid": jnp.ones((b,), jnp.int32)}
  return {name: jax.lax.dynamic_update_slice_in_dim(bank[name], entries[name].astype(
      bank[name].dtype), start, 0) for name in bank}
