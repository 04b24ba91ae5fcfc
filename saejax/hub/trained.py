"""Load a trained model from a training run's workdir.

Everything downstream of training (evaluation, export, interpretability, steering) starts here:

    config, model, tokenizer = trained.load_run("runs/quickstart")

The workdir holds ``config.json`` (the resolved training config that `saejax.train` wrote) and
``checkpoints/<step>/state`` (Orbax). The model is built abstractly from the config and only the
parameters are read from the checkpoint (the optimiser moments and the data iterator stay on disk),
so loading costs one read of the weights and no random initialisation. The workdir may be a
bucket URL (``gs://BUCKET/PATH``, `saejax.paths`), read with the same checks.
"""

import functools
import json
import logging
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from saejax import paths
from saejax.data.tokenizer import Tokenizer, load_tokenizer
from saejax.errors import CheckpointError, ConfigError
from saejax.hub import build, checkpoint, convert
from saejax.hub.state import OptimConfig, init_state, make_optimizer
from saejax.retrieval import encode
from saejax.sae.embedder import Embedder


# Fields added to the config after runs were trained without them, with the value that reproduces
# those runs (not today's default): a config.json that lacks one was written before it existed.
# sae.normalize_codes: runs before it scored raw codes (dot products), so their embedding is raw.
_BEFORE_FIELD_EXISTED = {("sae", "normalize_codes"): False}


# The sections a model is built from: every config.json that `saejax.train` writes has them.
MODEL_SECTIONS = ("model", "sae", "data")


def read_config(workdir: str | os.PathLike, *, sections: tuple[str, ...] = ()
                ) -> ml_collections.ConfigDict:
  """The resolved training config a run wrote to ``workdir/config.json``.

  A field the run's code did not have yet (`_BEFORE_FIELD_EXISTED`) is filled with the value
  that code behaved as, so an old run loads exactly as it trained.

  Args:
    workdir: the training workdir (or gs:// URL).
    sections: the config sections the caller reads (`MODEL_SECTIONS` to build the model); one
      missing is a CheckpointError naming it.

  Raises:
    CheckpointError: no config.json, one that is not a JSON object, a Hugging Face /
      sentence-transformers model's config.json, or one without a section of `sections`.
  """
  file = paths.resolve(workdir) / "config.json"
  if not file.is_file():
    raise CheckpointError(f"{workdir} is not a saejax training workdir: it has no config.json")
  try:
    raw = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file} is not valid JSON (line {e.lineno}): {e.msg}") from e
  _check_training_config(raw, file, sections)
  config = ml_collections.ConfigDict(raw)
  for (section, key), value in _BEFORE_FIELD_EXISTED.items():
    if section in config and key not in config[section]:
      config[section][key] = value
  return config


def _check_training_config(raw, file: epath.Path, sections: tuple[str, ...]) -> None:
  """Refuse a config.json that is not a training run's, saying what it looks like instead."""
  if not isinstance(raw, dict):
    raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, not a saejax training "
                          "config (an object with sections model, sae, data...)")
  if "model_type" in raw or "architectures" in raw or (file.parent / "modules.json").exists():
    raise CheckpointError(
        f"{file} is not a saejax training config: {file.parent} looks like a Hugging Face / "
        f"sentence-transformers model directory (model_type {raw.get('model_type')!r}), not a "
        "training workdir; pass the workdir given to `python -m saejax.train --workdir`")
  missing = [s for s in sections if not isinstance(raw.get(s), dict)]
  if missing:
    raise CheckpointError(f"{file} is not a saejax training config: it lacks the sections "
                          f"{missing} (a training workdir's config.json has all of "
                          f"{list(MODEL_SECTIONS)})")


def trained_lens(config) -> tuple[int, int] | None:
  """(data.max_query_len, data.max_doc_len) of a training config; None if it lacks them."""
  data = config.get("data") or {}
  if "max_query_len" not in data or "max_doc_len" not in data:
    return None
  return int(data["max_query_len"]), int(data["max_doc_len"])


def encode_configs(config: ml_collections.ConfigDict, **settings
                   ) -> tuple[encode.EncodeConfig, encode.EncodeConfig]:
  """(queries, documents): `EncodeConfig`s at the token budgets the run trained with
  (`trained_lens`), as `saejax.eval`, the export and the corpus index read texts; ``settings``:
  other `EncodeConfig` fields (batch_size, progress)."""
  lens = trained_lens(config)
  if lens is None:
    raise ConfigError("the run's config has no data.max_query_len / data.max_doc_len")
  return tuple(encode.EncodeConfig(max_len=n, **settings) for n in lens)


