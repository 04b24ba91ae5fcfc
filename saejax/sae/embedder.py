"""Encoder + masked mean pooling + TopK SAE: the object everything downstream loads.

``Embedder(texts) -> v (dense, D) -> z = ReLU(TopK(W_enc (v - b_pre) + b_lat))`` with z returned
both as (values, indices) and, for the losses, scattered to [N, S]. The encoder is any registered
architecture (ModernBERT, BERT family); the SAE reads its pooled output.
"""

from typing import NamedTuple

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from saejax.sae import topk as sae_lib


def mean_pool(hidden: Float[Array, "B T D"], valid: Bool[Array, "B T"]) -> Float[Array, "B D"]:
  """Masked mean over real tokens (sentence-transformers' Pooling(mean)), computed in fp32."""
  w = valid.astype(jnp.float32)[..., None]
  total = (hidden.astype(jnp.float32) * w).sum(axis=1)
  return total / jnp.maximum(w.sum(axis=1), 1e-9)


class Output(NamedTuple):
  """What the losses need from one forward pass over N texts."""
  v: Float[Array, "N D"]          # pooled dense embedding
  pre: Float[Array, "N S"]        # SAE pre-activations (for AuxK and multi-k)
  code: sae_lib.SparseCode        # top-k values / indices
  v_hat: Float[Array, "N D"]      # reconstruction from the k active latents


class Embedder(nnx.Module):
  """An encoder whose embedding layer is a TopK SAE (`sae=None`: the dense ablation)."""

  def __init__(self, encoder: nnx.Module, sae: sae_lib.SAE | None):
    self.encoder = encoder
    self.sae = sae

  def dense(self, ids: Int[Array, "N T"], valid: Bool[Array, "N T"]) -> Float[Array, "N D"]:
    """Pooled encoder output v (what the SAE reads)."""
    return mean_pool(self.encoder(ids, valid), valid)

  def __call__(self, ids: Int[Array, "N T"], valid: Bool[Array, "N T"],
               k: int | None = None) -> Output:
    return sae_output(self.sae, self.dense(ids, valid), k)


def sae_output(sae: sae_lib.SAE, v: Float[Array, "N D"], k: int | None = None) -> Output:
  """The SAE's view of pooled embeddings ``v``: pre-activations, TopK code and reconstruction.

  Shared by the end-to-end step (v from the encoder) and head training on cached embeddings
  (`saejax.train.headtrain`), so both optimise the same objective on the same code.
  """
  pre = sae.pre_activations(v)
  code = sae_lib.topk_relu(pre, sae.config.k if k is None else k)
  return Output(v, pre, code, sae.decode(code.values, code.indices))
