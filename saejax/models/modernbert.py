"""ModernBERT encoder in Flax NNX, ported from the released architecture.

ModernBERT (Warner et al. 2024, "Smarter, Better, Faster, Longer", arXiv:2412.13663) is a pre-norm
bidirectional transformer with:
  * token embeddings followed by a bias-free LayerNorm (no position embeddings, sec. 2.1.1);
  * rotary position embeddings (Su et al. 2021), NeoX half-split layout over the full head dim,
    computed in fp32, theta 160,000 on global layers and 10,000 on local layers (sec. 2.1.3);
  * alternating attention (sec. 2.1.3): layer kinds are data (`layer_types`); released models make
    every third layer global (layer i global when i % 3 == 0) and the rest attend within a
    bidirectional sliding window of `local_attention` tokens (|q - k| <= local_attention // 2, as
    transformers computes it, so an odd width such as 15 is a half-window of 7);
  * a fused, bias-free Wqkv projection whose output is laid out (3, heads, head_dim);
  * GeGLU MLP (Shazeer 2020): Wi's output splits in two halves, exact-erf GELU on the first, the
    second is the gate;
  * no biases anywhere, LayerNorm eps 1e-5, no attn_norm on layer 0 (embeddings are normed already);
  * a final LayerNorm, and an optional masked-LM head whose decoder is tied to the token
    embeddings (released models) or, with `tie_word_embeddings=False`, a matrix of its own.
Dropout is not ported: every released checkpoint has it at 0.

Shapes use one legend: B batch, T tokens, D hidden, N heads, H head dim, F MLP intermediate, V vocab.
"""

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from saejax.errors import ConfigError
from saejax.models import fused_norm
from saejax.models.architecture import Architecture, TensorMap
from saejax.models.attention import Backend, attention
from saejax.models.params import (ComputeDtype, add_layer_norm, check_config, check_inputs, gelu,
                                  layer_norm, linear, normal, ones, param, zeros)
from saejax.sharding import constrain_batch

