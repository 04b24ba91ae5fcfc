"""Hugging Face <-> saejax weights, torch-free on the saejax side.

Each encoder module describes its weights once as a list of `TensorMap` rows (HF key, path in the
nnx state, whether the matrix is a torch ``Linear`` weight stored ``[out, in]``). This file does the
rest for every architecture alike: read ``config.json`` and ``model.safetensors`` (single or sharded
with ``model.safetensors.index.json``) from a directory or a hub id, check that the checkpoint has
exactly the expected tensors with the expected shapes, build the nnx model, and write it back as a
directory that ``transformers.AutoModel.from_pretrained`` loads.

saejax's own encoder checkpoint (`save_encoder` / `restore_encoder`) is a directory holding
``config.json`` (the Hugging Face dialect, so the same file describes the model on both sides) and
``params/`` (an Orbax checkpoint of the nnx parameter state). Restoring builds the model
abstractly first, so parameters are read straight into their target shardings without an
intermediate random init.

Written files get the mode a new file gets under the process's umask (0644 under the usual 022),
model.safetensors included, which safetensors would leave 0600 (`match_umask`).
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saejax.errors import CheckpointError, ConfigError
from saejax.models import bert, modernbert
from saejax.models.architecture import Architecture, TensorMap


def _registry() -> dict[str, Architecture]:
  return {a.model_type: a for a in (modernbert.ARCHITECTURE, bert.ARCHITECTURE)}


def architecture(hf_config: dict, where: str = "config.json") -> Architecture:
  """The architecture of an HF config, or a ConfigError naming the supported ones."""
  registry = _registry()
  model_type = hf_config.get("model_type")
  if model_type not in registry:
    supported = ", ".join(f"{a.model_type} ({a.base_architecture} and its task models)"
                          for a in registry.values())
    raise ConfigError(f"{where}: model_type {model_type!r} (architectures "
                      f"{hf_config.get('architectures')}) is not supported; supported: {supported}")
  return registry[model_type]


# ---------------------------------------------------------------------------------------------
# Reading

def resolve(path_or_id: str | os.PathLike) -> Path:
  """A local directory, or a hub id downloaded with huggingface_hub where a hub is reachable."""
  path = Path(path_or_id)
  if path.is_dir():
    return path
  if path.exists():
    raise CheckpointError(f"{path} is a file; expected a model directory with config.json")
  if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
    raise CheckpointError(f"model directory {path} does not exist")
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:
    raise CheckpointError(f"{path_or_id!r} is not a local directory and huggingface_hub is not "
                          "installed to fetch it from the hub") from e
  try:
    return Path(snapshot_download(str(path_or_id), allow_patterns=[
        "*.json", "*.safetensors", "*.txt", "*.model"]))
  except Exception as e:  # noqa: BLE001 - hub errors come in many types; name the id and cause.
    raise CheckpointError(f"could not fetch {path_or_id!r} from the Hugging Face hub "
                          f"(is it reachable?): {type(e).__name__}: {e}") from e


def read_config(model_dir: Path) -> dict:
  file = model_dir / "config.json"
  if not file.exists():
    raise CheckpointError(f"{model_dir} has no config.json")
  try:
    config = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{file} holds a JSON {type(config).__name__}, not a model config object")
  return config


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
  index = model_dir / "model.safetensors.index.json"
  if index.exists():
    files = _shard_files(index)
  elif (model_dir / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise CheckpointError(f"{model_dir} has neither model.safetensors nor "
                          "model.safetensors.index.json (PyTorch .bin files are not read: convert "
                          "them with transformers' save_pretrained(safe_serialization=True))")
  tensors = {}
  for name in files:
    file = model_dir / name
    if not file.exists():
      raise CheckpointError(f"shard {file} listed in {index.name} is missing")
    tensors.update(load_safetensors(file))
  return tensors


def _shard_files(index: Path) -> list[str]:
  """The shard files a model.safetensors.index.json maps the tensors to."""
  try:
    content = json.loads(index.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{index} is not valid JSON (line {e.lineno}): {e.msg}") from e
  weight_map = content.get("weight_map") if isinstance(content, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
    raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file); "
                          "save the model again with transformers' save_pretrained")
  return sorted(set(weight_map.values()))


def load_safetensors(file: Path) -> dict[str, np.ndarray]:
  """The tensors of one safetensors file, or a CheckpointError naming it (truncated, not one)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return load_file(file)
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def _strip_prefix(tensors: dict[str, np.ndarray], arch: Architecture) -> dict[str, np.ndarray]:
  """Task-model checkpoints (e.g. ModernBertForMaskedLM) nest the base model under a prefix."""
  return {k.removeprefix(arch.prefix): v for k, v in tensors.items()}


