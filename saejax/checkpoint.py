"""Orbax checkpoints of saejax parameters.

An encoder checkpoint directory holds ``config.json`` (the Hugging Face dialect, so the same file
describes the model on both sides) and ``params/`` (an Orbax checkpoint of the nnx parameter
state). Restoring builds the model abstractly first, so parameters are read straight into their
target shardings without an intermediate random init.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from saejax import convert
from saejax.errors import CheckpointError


def save_encoder(cfg, model: nnx.Module, directory: str | os.PathLike) -> Path:
  """Write config.json and an Orbax checkpoint of the parameters to `directory`."""
  directory = Path(directory).absolute()
  if (directory / "params").exists():
    raise CheckpointError(f"{directory / 'params'} exists; refusing to overwrite a checkpoint")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", nnx.state(model, nnx.Param))
  (directory / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
  return directory


def restore_encoder(directory: str | os.PathLike, *, shardings=None, **overrides):
  """Read a directory written by `save_encoder`: returns (config, model).

  Args:
    shardings: optional pytree of `jax.sharding.Sharding` matching the parameter state, to restore
      each array directly into its place on the current mesh.
    overrides: config fields to replace (e.g. ``attention_backend``).
  """
  directory = Path(directory).absolute()
  hf_config = convert.read_config(directory)
  arch = convert.architecture(hf_config, str(directory / "config.json"))
  cfg = dataclasses.replace(arch.config_cls.from_hf_config(hf_config), **overrides)
  if not (directory / "params").is_dir():
    raise CheckpointError(f"{directory} has no params/ checkpoint")
  abstract = nnx.eval_shape(lambda: arch.build(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  if shardings is not None:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          target, shardings)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(directory / "params", target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{directory / 'params'} does not fit the model of its config.json: "
                          f"{e}") from e
  nnx.update(abstract, restored)
  return cfg, abstract
