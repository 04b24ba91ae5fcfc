"""A model from a training config: the one place where a config becomes typed objects.

`from_section` turns a config section into its frozen dataclass (an unknown key fails with its
name); `encoder_config` reads the encoder's architecture from ``config.model``; `build_model`
makes the `Embedder` (encoder from converted HF weights or a random init, then a fresh SAE);
`data_config` the data pipeline's config. Training (`saejax.train`), loading a run
(`saejax.hub.trained`), export and evaluation all build through here, so none of them needs the
training loop.
"""

import dataclasses
from pathlib import Path

import ml_collections
from flax import nnx

from saejax.data.pipeline import DataConfig
from saejax.data.sources import SourceConfig
from saejax.errors import ConfigError
from saejax.hub import convert
from saejax.models import attention
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder


def from_section(cls, section: ml_collections.ConfigDict, name: str, **extra):
  """Build a typed dataclass from a config section; unknown keys fail with their name."""
  values = {**section.to_dict(), **extra}
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ConfigError(f"config.{name} has unknown keys {unknown}; {cls.__name__} takes {sorted(known)}")
  return cls(**values)


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
  section = config.data.to_dict()
  sources = tuple(from_section(SourceConfig, ml_collections.ConfigDict(s), f"data.sources[{i}]")
                  for i, s in enumerate(section.pop("sources")))
  for key in ("buckets",):
    if key in section:
      section[key] = tuple(section[key])
  return from_section(DataConfig, ml_collections.ConfigDict(section), "data", sources=sources)


# config.model fields chosen at run time, not part of an encoder's architecture (config.json).
_RUNTIME_FIELDS = ("dtype", "attention_backend", "remat")


def encoder_config(config: ml_collections.ConfigDict, *, fetch: bool = True):
  """(architecture, encoder config) of the weights the run trains.

  With ``config.model.init_from`` the architecture is its config.json, as `build_model` loads it;
  a ``config.model.hf_config`` beside it must agree on every architecture field (a ConfigError
  names those that differ). Without init_from it is hf_config (a random init). `fetch=False` (a
  build without the weights: a shape check, or a run whose parameters come from its checkpoint)
  does not download a hub id: hf_config, checked against it when the run trained, stands in.
  """
  m = config.model
  hf_config = m.hf_config.to_dict()
  where = "config.model.hf_config"
  if m.init_from and (fetch or not hf_config or Path(m.init_from).is_dir()):
    model_dir = convert.resolve(m.init_from)
    init_config, init_where = convert.read_config(model_dir), str(model_dir / "config.json")
    if hf_config:
      _check_same_architecture(hf_config, init_config, init_where)
    hf_config, where = init_config, init_where
  elif not hf_config:
    raise ConfigError("config.model needs init_from (HF weights) or hf_config (random init)")
  arch = convert.architecture(hf_config, where)
  runtime = {"dtype": m.dtype,
             "attention_backend": m.attention_backend or attention.default_backend()}
  if m.get("remat"):
    runtime["remat"] = True  # a ConfigError below if the architecture has no remat option
  try:
    enc_cfg = dataclasses.replace(arch.config_cls.from_hf_config(hf_config), **runtime)
  except TypeError as e:
    raise ConfigError(f"config.model: {e} ({arch.model_type} does not support it)") from e
  return arch, arch.with_head(enc_cfg, False)


def _architecture_fields(hf_config: dict, where: str) -> dict:
  """The encoder's architecture as saejax reads it from `hf_config` (head and runtime excluded)."""
  arch = convert.architecture(hf_config, where)
  cfg = arch.with_head(arch.config_cls.from_hf_config(hf_config), False)
  return {"model_type": arch.model_type,
          **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUNTIME_FIELDS}}


def _check_same_architecture(hf_config: dict, init_config: dict, init_where: str) -> None:
  """config.model.hf_config must describe the network init_from's weights belong to."""
  ours = _architecture_fields(hf_config, "config.model.hf_config")
  theirs = _architecture_fields(init_config, init_where)
  fields = ["model_type"] if ours["model_type"] != theirs["model_type"] else list(ours)
  differ = [f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in fields if ours[k] != theirs[k]]
  if differ:
    raise ConfigError(f"config.model.hf_config and {init_where} (config.model.init_from) describe "
                      f"different encoders: {'; '.join(differ)}. The weights' config.json is the "
                      "encoder trained: make hf_config agree with it, or leave hf_config empty")


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs, *, load_weights: bool = True):
  """(encoder config, Embedder): the encoder from converted HF weights (config.model.init_from)
  or, without it or with `load_weights=False`, randomly initialised; then a fresh SAE."""
  arch, enc_cfg = encoder_config(config, fetch=load_weights)
  if config.model.init_from and load_weights:
    runtime = {"dtype": enc_cfg.dtype, "attention_backend": enc_cfg.attention_backend}
    if getattr(enc_cfg, "remat", False):
      runtime["remat"] = True
    enc_cfg, encoder = convert.load_hf(config.model.init_from, head=False, **runtime)
  else:
    encoder = _initialised(lambda r: arch.build(enc_cfg, rngs=r), rngs)
  if not config.sae.get("enabled", True):
    return enc_cfg, Embedder(encoder, None)
  # b_pre_init_batches and enabled are training-loop settings, not part of the SAE.
  sae_section = {k: v for k, v in config.sae.to_dict().items()
                 if k not in ("b_pre_init_batches", "enabled")}
  sae_cfg = from_section(sae_lib.SAEConfig, ml_collections.ConfigDict(sae_section), "sae",
                         d_model=enc_cfg.hidden_size)
  return enc_cfg, Embedder(encoder, _initialised(lambda r: sae_lib.SAE(sae_cfg, rngs=r), rngs))


def _initialised(make, rngs: nnx.Rngs):
  """``make(rngs)``, a randomly initialised module, with every initialiser in one compiled program.

  Run eagerly, each weight's initialiser is its own dispatch and compilation (2.4 s for the tests'
  tiny BERT + SAE on a CPU, every time: at ~60 ms each they are too small for the persistent
  compilation cache); as one program it is 0.8 s in a fresh process with that cache warm. `rngs`
  advances as it would eagerly, and the values agree with eager ones to float rounding.
  """
  return nnx.jit(make)(rngs)