LayerType = Literal["full_attention", "sliding_attention"]


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
  """The released ModernBERT architecture; defaults are ModernBERT-base."""
  vocab_size: int = 50368
  hidden_size: int = 768
  intermediate_size: int = 1152        # F; Wi outputs 2F (GeGLU input and gate)
  num_hidden_layers: int = 22
  num_attention_heads: int = 12
  max_position_embeddings: int = 8192
  layer_types: tuple[LayerType, ...] = tuple(
      "full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22))
  global_rope_theta: float = 160_000.0
  local_rope_theta: float = 10_000.0
  local_attention: int = 128           # full window width; half of it on each side
  norm_eps: float = 1e-5
  pad_token_id: int = 50283
  bos_token_id: int = 50281
  eos_token_id: int = 50282
  cls_token_id: int = 50281
  sep_token_id: int = 50282
  mlm_head: bool = False               # keep the masked-LM head (for complete checkpoints)
  tie_word_embeddings: bool = True     # MLM decoder weight = token embeddings; else its own [V, D]
  decoder_bias: bool = True            # the MLM decoder adds a [V] bias
  attention_backend: Backend = "xla"   # saejax runtime choice, not part of config.json
  dtype: ComputeDtype = "float32"      # compute dtype; parameters stay in their own dtype
  remat: bool = False                  # recompute each block in the backward pass (saves memory)

  def __post_init__(self):
    check_config(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "max_position_embeddings"))
    if (self.hidden_size // self.num_attention_heads) % 2:
      raise ConfigError("RoPE needs an even head dim; got "
                        f"{self.hidden_size // self.num_attention_heads}")
    if len(self.layer_types) != self.num_hidden_layers:
      raise ConfigError(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                        f"{self.num_hidden_layers}")
    bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
    if bad:
      raise ConfigError(f"unknown layer_types {bad}; expected full_attention / sliding_attention")
    if not isinstance(self.local_attention, int) or self.local_attention < 0:
      raise ConfigError(f"local_attention must be a non-negative int (the sliding window's width); "
                        f"got {self.local_attention!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def window(self) -> int:
    """Half-width of the local window: a query sees keys with |q - k| <= window.

    transformers' `ModernBertConfig.sliding_window` is ``local_attention // 2`` (rounded down, so
    an odd width of 15 sees 7 keys on each side) and its mask keeps ``|q - k| <= sliding_window``.
    """
    return self.local_attention // 2

  @classmethod
  def from_hf_config(cls, d: dict, **overrides) -> "ModernBertConfig":
    """Read an HF config.json dict in either dialect.

    transformers >= 5 writes `layer_types` and `rope_parameters` (nested by layer type); older files
    write `global_attn_every_n_layers`, `global_rope_theta` and `local_rope_theta`.
    """
    if d.get("model_type", "modernbert") != "modernbert":
      raise ConfigError(f"model_type {d.get('model_type')!r} is not modernbert")
    unsupported = {k: d[k] for k in ("norm_bias", "attention_bias", "mlp_bias", "classifier_bias")
                   if d.get(k)}
    if unsupported:
      raise ConfigError(f"ModernBERT variants with biases {unsupported} are not the released "
                        "architecture and are not supported")
    for key in ("hidden_activation", "classifier_activation"):
      if d.get(key, "gelu") != "gelu":
        raise ConfigError(f"{key}={d[key]!r} is not supported; released ModernBERT uses 'gelu'")
    n = d.get("num_hidden_layers", 22)
    if d.get("layer_types"):
      layer_types = tuple(d["layer_types"])
    else:
      every = d.get("global_attn_every_n_layers", 3)
      layer_types = tuple("full_attention" if i % every == 0 else "sliding_attention"
                          for i in range(n))
    rope = d.get("rope_parameters") or {}
    for kind, params in rope.items():
      if params and params.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters[{kind!r}] rope_type {params['rope_type']!r} is not "
                          "supported (only 'default')")
    # Older files' `rope_scaling` (rope_type, or its older name "type"): transformers 5 merges it
    # into both layer types' rope_parameters, so a scaled one changes every layer's RoPE.
    scaling = d.get("rope_scaling") or {}
    scaling_type = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling_type != "default":
      raise ConfigError(f"rope_scaling rope_type {scaling_type!r} is not supported (only "
                        "'default'): transformers applies it to every layer's RoPE")
    global_theta = (rope.get("full_attention") or {}).get(
        "rope_theta", d.get("global_rope_theta", 160_000.0))
    local_theta = (rope.get("sliding_attention") or {}).get(
        "rope_theta", d.get("local_rope_theta", 10_000.0))
    # The compute dtype is a saejax setting (config.model.dtype), never a file's: transformers 5
    # writes "dtype" into config.json, the dtype its weights are stored in (as BertConfig reads).
    fields = {f.name for f in dataclasses.fields(cls)} - {"layer_types", "dtype"}
    kwargs = {k: v for k, v in d.items() if k in fields and v is not None}
    # transformers 5's `sliding_window` is a property whose setter rewrites local_attention to
    # twice it, so a file carrying one takes its window from there (only rewritten where the two
    # disagree: an odd local_attention of 15 and sliding_window 7 are the same window).
    half = d.get("sliding_window")
    if half is not None and half != kwargs.get("local_attention", cls.local_attention) // 2:
      kwargs["local_attention"] = 2 * half
    # The MLM head is part of the model when config.json names the MaskedLM task model.
    kwargs.setdefault("mlm_head", "ModernBertForMaskedLM" in (d.get("architectures") or []))
    return cls(**{**kwargs, "num_hidden_layers": n, "layer_types": layer_types,
                  "global_rope_theta": float(global_theta), "local_rope_theta": float(local_theta),
                  **overrides})

  def to_hf_config(self) -> dict:
    """A transformers-5 config.json dict (the `layer_types` + `rope_parameters` dialect)."""
    return {
        "architectures": ["ModernBertForMaskedLM" if self.mlm_head else "ModernBertModel"],
        "model_type": "modernbert",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "max_position_embeddings": self.max_position_embeddings,
        "layer_types": list(self.layer_types),
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
        },
        "local_attention": self.local_attention,
        "norm_eps": self.norm_eps,
        "norm_bias": False, "attention_bias": False, "mlp_bias": False, "classifier_bias": False,
        "hidden_activation": "gelu", "classifier_activation": "gelu",
        "decoder_bias": self.decoder_bias, "tie_word_embeddings": self.tie_word_embeddings,
        "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id, "cls_token_id": self.cls_token_id,
        "sep_token_id": self.sep_token_id,
        "initializer_range": 0.02,
    }


