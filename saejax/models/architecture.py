"""How an encoder family describes itself to the converters: `Architecture` and `TensorMap`.

Data only: each model module (`modernbert`, `bert`) declares one `Architecture` (its config class,
how to build it, and one `TensorMap` row per weight tying the weight to its Hugging Face state-dict
key). Reading and writing files is `saejax.hub.convert`'s job; nothing here knows a file format.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

Path_ = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One weight: its HF state-dict key and where it lives in the saejax model."""
  hf_key: str             # key in the base model (e.g. ModernBertModel), or in the task model
  path: Path_             # path in nnx.state(model), e.g. ("layers", 0, "attn", "wqkv")
  transpose: bool = False  # torch Linear weight [out, in] <-> saejax kernel [in, out]
  in_base: bool = True    # False for task-head tensors, which sit outside the base-model prefix


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How to build one encoder family from an HF config and where its tensors go.

  ``config_cls`` has ``from_hf_config(dict)``, ``to_hf_config()`` and a boolean field named
  ``head_field`` that switches the optional head (ModernBERT's MLM head, BERT's pooler).
  """
  model_type: str           # config.json "model_type"
  base_architecture: str    # e.g. "ModernBertModel"; other "architectures" prefix the base keys
  prefix: str               # base-model prefix inside task models, e.g. "model." or "bert."
  config_cls: type
  head_field: str
  build: Callable[..., nnx.Module]              # build(cfg, *, rngs, param_dtype) -> model
  tensor_map: Callable[[Any], list[TensorMap]]  # tensor_map(cfg) -> one row per parameter
  ignored_keys: tuple[str, ...] = ()  # buffers some checkpoints carry (e.g. position_ids)

  def with_head(self, cfg, on: bool):
    return dataclasses.replace(cfg, **{self.head_field: on})
