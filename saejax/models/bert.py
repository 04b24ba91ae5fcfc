"""BERT-family encoder in Flax NNX: HF `BertModel`, as used by all-MiniLM-L6-v2, BGE, E5 and GTE.

BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers", arXiv:1810.04805)
is the post-LN transformer encoder of Vaswani et al. 2017 ("Attention Is All You Need",
arXiv:1706.03762) with:
  * input embeddings = word + learned absolute position + token-type (segment) embeddings, summed
    and LayerNorm-ed (Ba et al. 2016) with a bias, eps from the config (1e-12 in BERT; sec. 3.2);
  * post-LN blocks (Vaswani et al. sec. 3.1: LayerNorm after each residual sum): multi-head
    self-attention with separate query/key/value/output Linear layers (all with bias), then an MLP
    D -> F -> D with GELU (Hendrycks & Gimpel 2016, arXiv:1606.08415): exact erf for "gelu", the
    tanh approximation for "gelu_new" / "gelu_pytorch_tanh";
  * an optional pooler, dense + tanh on the [CLS] state (BERT sec. 3.1, trained for next-sentence
    prediction). Embedding models do not use it, but BertModel checkpoints carry it, so it is kept
    as a part of the model for bit-identical round trips (`BertConfig.pooler`).

Dropout is not ported: saejax fine-tunes without it, so the forward pass is deterministic.
Attention goes through `saejax.models.attention.attention` (backend from the config; no window).
`tensor_map` and `ARCHITECTURE` register the HF state-dict layout with `saejax.hub.convert`.

Shapes use one legend: B batch, T tokens, D hidden, N heads, H head dim (D / N), F MLP intermediate.
"""

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from saejax.errors import ConfigError, DataError
from saejax.models.architecture import Architecture, TensorMap
from saejax.models.attention import BACKENDS, Backend, attention
from saejax.models.params import (Axes, ComputeDtype, check_config, check_inputs, gelu,
                                   layer_norm, linear, normal, ones, param, zeros)
from saejax.sharding import constrain_batch

Activation = Literal["gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh"]
# transformers' ACT2FN names -> the same function in JAX. "gelu"/"gelu_python" are the exact erf
# form; "gelu_new"/"gelu_pytorch_tanh" are both 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
ACTIVATIONS = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}

