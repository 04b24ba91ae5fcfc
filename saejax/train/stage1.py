"""Stage 1 kept beside its run, for a restart or another run to start from.

Stage 1 (`loop.warm_start_sae`) depends only on its inputs: the untouched encoder, the data its
pairs are drawn from, the SAE's shape and seed, the head's objective and optimiser. On a 2-core CPU
it is ~25 of a quality run's 60-80 minutes, and the quality benchmark's sparse and frozen arms train
the same one. So a run keeps its stage-1 head in WORKDIR/stage1/ with a fingerprint of those inputs,
and a run restarted before its first checkpoint, or one given `config.warmstart.init_from=RUN`,
loads that head instead of training it again. A head trained from other inputs is never loaded:
for `init_from` that is an error naming every setting that differs.

``head.npz`` holds every SAE parameter; ``head.json``, written after it, the fingerprint and
head.npz's SHA-256. A directory without head.json, or whose head.npz does not match it, holds no
head (a kill while writing leaves nothing that loads).
"""

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
from etils import epath
from flax import nnx

from saejax import paths
from saejax.errors import CheckpointError, ConfigError

DIR, HEAD, SEAL = "stage1", "head.npz", "head.json"
# Config fields stage 1 does not read, or that cannot change a head trained on constant v (the
# dense InfoNCE on v and the switches that route gradients to the encoder: `headtrain.train_head`;
# tests/test_objective.py): they may differ between a head's run and the one loading it.
_NOT_READ = {"warmstart": ("refit", "init_from", "fresh_stage2"),
             "loss": ("bank_size", "band_to_encoder", "recon_to_encoder", "flops_to_encoder",
                      "w_dense_contrastive"),
             "data": ("read_threads", "prefetch_batches")}


def _read(section: str, values: dict) -> dict:
  """``values`` of config ``section`` without the fields stage 1 does not read."""
  return {k: v for k, v in values.items() if k not in _NOT_READ.get(section, ())}


def _flat(module: nnx.Module) -> dict[str, np.ndarray]:
  """Every parameter of ``module`` as {"a/b/c": array}."""
  out = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      name = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, dict):
        walk(value, name)
      else:
        out[name] = np.asarray(value)

  walk(nnx.to_pure_dict(nnx.state(module, nnx.Param)), "")
  return out


def params_sha256(module: nnx.Module) -> str:
  """A digest of every parameter of ``module`` (names, dtypes, shapes and values)."""
  h = hashlib.sha256()
  for name, value in sorted(_flat(module).items()):
    h.update(f"{name}:{value.dtype}:{value.shape};".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


# How `loop.warm_start_sae` pools its pairs; a head pooled otherwise (before 2026-12-04: repeated
# texts kept) is not the head these inputs make now.
POOL_RULE = "each query and positive text once"


def fingerprint(config, head_optim, encoder: nnx.Module | None = None) -> dict:
  """Everything stage 1's head depends on, as JSON values: the config sections it reads (less
  `_NOT_READ`), the head's optimiser settings as derived (`loop.head_optim`), the init seed and,
  given the ``encoder``, a digest of its untouched weights (a path may hold other weights later)."""
  record = {name: _read(name, config[name].to_dict())
            for name in ("model", "sae", "data", "warmstart", "loss")}
  record.update(head_optim=dataclasses.asdict(head_optim), seed=config.train.seed,
                pool=POOL_RULE)
  if encoder is not None:
    record["encoder_sha256"] = params_sha256(encoder)
  return json.loads(json.dumps(record, sort_keys=True))


def differences(saved, wanted, where: str = "") -> list[str]:
  """Each setting whose value differs between two fingerprints, as "key: saved vs wanted"."""
  if isinstance(saved, dict) and isinstance(wanted, dict):
    return [d for key in sorted(set(saved) | set(wanted))
            for d in differences(saved.get(key), wanted.get(key), f"{where}.{key}" if where else key)]
  return [] if saved == wanted else [f"{where}: {saved!r} there, {wanted!r} here"]


def exists(run_dir: str | os.PathLike) -> bool:
  """Whether ``run_dir`` holds a stage-1 head (sealed; not yet checked against anything)."""
  return (paths.resolve(run_dir, "config.warmstart.init_from") / DIR / SEAL).exists()


def save(workdir: epath.Path, sae: nnx.Module, record: dict, code_version: str) -> epath.Path:
  """Write ``sae``'s parameters and their fingerprint ``record`` to WORKDIR/stage1/ (the seal
  last; an older seal is removed first, so a head half replaced is no head)."""
  directory = workdir / DIR
  paths.makedirs(directory)
  seal = directory / SEAL
  if seal.exists():
    seal.unlink()
  buffer = io.BytesIO()
  np.savez(buffer, **_flat(sae))
  data = buffer.getvalue()
  (directory / HEAD).write_bytes(data)
  body = {"fingerprint": record, "sha256": hashlib.sha256(data).hexdigest(),
          "code_version": code_version}
  paths.write_atomic(seal, json.dumps(body, indent=1, sort_keys=True) + "\n")
  return directory


def check(run_dir: str | os.PathLike, record: dict) -> dict:
  """RUN_DIR's stage-1 seal, if its fingerprint equals ``record`` (whose absent keys are not
  compared: at start-up there is no encoder to digest yet). `ConfigError` when the inputs differ,
  each setting named; `CheckpointError` when there is no head."""
  directory = paths.resolve(run_dir, "config.warmstart.init_from") / DIR
  seal = directory / SEAL
  if not seal.exists():
    raise CheckpointError(f"{directory}: no stage-1 head ({SEAL} missing): that run did not finish "
                          "stage 1, or predates keeping it")
  saved = json.loads(seal.read_text())
  # A head sealed before a field joined _NOT_READ still records it: not compared either.
  diff = differences({k: _read(k, v) if isinstance(v, dict) else v
                      for k, v in saved["fingerprint"].items() if k in record}, record)
  if diff:
    raise ConfigError(f"{directory}: its stage-1 head was trained from other inputs than this "
                      f"run's stage 1 would use ({len(diff)} differ): " + "; ".join(diff))
  return saved


def load(run_dir: str | os.PathLike, sae: nnx.Module, record: dict) -> str:
  """Set ``sae``'s parameters to RUN_DIR's stage-1 head, whose fingerprint must equal ``record``
  (`check`). Returns the code version that trained it; `CheckpointError` if the head is damaged."""
  saved = check(run_dir, record)
  directory = paths.resolve(run_dir, "config.warmstart.init_from") / DIR
  data = (directory / HEAD).read_bytes()
  if hashlib.sha256(data).hexdigest() != saved["sha256"]:
    raise CheckpointError(f"{directory / HEAD}: its SHA-256 is not the one {SEAL} records "
                          "(damaged, or replaced after the seal)")
  with np.load(io.BytesIO(data)) as npz:
    arrays = {name: npz[name] for name in npz.files}
  expected = _flat(sae)
  wrong = sorted(n for n in set(arrays) | set(expected)
                 if n not in arrays or n not in expected or arrays[n].shape != expected[n].shape)
  if wrong:
    raise CheckpointError(f"{directory / HEAD}: parameters missing, unexpected or of another shape "
                          f"than this SAE's: {', '.join(wrong)}")
  state = nnx.state(sae, nnx.Param)
  nested: dict = {}
  for name, value in arrays.items():
    *parents, leaf = name.split("/")
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value.astype(expected[name].dtype)
  nnx.replace_by_pure_dict(state, nested)
  nnx.update(sae, state)
  return saved.get("code_version", "")