def rope_tables(positions: Int[Array, "T"], head_dim: int, theta: float
                ) -> tuple[Float[Array, "T H"], Float[Array, "T H"]]:
  """cos and sin of NeoX-layout RoPE, in fp32 (the frequencies repeat over the two halves)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Float[Array, "B T N H"], cos: Float[Array, "T H"], sin: Float[Array, "T H"]
               ) -> Float[Array, "B T N H"]:
  """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] on the two halves."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x.astype(jnp.float32) * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Fused-QKV multi-head attention with RoPE; global or sliding-window by layer type."""

  def __init__(self, cfg: ModernBertConfig, layer_type: LayerType, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    d = cfg.hidden_size
    self.wqkv = param(rngs, normal(), (d, 3 * d), ("embed", "heads"), param_dtype)
    self.wo = param(rngs, normal(), (d, d), ("heads", "embed"), param_dtype)
    self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
    self.window = cfg.window if layer_type == "sliding_attention" else None
    self.theta = cfg.local_rope_theta if layer_type == "sliding_attention" else cfg.global_rope_theta
    self.backend = cfg.attention_backend

  def __call__(self, x: Float[Array, "B T D"], valid: Bool[Array, "B T"]) -> Float[Array, "B T D"]:
    b, t, d = x.shape
    # Wqkv's columns are (3, heads, head_dim): q, k and v are its three column blocks. Three GEMMs
    # on slices of the weight instead of one and a split of its output: the backward pass then sums
    # three input gradients in GEMM epilogues instead of writing a [B, T, 3D] concatenation of dq,
    # dk and dv (3.5 ms of a 97 ms ModernBERT-base step on an H200; RESULTS.md "GPU", session 34).
    wqkv = self.wqkv[...]
    q, k, v = (linear(x, wqkv[:, i * d:(i + 1) * d]).reshape(b, t, self.num_heads, self.head_dim)
               for i in range(3))
    cos, sin = rope_tables(jnp.arange(t), self.head_dim, self.theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attention(q, k, v, valid=valid, window=self.window, backend=self.backend)
    return linear(out.reshape(b, t, d), self.wo[...])


class GeGLU(nnx.Module):
  """Wi -> (gelu(first half) * second half) -> Wo."""

  def __init__(self, cfg: ModernBertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.wi = param(rngs, normal(), (d, 2 * f), ("embed", "mlp"), param_dtype)
    self.wo = param(rngs, normal(), (f, d), ("mlp", "embed"), param_dtype)

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    # Two GEMMs on Wi's column halves rather than one and a split: as in Attention, the backward
    # pass adds two input gradients instead of concatenating d(h) and d(gate) into [B, T, 2F].
    wi, f = self.wi[...], self.wo.shape[0]
    h, gate = linear(x, wi[:, :f]), linear(x, wi[:, f:])
    return linear(gelu(h) * gate, self.wo[...])


class Norm(nnx.Module):
  """Bias-free LayerNorm (PyTorch semantics: exact variance, eps from config).

  On the NVIDIA path (attention backend "cudnn") it runs as `fused_norm`'s Triton kernels, the same
  function: XLA's own LayerNorm cost an H200 train step four times its memory traffic (RESULTS.md
  "GPU", session 35). Elsewhere (and with a JAX that lacks Pallas's Triton backend) it is
  `params.layer_norm`, which XLA:CPU and XLA:TPU fuse well.
  """

  def __init__(self, cfg: ModernBertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.scale = param(rngs, ones(), (cfg.hidden_size,), (None,), param_dtype)
    self.eps = cfg.norm_eps
    self.fused = cfg.attention_backend == "cudnn" and fused_norm.wanted()

  def __call__(self, x):
    norm = fused_norm.layer_norm if self.fused else layer_norm
    return norm(x, self.scale[...], None, self.eps)

  def add(self, x, residual):
    """(x + residual, its norm): the residual add and this norm in one kernel where fused."""
    add_norm = fused_norm.add_layer_norm if self.fused else add_layer_norm
    return add_norm(x, residual, self.scale[...], None, self.eps)


class Block(nnx.Module):
  """Pre-norm block: x + attn(attn_norm(x)); x + mlp(mlp_norm(x))."""

  def __init__(self, cfg: ModernBertConfig, index: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    # Layer 0 reads the already-normalised embeddings, so it has no attn_norm (Identity in HF).
    self.attn_norm = Norm(cfg, rngs=rngs, param_dtype=param_dtype) if index > 0 else None
    self.attn = Attention(cfg, cfg.layer_types[index], rngs=rngs, param_dtype=param_dtype)
    self.mlp_norm = Norm(cfg, rngs=rngs, param_dtype=param_dtype)
    self.mlp = GeGLU(cfg, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x, valid):
    h = self.attn_norm(x) if self.attn_norm is not None else x
    x, h = self.mlp_norm.add(x, self.attn(h, valid))
    return x + self.mlp(h)


class ModernBert(nnx.Module):
  """ModernBertModel (and, with `cfg.mlm_head`, the ModernBertForMaskedLM head)."""

  def __init__(self, cfg: ModernBertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.cfg = cfg
    self.tok_embeddings = param(rngs, normal(), (cfg.vocab_size, cfg.hidden_size),
                                ("vocab", "embed"), param_dtype)
    self.emb_norm = Norm(cfg, rngs=rngs, param_dtype=param_dtype)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs, param_dtype=param_dtype)
                            for i in range(cfg.num_hidden_layers)])
    self.final_norm = Norm(cfg, rngs=rngs, param_dtype=param_dtype)
    if cfg.mlm_head:
      d = cfg.hidden_size
      self.head_dense = param(rngs, normal(), (d, d), ("embed", "mlp"), param_dtype)
      self.head_norm = Norm(cfg, rngs=rngs, param_dtype=param_dtype)
      # An untied decoder has the embedding table's layout [V, D] (torch Linear weight [out, in]).
      self.decoder = (None if cfg.tie_word_embeddings else
                      param(rngs, normal(), (cfg.vocab_size, d), ("vocab", "embed"), param_dtype))
      self.decoder_bias = (param(rngs, zeros(), (cfg.vocab_size,), ("vocab",), param_dtype)
                           if cfg.decoder_bias else None)

  def __call__(self, input_ids: Int[Array, "B T"], valid: Bool[Array, "B T"] | None = None
               ) -> Float[Array, "B T D"]:
    """Last hidden state. Rows at padded positions are unspecified (as in HF)."""
    if valid is None:
      valid = jnp.ones(input_ids.shape, bool)
    valid = check_inputs(input_ids, valid)
    t, limit = input_ids.shape[1], self.cfg.max_position_embeddings
    if t > limit:
      raise ConfigError(f"input length {t} exceeds max_position_embeddings {limit}: truncate "
                        f"inputs to at most {limit} tokens")
    # Gather, then cast: casting the whole [V, D] table first costs a pass over it every call, and
    # its gradient would be a dense [V, D] in the compute dtype, summed in bf16 where ids repeat.
    x = self.tok_embeddings[...][input_ids].astype(self.cfg.dtype)
    x = self.emb_norm(x)
    for block in self.layers:
      # remat keeps only each block's input for the backward pass: activation memory of one block
      # instead of all of them, for ~1/3 more compute (Chen et al. 2016).
      x = nnx.remat(lambda blk, h: blk(h, valid))(block, x) if self.cfg.remat else block(x, valid)
      x = constrain_batch(x)
    return self.final_norm(x)

  def mlm_logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
    """Masked-LM logits from the last hidden state: decoder(norm(gelu(dense(hidden)))).

    The decoder weight is the token embedding table, or its own matrix when the checkpoint was
    saved with ``tie_word_embeddings=False``.
    """
    if not self.cfg.mlm_head:
      raise ConfigError("this ModernBert was built without the MLM head (cfg.mlm_head=False)")
    h = gelu(linear(hidden, self.head_dense[...]))
    h = self.head_norm(h)
    weight = self.tok_embeddings if self.decoder is None else self.decoder
    bias = None if self.decoder_bias is None else self.decoder_bias[...]
    return linear(h, weight[...].T, bias)


def num_params(model: nnx.Module) -> int:
  """Number of parameters of a concrete or abstract (eval_shape) model."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def tensor_map(cfg: ModernBertConfig) -> list[TensorMap]:
  """HF ModernBertModel state-dict keys (ModernBertForMaskedLM adds the head rows)."""
  T = TensorMap
  rows = [T("embeddings.tok_embeddings.weight", ("tok_embeddings",)),
          T("embeddings.norm.weight", ("emb_norm", "scale"))]
  for i in range(cfg.num_hidden_layers):
    p = f"layers.{i}."
    if i > 0:
      rows.append(T(p + "attn_norm.weight", ("layers", i, "attn_norm", "scale")))
    rows += [T(p + "attn.Wqkv.weight", ("layers", i, "attn", "wqkv"), transpose=True),
             T(p + "attn.Wo.weight", ("layers", i, "attn", "wo"), transpose=True),
             T(p + "mlp_norm.weight", ("layers", i, "mlp_norm", "scale")),
             T(p + "mlp.Wi.weight", ("layers", i, "mlp", "wi"), transpose=True),
             T(p + "mlp.Wo.weight", ("layers", i, "mlp", "wo"), transpose=True)]
  rows.append(T("final_norm.weight", ("final_norm", "scale")))
  if cfg.mlm_head:
    rows += [T("head.dense.weight", ("head_dense",), transpose=True, in_base=False),
             T("head.norm.weight", ("head_norm", "scale"), in_base=False)]
    # A tied decoder.weight is tok_embeddings: never written (a differing copy unties it in HF).
    if not cfg.tie_word_embeddings:
      rows.append(T("decoder.weight", ("decoder",), in_base=False))
    if cfg.decoder_bias:
      rows.append(T("decoder.bias", ("decoder_bias",), in_base=False))
  return rows


ARCHITECTURE = Architecture(
    model_type="modernbert", base_architecture="ModernBertModel", prefix="model.",
    config_cls=ModernBertConfig, head_field="mlm_head", build=ModernBert, tensor_map=tensor_map,
    # A tied decoder.weight may be stored by some writers; it is the token embedding, so skip it.
    ignored_keys=("decoder.weight",))