def tokenizer_for(config: ml_collections.ConfigDict, vocab_size: int) -> Tokenizer:
  """The tokenizer a run trained with: ``model.tokenizer``, else the ``init_from`` directory's."""
  path = config.model.get("tokenizer") or config.model.get("init_from")
  if not path:
    raise ConfigError("config.model.tokenizer is empty and there is no init_from to take it from")
  path = path if str(path).endswith(".json") else convert.resolve(path)
  return load_tokenizer(path, vocab_size=vocab_size)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """Steps of the complete checkpoints in ``workdir/checkpoints`` (Orbax skips partial ones)."""
  directory = paths.resolve(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  with ocp.CheckpointManager(directory, item_names=("state", "data_iter")) as manager:
    return list(manager.all_steps())


def load_run(workdir: str | os.PathLike, step: int | None = None, **model_overrides
             ) -> tuple[ml_collections.ConfigDict, Embedder, Tokenizer]:
  """(config, model, tokenizer) of a training run, with the parameters of checkpoint `step`.

  `load_run_and_step` takes the same arguments and also says which step was loaded.

  Args:
    workdir: the directory (or gs:// URL) given to ``python -m saejax.train --workdir``.
    step: which checkpoint; default the newest sealed one that passes its digest and reads (a
      damaged or unsealed newer one is skipped with a warning, as training resumes; an unsealed one
      is used, with a warning, only when no sealed one can be read).
    model_overrides: ``config.model`` fields to replace before building, e.g.
      ``attention_backend="xla"`` to read a GPU-trained model on a CPU, or ``dtype="float32"``.
  """
  return load_run_and_step(workdir, step, **model_overrides)[:3]


def load_run_and_step(workdir: str | os.PathLike, step: int | None = None, **model_overrides
                      ) -> tuple[ml_collections.ConfigDict, Embedder, Tokenizer, int]:
  """`load_run`, and the step of the checkpoint it read: without `step`, an older one than the
  newest where newer ones are damaged (what an export must name as its provenance)."""
  workdir = paths.resolve(workdir)
  config = read_config(workdir, sections=MODEL_SECTIONS)
  if model_overrides:
    unknown = sorted(set(model_overrides) - set(config.model) - set(build._RUNTIME_FIELDS))
    if unknown:  # ConfigDict.update would add them, and the build would never read them
      raise ConfigError(f"model_overrides {unknown} are not config.model fields; it has "
                        f"{sorted(set(config.model) | set(build._RUNTIME_FIELDS))}")
    config.model.update(model_overrides)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise CheckpointError(f"{workdir / 'checkpoints'} holds no complete checkpoint")
  if step is not None and step not in steps:
    raise CheckpointError(f"{workdir / 'checkpoints'} has no checkpoint {step}; it has {steps}")

  abstract_model = nnx.eval_shape(
      lambda: build.build_model(config, nnx.Rngs(0), load_weights=False)[1])
  graphdef, params = nnx.split(abstract_model, nnx.Param)
  optim_cfg = build.from_section(OptimConfig, config.optim, "optim")
  tx = make_optimizer(optim_cfg, params)
  # The saved item is a whole TrainState; restore its shape, then keep the parameters only.
  target = jax.eval_shape(functools.partial(init_state, tx=tx,
                                            bank_size=config.loss.get("bank_size", 0)),
                          nnx.merge(graphdef, params))
  if jax.process_count() > 1:
    # Multi-process (e.g. `saejax.hub.corpus` on several hosts): each process reads its own whole
    # copy onto its first local device; the default placement would spread one array over every
    # process's devices, which no single process can read or use alone.
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here), target)
  # An explicit step must be good; otherwise the newest good one, as training resumes: sealed
  # steps newest first, then unsealed ones (no digest: their files cannot be checked).
  candidates, sealed = checkpoint.restore_order(workdir / "checkpoints", steps)
  problems = []
  for candidate in [step] if step is not None else candidates:
    try:
      state = _restore_state(workdir / "checkpoints", candidate, target)
      break
    except CheckpointError as e:
      problems.append(f"step {candidate}: {e}")
      if step is None:
        logging.warning("checkpoint %d of %s is damaged, trying an older one: %s", candidate,
                        workdir, e)
  else:
    raise CheckpointError(f"no readable checkpoint in {workdir / 'checkpoints'}:\n  " +
                          "\n  ".join(problems))
  newer_unsealed = [s for s in steps if s > candidate and s not in sealed]
  if newer_unsealed:
    logging.warning("%s: skipped checkpoints %s, which have no digest (unsealed: the run was killed "
                    "while sealing them, or an older saejax wrote them); loaded the sealed step %d",
                    workdir, newer_unsealed, candidate)
  if candidate not in sealed:
    logging.warning("checkpoint %d of %s has no digest (unsealed), so its files could not be "
                    "checked%s", candidate, workdir,
                    "" if step is not None else "; no sealed checkpoint could be read")
  model = nnx.merge(graphdef, state.params)
  return config, model, tokenizer_for(config, model.encoder.cfg.vocab_size), candidate


def _restore_state(directory: epath.Path, step: int, target):
  """The TrainState of checkpoint `step`, verified against its digest when it has one."""
  checkpoint.verify_step(directory / str(step))  # DamagedCheckpointError names the file
  try:
    target, to_state = checkpoint.state_target(directory / str(step), target)
    with ocp.CheckpointManager(directory, item_names=("state", "data_iter")) as manager:
      return to_state(manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"])
  except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise bare errors on damaged bytes
    raise CheckpointError(f"checkpoint {directory}/{step} cannot be read into the model of its "
                          f"config.json: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from e