def params_from_tensors(model: nnx.Module, rows: list[TensorMap], tensors: dict[str, np.ndarray],
                        *, ignored: tuple[str, ...] = (), where: str = "checkpoint") -> nnx.Module:
  """Fill an (abstract or concrete) model with HF tensors, checking names, shapes and dtypes."""
  expected = {r.hf_key for r in rows}
  missing = sorted(expected - tensors.keys())
  extra = sorted(k for k in tensors.keys() - expected if k not in ignored)
  if missing or extra:
    raise CheckpointError(f"{where} does not match the model: missing tensors {missing[:10]}"
                          f"{' ...' if len(missing) > 10 else ''}; unexpected tensors {extra[:10]}"
                          f"{' ...' if len(extra) > 10 else ''}")
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  for row in rows:
    var = flat.get(row.path)
    if var is None:
      raise CheckpointError(f"internal: {row.hf_key} maps to {row.path}, not a model parameter")
    value = np.asarray(tensors[row.hf_key])
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      raise CheckpointError(f"{where}: tensor {row.hf_key} has dtype {value.dtype}, expected floats")
    if row.transpose:
      if value.ndim != 2:
        raise CheckpointError(f"{where}: tensor {row.hf_key} has shape {value.shape}, "
                              "expected a 2-D Linear weight")
      value = value.T
    target = var.get_value()
    if tuple(value.shape) != tuple(target.shape):
      shown = value.T.shape if row.transpose else value.shape
      raise CheckpointError(f"{where}: tensor {row.hf_key} has shape {tuple(shown)} but parameter "
                            f"{'.'.join(map(str, row.path))} needs "
                            f"{tuple(target.shape[::-1] if row.transpose else target.shape)}")
    var.set_value(jnp.asarray(value, dtype=target.dtype))
  unset = [p for p, v in flat.items() if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if unset:
    raise CheckpointError(f"internal: parameters {unset[:5]} have no HF tensor in the map")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf(path_or_id: str | os.PathLike, *, head: bool | None = None,
            param_dtype=jnp.float32, **overrides) -> tuple[Any, nnx.Module]:
  """Load an HF encoder directory (or hub id) into a saejax model: returns (config, model).

  Args:
    head: keep saejax's optional head (ModernBERT's MLM head, BERT's pooler) if the checkpoint has
      one. None keeps it when present; False loads the encoder only and drops every head tensor,
      task heads saejax does not port included (e.g. a ``*ForSequenceClassification`` classifier).
    overrides: config fields to replace (e.g. ``attention_backend="splash"``).
  """
  model_dir = resolve(path_or_id)
  hf_config = read_config(model_dir)
  arch = architecture(hf_config, str(model_dir / "config.json"))
  if arch.head_field in overrides:
    raise ConfigError(f"choose the head with head=True/False, not {arch.head_field}=...")
  cfg = arch.config_cls.from_hf_config(hf_config)
  raw = read_tensors(model_dir)
  tensors = _strip_prefix(raw, arch)
  what = f"{model_dir} holds a {' / '.join(hf_config.get('architectures') or [arch.model_type])}"
  head_keys = ({r.hf_key for r in arch.tensor_map(arch.with_head(cfg, True))}
               - {r.hf_key for r in arch.tensor_map(arch.with_head(cfg, False))})
  present = head_keys & tensors.keys()
  task_head = _task_head_keys(raw, arch, head_keys)
  encoder_only = "load the encoder alone with head=False (saejax.hub.convert: --no-head)"
  if task_head and head is not False:
    raise CheckpointError(f"{what}: its task head (tensors {task_head[:6]}) is not part of "
                          f"saejax's {arch.base_architecture}; {encoder_only}")
  complete = bool(head_keys) and head_keys <= tensors.keys()
  if present and not complete and head is not False:
    raise CheckpointError(f"{what} with only part of the {arch.head_field} head: it has "
                          f"{sorted(present)} but lacks {sorted(head_keys - present)}; "
                          f"{encoder_only}")
  if head and not complete:
    raise CheckpointError(f"{what} without the {arch.head_field} tensors "
                          f"{sorted(head_keys - present)}, but head=True was asked for")
  cfg = arch.with_head(cfg, complete if head is None else head)
  ignored = arch.ignored_keys + (tuple(present) + tuple(task_head) if head is False else ())
  if overrides:
    cfg = dataclasses.replace(cfg, **overrides)
  abstract = nnx.eval_shape(lambda: arch.build(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  model = params_from_tensors(abstract, arch.tensor_map(cfg), tensors, ignored=ignored,
                              where=str(model_dir))
  return cfg, model


def _task_head_keys(raw: dict[str, np.ndarray], arch: Architecture, head_keys: set[str]
                    ) -> list[str]:
  """Tensors of a task model's head that saejax does not port (e.g. ``classifier.weight``).

  In a task checkpoint the encoder's tensors carry ``arch.prefix``; what lies outside it and is
  neither saejax's optional head nor a tensor the architecture skips is someone else's head.
  """
  if not any(k.startswith(arch.prefix) for k in raw):
    return []  # a base-model checkpoint: nothing lies outside the encoder
  return sorted(k for k in raw if not k.startswith(arch.prefix) and k not in head_keys
                and k not in arch.ignored_keys)


# ---------------------------------------------------------------------------------------------
# Writing

def tensors_from_params(model: nnx.Module, rows: list[TensorMap]) -> dict[str, np.ndarray]:
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  out = {}
  for row in rows:
    value = np.asarray(jax.device_get(flat[row.path].get_value()))
    out[row.hf_key] = np.ascontiguousarray(value.T if row.transpose else value)
  return out


def _umask() -> int:
  mask = os.umask(0)  # the only way to read it is to set it; put straight back
  os.umask(mask)
  return mask


def match_umask(root: Path) -> None:
  """Give `root` (a file, or a directory and everything under it) the mode a new one gets.

  safetensors writes through a temporary file, created 0600; every other file saejax writes comes
  from plain ``open`` (0666 less the umask), every directory from ``mkdir`` (0777 less the umask).
  One rule for all: the umask decides. Used by `save_hf` and by `saejax.hub.export` for a whole
  export.
  """
  mask = _umask()
  for path in (root, *(root.rglob("*") if root.is_dir() else ())):
    if not path.is_symlink():
      path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_hf(cfg: Any, model: nnx.Module, out_dir: str | os.PathLike) -> Path:
  """Write config.json + model.safetensors that transformers' AutoModel loads with no warnings."""
  from safetensors.numpy import save_file
  arch = next((a for a in _registry().values() if isinstance(cfg, a.config_cls)), None)
  if arch is None:
    raise ConfigError(f"no Hugging Face architecture is registered for {type(cfg).__name__}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  hf_config = cfg.to_hf_config()
  rows = arch.tensor_map(cfg)
  prefix = "" if hf_config["architectures"] == [arch.base_architecture] else arch.prefix
  tensors = tensors_from_params(model, rows)
  tensors = {(prefix if r.in_base else "") + r.hf_key: tensors[r.hf_key] for r in rows}
  (out / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale index would win
  tmp = out / "model.safetensors.tmp"
  save_file(tensors, tmp, metadata={"format": "pt"})
  match_umask(tmp)  # 0600 from safetensors' temporary file; its siblings get the umask's mode
  os.replace(tmp, out / "model.safetensors")  # never leave a half-written weights file behind
  (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt")


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
  """Copy the tokenizer files that exist in `src` to `dst` (the model is useless without them)."""
  import shutil
  copied = []
  for name in TOKENIZER_FILES:
    if (src / name).exists():
      shutil.copyfile(src / name, dst / name)
      copied.append(name)
  return copied


def check_tokenizer_files(src: Path, vocab_size: int) -> None:
  """Refuse src's tokenizer (tokenizer.json, else WordPiece vocab.txt) if it outgrows the model."""
  from saejax.data.tokenizer import check_max_id, load_tokenizer
  if (src / "tokenizer.json").exists():
    load_tokenizer(src, vocab_size=vocab_size)
  elif (src / "vocab.txt").exists():
    with open(src / "vocab.txt", encoding="utf-8") as f:
      largest = sum(1 for _ in f) - 1  # one token per line, ids from 0
    check_max_id(largest, vocab_size, f"tokenizer {src / 'vocab.txt'}")


# ---------------------------------------------------------------------------------------------
# saejax encoder checkpoints

def save_encoder(cfg, model: nnx.Module, directory: str | os.PathLike) -> Path:
  """Write config.json and an Orbax checkpoint of the parameters to `directory`."""
  import orbax.checkpoint as ocp
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

  The optional head (BERT's pooler, ModernBERT's MLM head) is part of the model when the saved
  parameters hold it: config.json cannot say so for BERT, whose Hugging Face config has no switch.

  Args:
    shardings: optional pytree of `jax.sharding.Sharding` matching the parameter state, to restore
      each array directly into its place on the current mesh.
    overrides: config fields to replace (e.g. ``attention_backend``).
  """
  import orbax.checkpoint as ocp
  directory = Path(directory).absolute()
  hf_config = read_config(directory)
  arch = architecture(hf_config, str(directory / "config.json"))
  if not (directory / "params").is_dir():
    raise CheckpointError(f"{directory} has no params/ checkpoint")
  cfg = arch.config_cls.from_hf_config(hf_config)
  cfg = arch.with_head(cfg, _saved_head(directory / "params", arch, cfg))
  cfg = dataclasses.replace(cfg, **overrides)
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


def _saved_head(params_dir: Path, arch: Architecture, cfg) -> bool:
  """Whether a `save_encoder` checkpoint holds the optional head: its parameters say so, where
  config.json cannot (Hugging Face has no switch for BERT's pooler)."""
  import orbax.checkpoint as ocp
  try:
    saved = ocp.StandardCheckpointHandler().metadata(params_dir).tree
  except Exception as e:  # noqa: BLE001 - Orbax raises bare errors on damaged metadata
    raise CheckpointError(f"{params_dir} has no readable Orbax metadata: {type(e).__name__}: {e}"
                          ) from e
  head_roots = ({r.path[0] for r in arch.tensor_map(arch.with_head(cfg, True))}
                - {r.path[0] for r in arch.tensor_map(arch.with_head(cfg, False))})
  return bool(head_roots & set(saved))


def main(argv: list[str] | None = None) -> None:
  """``python -m saejax.hub.convert {hf-to-saejax,saejax-to-hf} SRC OUT``."""
  from saejax import cli
  parser = cli.ArgumentParser(prog="python -m saejax.hub.convert", description=main.__doc__)
  parser.add_argument("direction", choices=["hf-to-saejax", "saejax-to-hf"])
  parser.add_argument("src", help="HF model directory or hub id / saejax checkpoint directory")
  parser.add_argument("out", help="output directory")
  parser.add_argument("--no-head", action="store_true", help="drop the task head (encoder only)")
  args = parser.parse_args(argv)
  if args.direction == "hf-to-saejax":
    src = resolve(args.src)
    cfg, model = load_hf(src, head=False if args.no_head else None)
  else:
    if args.no_head:
      raise ConfigError("--no-head applies to hf-to-saejax only")
    src = Path(args.src)
    cfg, model = restore_encoder(src)
  check_tokenizer_files(src, cfg.vocab_size)  # before anything is written
  save = save_encoder if args.direction == "hf-to-saejax" else save_hf
  out = save(cfg, model, args.out)
  copied = copy_tokenizer(src, out)
  print(f"wrote {out} ({type(cfg).__name__}, tokenizer files: {copied or 'none found'})")


if __name__ == "__main__":
  from saejax import cli
  cli.run(main)
