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


class TrainCheckpointer:
  """Orbax CheckpointManager for a training run: the TrainState plus the data iterator's state.

  Saves are asynchronous (the step loop goes on while arrays are written) and atomic: Orbax writes
  into a temporary directory and renames it when complete, so a run killed mid-save leaves either
  the previous checkpoint or a temporary directory that is never restored. The newest `keep` are
  kept. Every process calls every method: Orbax coordinates multi-host saves.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
               async_save: bool = True):
    import grain
    self._grain = grain
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True),
        item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether the save interval asks for a checkpoint at `step`."""
    return self.manager.should_save(step)

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Save if `step` is due (or `force`); returns whether a save started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=self._grain.checkpoint.CheckpointSave(data_iter)), force=force)

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """Restore `step` (default: latest) into `abstract_state`'s shapes and shardings; the data
    iterator is set in place to continue at the exact next batch."""
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=self._grain.checkpoint.CheckpointRestore(data_iter)))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored into this "
                            f"run's model and data (did the config change?): {e}") from e
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