# config.json keys without a safe default: a file missing one is broken, not "bert-base".
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The BertModel architecture (field names as in HF config.json) plus saejax runtime choices."""
  vocab_size: int                 # rows of the word-embedding table
  hidden_size: int                # D
  num_hidden_layers: int          # number of post-LN blocks
  num_attention_heads: int        # N; head dim H = D / N
  intermediate_size: int          # F
  max_position_embeddings: int    # rows of the position table = longest input
  type_vocab_size: int = 2        # rows of the token-type (segment) table
  layer_norm_eps: float = 1e-12
  hidden_act: Activation = "gelu"
  pad_token_id: int | None = 0    # only carried to config.json; padding is given by `valid`
  pooler: bool = True             # keep the [CLS] dense + tanh pooler (the checkpoint has it)
  attention_backend: Backend = "xla"  # saejax runtime choice, not part of config.json
  dtype: ComputeDtype = "float32"     # compute dtype; parameters stay in their own dtype

  def __post_init__(self):
    check_config(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size", "max_position_embeddings", "type_vocab_size"))
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                        f"{sorted(ACTIVATIONS)}")
    if self.attention_backend not in BACKENDS:
      raise ConfigError(f"attention_backend {self.attention_backend!r} is not one of {BACKENDS}")
    if not self.layer_norm_eps > 0:
      raise ConfigError(f"layer_norm_eps must be positive; got {self.layer_norm_eps}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_config(cls, d: dict, **overrides) -> "BertConfig":
    """Read an HF config.json dict (`model_type` "bert"), refusing what this port does not run.

    Args:
      d: the parsed config.json.
      overrides: saejax fields to set (e.g. ``pooler=False``, ``attention_backend="splash"``).
    """
    if d.get("model_type", "bert") != "bert":
      raise ConfigError(f"config model_type {d.get('model_type')!r} is not 'bert'")
    position = d.get("position_embedding_type", "absolute")
    if position != "absolute":
      raise ConfigError(f"config position_embedding_type {position!r} is not supported; saejax's "
                        "BERT has learned absolute positions only ('absolute')")
    for key in ("is_decoder", "add_cross_attention"):
      if d.get(key):
        raise ConfigError(f"config {key}=true is not supported: saejax's BERT is an encoder only")
    if "embedding_size" in d and d["embedding_size"] != d.get("hidden_size"):
      raise ConfigError(f"config embedding_size {d['embedding_size']} differs from hidden_size "
                        f"{d.get('hidden_size')} (ALBERT-style factorised embeddings): unsupported")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
      raise ConfigError(f"config lacks the required keys {missing}")
    fields = {f.name for f in dataclasses.fields(cls)} - {"pooler", "attention_backend", "dtype"}
    kwargs = {k: v for k, v in d.items() if k in fields}
    return cls(**{**kwargs, **overrides})

  def to_hf_config(self) -> dict:
    """A config.json dict that transformers' `BertConfig(**d)` and `AutoModel` accept.

    HF builds BertModel with a pooler whatever the config says, so a model saved with
    ``pooler=False`` loads in transformers with a freshly initialised (unused) pooler.
    """
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "intermediate_size": self.intermediate_size,
        "max_position_embeddings": self.max_position_embeddings,
        "type_vocab_size": self.type_vocab_size,
        "layer_norm_eps": self.layer_norm_eps,
        "hidden_act": self.hidden_act,
        "pad_token_id": self.pad_token_id,
        "position_embedding_type": "absolute",  # read by transformers < 5
        # BERT's standard training values, for HF users who train the export; saejax uses none.
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
        "initializer_range": 0.02,
        "is_decoder": False,
        "add_cross_attention": False,
    }


class Dense(nnx.Module):
  """A Linear layer with bias; the kernel is [in, out], the transpose of torch's weight."""

  def __init__(self, d_in: int, d_out: int, axes: Axes, bias_axes: Axes, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.kernel = param(rngs, normal(), (d_in, d_out), axes, param_dtype)
    self.bias = param(rngs, zeros(), (d_out,), bias_axes, param_dtype)

  def __call__(self, x: Float[Array, "... I"]) -> Float[Array, "... O"]:
    return linear(x, self.kernel[...], self.bias[...])


class Norm(nnx.Module):
  """LayerNorm with bias (PyTorch semantics: fp32, exact variance, eps from the config)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.scale = param(rngs, ones(), (cfg.hidden_size,), (None,), param_dtype)
    self.bias = param(rngs, zeros(), (cfg.hidden_size,), (None,), param_dtype)
    self.eps = cfg.layer_norm_eps

  def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Embeddings(nnx.Module):
  """LayerNorm(word[ids] + token_type[types] + position[0..T-1]) (BERT sec. 3.2, Figure 2)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    d = cfg.hidden_size
    self.word = param(rngs, normal(), (cfg.vocab_size, d), ("vocab", "embed"), param_dtype)
    self.position = param(rngs, normal(), (cfg.max_position_embeddings, d), ("position", "embed"),
                          param_dtype)
    self.token_type = param(rngs, normal(), (cfg.type_vocab_size, d), ("type", "embed"),
                            param_dtype)
    self.norm = Norm(cfg, rngs=rngs, param_dtype=param_dtype)
    self.dtype = cfg.dtype

  def __call__(self, input_ids: Int[Array, "B T"], token_type_ids: Int[Array, "B T"]
               ) -> Float[Array, "B T D"]:
    t = input_ids.shape[1]
    # Summed in fp32 in HF's order ((word + type) + position) and normalised before the cast, so
    # the fp32 path matches transformers to rounding and bf16 only rounds the normalised result.
    x = self.word[...][input_ids].astype(jnp.float32)
    x = x + self.token_type[...][token_type_ids].astype(jnp.float32)
    x = x + self.position[...][:t].astype(jnp.float32)[None]
    return self.norm(x).astype(self.dtype)


class SelfAttention(nnx.Module):
  """Multi-head self-attention, then post-LN: norm(x + output(attention(q, k, v)))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    d = cfg.hidden_size
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.query = Dense(d, d, ("embed", "heads"), ("heads",), **kw)
    self.key = Dense(d, d, ("embed", "heads"), ("heads",), **kw)
    self.value = Dense(d, d, ("embed", "heads"), ("heads",), **kw)
    self.output = Dense(d, d, ("heads", "embed"), (None,), **kw)
    self.norm = Norm(cfg, **kw)
    self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
    self.backend = cfg.attention_backend

  def __call__(self, x: Float[Array, "B T D"], valid: Bool[Array, "B T"]) -> Float[Array, "B T D"]:
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
    out = attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), valid=valid,
                    window=None, backend=self.backend)
    return self.norm(x + self.output(out.reshape(b, t, d)))


class Layer(nnx.Module):
  """One post-LN block: attention sub-block, then norm(x + output(act(intermediate(x))))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.attention = SelfAttention(cfg, **kw)
    self.intermediate = Dense(d, f, ("embed", "mlp"), ("mlp",), **kw)
    self.output = Dense(f, d, ("mlp", "embed"), (None,), **kw)
    self.norm = Norm(cfg, **kw)
    self.hidden_act = cfg.hidden_act  # a name, so the graph stays hashable and printable

  def __call__(self, x: Float[Array, "B T D"], valid: Bool[Array, "B T"]) -> Float[Array, "B T D"]:
    x = self.attention(x, valid)
    return self.norm(x + self.output(ACTIVATIONS[self.hidden_act](self.intermediate(x))))


class BertModel(nnx.Module):
  """HF BertModel: embeddings, post-LN layers and (with `cfg.pooler`) the [CLS] pooler."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.cfg = cfg
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.embeddings = Embeddings(cfg, **kw)
    self.layers = nnx.List([Layer(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
    d = cfg.hidden_size
    # "mlp" on the output side: a second "embed" would name the same mesh axis twice.
    self.pooler = Dense(d, d, ("embed", "mlp"), ("mlp",), **kw) if cfg.pooler else None

  def __call__(self, input_ids: Int[Array, "B T"], valid: Bool[Array, "B T"],
               token_type_ids: Int[Array, "B T"] | None = None) -> Float[Array, "B T D"]:
    """Last hidden state, in the compute dtype `cfg.dtype`.

    Args:
      input_ids: token ids, right- or left-padded (positions count from column 0, as in HF).
      valid: True at real tokens; padded keys are masked out of attention. Rows at padded
        positions are unspecified (as in HF): pool over `valid` only.
      token_type_ids: segment ids (0 everywhere when None, as in HF).
    """
    valid = check_inputs(input_ids, valid)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    elif token_type_ids.shape != input_ids.shape:
      raise DataError(f"token_type_ids {token_type_ids.shape} differ from input_ids "
                      f"{input_ids.shape}")
    t, limit = input_ids.shape[1], self.cfg.max_position_embeddings
    if t > limit:
      raise ConfigError(f"input length {t} exceeds max_position_embeddings {limit}: truncate "
                        f"inputs to at most {limit} tokens")
    x = self.embeddings(input_ids, token_type_ids)
    for layer in self.layers:
      x = constrain_batch(layer(x, valid))  # keep activations batch-sharded under FSDP
    return x

  def pool(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B D"]:
    """BERT's pooler output: tanh(dense(hidden[:, 0])), the [CLS] position."""
    if self.pooler is None:
      raise ConfigError("this BertModel was built without the pooler (cfg.pooler=False)")
    return jnp.tanh(self.pooler(hidden[:, 0]))


def num_params(model: nnx.Module) -> int:
  """Number of parameters of a concrete or abstract (eval_shape) model."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def tensor_map(cfg: BertConfig) -> list[TensorMap]:
  """HF BertModel state-dict keys (no "bert." prefix), one row per saejax parameter."""
  T = TensorMap

  def linear(key: str, path: tuple) -> list[TensorMap]:
    return [T(key + ".weight", path + ("kernel",), transpose=True),
            T(key + ".bias", path + ("bias",))]

  def norm(key: str, path: tuple) -> list[TensorMap]:
    return [T(key + ".weight", path + ("scale",)), T(key + ".bias", path + ("bias",))]

  rows = [T("embeddings.word_embeddings.weight", ("embeddings", "word")),
          T("embeddings.position_embeddings.weight", ("embeddings", "position")),
          T("embeddings.token_type_embeddings.weight", ("embeddings", "token_type")),
          *norm("embeddings.LayerNorm", ("embeddings", "norm"))]
  for i in range(cfg.num_hidden_layers):
    k, p = f"encoder.layer.{i}.", ("layers", i)
    rows += [*linear(k + "attention.self.query", p + ("attention", "query")),
             *linear(k + "attention.self.key", p + ("attention", "key")),
             *linear(k + "attention.self.value", p + ("attention", "value")),
             *linear(k + "attention.output.dense", p + ("attention", "output")),
             *norm(k + "attention.output.LayerNorm", p + ("attention", "norm")),
             *linear(k + "intermediate.dense", p + ("intermediate",)),
             *linear(k + "output.dense", p + ("output",)),
             *norm(k + "output.LayerNorm", p + ("norm",))]
  if cfg.pooler:
    rows += linear("pooler.dense", ("pooler",))
  return rows


# Pre-training heads of BertForPreTraining / BertForMaskedLM checkpoints (e.g. bert-base-uncased):
# an encoder does not use them, so they are dropped on load as transformers' AutoModel does.
PRETRAINING_HEAD_KEYS = tuple("cls." + k for k in (
    "predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias",
    "predictions.transform.dense.weight", "predictions.transform.dense.bias",
    "predictions.transform.LayerNorm.weight", "predictions.transform.LayerNorm.bias",
    "seq_relationship.weight", "seq_relationship.bias"))

ARCHITECTURE = Architecture(
    model_type="bert", base_architecture="BertModel", prefix="bert.", config_cls=BertConfig,
    head_field="pooler", build=BertModel, tensor_map=tensor_map,
    # position_ids: an arange buffer that transformers < 4.31 saved; positions are recomputed here.
    ignored_keys=("embeddings.position_ids", *PRETRAINING_HEAD_KEYS))
