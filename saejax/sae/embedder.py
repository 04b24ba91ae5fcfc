"""Encoder + masked mean pooling + TopK SAE: the object everything downstream loads.

``Embedder(texts) -> v (dense, D) -> z = ReLU(TopK(W_enc (v - b_pre) + b_lat))`` with z returned
both as (values, indices) and, for the losses, scattered to [N, S]. The encoder is any registered
architecture (ModernBERT, BERT family); the SAE reads its pooled output.
"""

import hashlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


def model_fingerprint(model: Embedder) -> str:
  """16 hex digits identifying a model: its SAE config, encoder config and every parameter.

  Two checkpoints of one run (same shapes, different weights) get different fingerprints, which
  is the case that matters: codes of step 100 shown as step 150's would look plausible.
  """
  digest = hashlib.sha256()
  digest.update(repr(model.sae.config).encode())
  digest.update(repr(getattr(model.encoder, "cfg", type(model.encoder).__name__)).encode())
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
  for path, leaf in sorted(leaves, key=lambda x: jax.tree_util.keystr(x[0])):
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]
