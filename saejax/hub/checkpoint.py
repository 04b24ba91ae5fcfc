"""Orbax checkpoints of training runs (encoder checkpoints: `saejax.hub.convert`).

Training checkpoints (`TrainCheckpointer`) are guarded against the faults of long preemptible runs:

  * atomic: Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when whole; a
    run killed mid-write leaves only that temporary directory, which is never listed or restored
    (and is deleted at the next start);
  * sealed: a digest (size and SHA-256 of every file, ``<step>/saejax_digest.json``) is written
    into the temporary directory once every process's files are in it and before Orbax renames it,
    so a committed step has its digest from the moment it exists, and a run killed at any moment
    resumes from a checkpoint that can be checked. Orbax keeps no checksums, so a flipped bit in
    an array file would otherwise be restored as silently different weights. (Synchronous saves,
    used for one-off checkpoints, are sealed just after the commit.) The two step-level files
    Orbax rewrites while committing, its ``_CHECKPOINT_METADATA`` timestamps and
    ``commit_success.txt``, are not in the digest; the arrays and the data-iterator state are;
  * verified on restore: the newest sealed checkpoint whose files match their digest and that
    Orbax can read is used; a damaged one is named in a warning and moved to
    ``<checkpoints>_damaged/``. A committed step without a digest (written by an older saejax, or a
    synchronous save killed between commit and seal) cannot be checked: it is used only when no
    sealed step can be, with a warning; one newer than the sealed step resumed from is moved to
    ``<checkpoints>_unsealed/``, as the run will write that step again. When none can be read, the
    run stops with a `CheckpointError` rather than silently training from scratch;
  * write failures (disk full, file-size limit, permissions) surface as a `CheckpointError` naming
    the step and the newest complete checkpoint, which the failed write never touches.

The checkpoint directory may be in a bucket (``gs://``, `saejax.paths`). Orbax then writes each step
in place and commits it with a ``commit_success.txt`` marker instead of a rename; the seal is
written by the same callback, after every file and before that marker, as one direct upload (an
object is whole or absent: no temporary file, rename or fsync there).
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import uuid

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from saejax import paths
from saejax.errors import CheckpointError


DIGEST_FILE = "saejax_digest.json"
DIGEST_FORMAT = "saejax-checkpoint-digest"
# Written by Orbax into a step directory while it commits, after the digest: not sealed.
ORBAX_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's temporary directory of a step being written


class DamagedCheckpointError(CheckpointError):
  """A committed checkpoint's files differ from the digest written when it was saved."""


def check_writable(directory: str | os.PathLike) -> epath.Path:
  """Create `directory` if needed and prove that a file can be written, synced and removed there.

  Called at start-up so that an unwritable workdir fails before any compute rather than at the
  first checkpoint, minutes or hours later. In a bucket (no directories, no fsync) a small object
  is uploaded and deleted: a missing bucket or missing permissions fail here, and no bucket is
  ever created.

  Raises:
    CheckpointError: the directory cannot be created or written, naming it and the OS reason.
  """
  directory = paths.resolve(directory)
  if not paths.is_local(directory):
    return _check_bucket_writable(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".saejax-write-test-")
    try:
      os.write(fd, b"saejax")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(name)
  except OSError as e:
    raise CheckpointError(f"{directory} is not writable ({type(e).__name__}: {e.strerror or e}): "
                          "checkpoints and logs could not be saved there; fix its permissions or "
                          "choose another --workdir") from e
  return directory


def _check_bucket_writable(directory: epath.Path) -> epath.Path:
  probe = directory / f".saejax-write-test-{uuid.uuid4().hex}"
  try:
    probe.write_bytes(b"saejax")
    probe.unlink()
  # gcsfs and google-auth raise their own errors (no bucket, no credentials, no permission).
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(f"{directory} is not writable ({type(e).__name__}: {e}): checkpoints and "
                          "logs could not be saved there; check that the bucket exists and that "
                          "this machine's credentials may write to it, or choose another "
                          "--workdir") from e
  return directory


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 23):
      h.update(chunk)
  return h.hexdigest()


def _digests(step_dir: epath.Path) -> dict[str, dict]:
  """{relative path: {"bytes", "sha256"}} of every file of a checkpoint (Orbax's commit files
  excepted)."""
  files = {}
  for path in paths.files_under(step_dir):
    if path.parent == step_dir and path.name in ORBAX_COMMIT_FILES:
      continue
    if not path.name.startswith((DIGEST_FILE, "." + DIGEST_FILE)):
      files[str(path.relative_to(step_dir))] = {"bytes": path.stat().length,
                                                "sha256": _sha256(path)}
  return files


def write_digest(step_dir: str | os.PathLike) -> epath.Path:
  """Seal a checkpoint whose files are all written: each one's size and SHA-256, written whole
  (`saejax.paths.write_atomic`: tmp + fsync + rename on disk, one upload in a bucket)."""
  step_dir = paths.resolve(step_dir)
  body = json.dumps({"format": DIGEST_FORMAT, "version": 1, "files": _digests(step_dir)}, indent=1)
  paths.write_atomic(step_dir / DIGEST_FILE, body + "\n")
  return step_dir / DIGEST_FILE


def is_sealed(step_dir: str | os.PathLike) -> bool:
  """Whether a checkpoint has a digest (which `verify_step` checks)."""
  return (paths.resolve(step_dir) / DIGEST_FILE).exists()


def state_target(step_dir: str | os.PathLike, abstract_state):
  """The restore target for the TrainState saved in `step_dir`, and the function that turns what
  Orbax returns into a TrainState.

  Orbax restores only into the tree it saved. Checkpoints written before `TrainState` had its
  ``bank`` field (the memory bank) hold no ``bank`` entry; a run without a bank restores them into
  the other fields, so they stay loadable and resumable.
  """
  fields = getattr(abstract_state, "__dataclass_fields__", {})
  if "bank" not in fields or abstract_state.bank is not None:
    return abstract_state, lambda state: state
  # The item's handler, not a StandardCheckpointer: that one also reads checkpoint-level metadata,
  # which a CheckpointManager keeps one level up, and warns that "state" has none.
  saved = ocp.StandardCheckpointHandler().metadata(paths.resolve(step_dir) / "state").tree
  if "bank" in saved:
    return abstract_state, lambda state: state
  target = {name: getattr(abstract_state, name) for name in fields if name != "bank"}
  return target, lambda state: dataclasses.replace(abstract_state, **state)


def restore_order(directory: str | os.PathLike, steps: list[int]) -> tuple[list[int], list[int]]:
  """(candidates, sealed): the order in which to try `steps` of a checkpoint directory - sealed
  ones newest first, then unsealed ones (no digest: unverifiable) newest first - and the sealed
  ones. Training's resume and `trained.load_run` share this rule."""
  newest_first = sorted(steps, reverse=True)
  directory = paths.resolve(directory)
  sealed = [s for s in newest_first if is_sealed(directory / str(s))]
  return sealed + [s for s in newest_first if s not in sealed], sealed


def verify_step(step_dir: str | os.PathLike) -> bool:
  """Check a committed checkpoint against its digest.

  Returns:
    True when every file matches; False when the checkpoint has no digest (written by an older
    saejax, or a synchronous save killed between the commit and the seal), so only Orbax's own
    reading can check it.

  Raises:
    DamagedCheckpointError: a file is missing, has another size (truncated) or other contents,
      or the digest itself is unreadable; the message names the file.
  """
  step_dir = paths.resolve(step_dir)
  file = step_dir / DIGEST_FILE
  if not file.exists():
    return False
  try:
    digest = json.loads(file.read_text())
    expected = digest["files"]
    if digest["format"] != DIGEST_FORMAT or not all(
        isinstance(name, str) and isinstance(want["bytes"], int) and isinstance(want["sha256"], str)
        for name, want in expected.items()):
      raise ValueError("not a saejax checkpoint digest")
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpointError(f"{file} is unreadable ({type(e).__name__}: {e})") from None
  for name, want in expected.items():
    path = step_dir / name
    if not path.is_file():
      raise DamagedCheckpointError(f"{path} is missing")
    size = path.stat().length
    if size != want["bytes"]:
      raise DamagedCheckpointError(f"{path} has {size} bytes, {want['bytes']} were "
                                   "written (truncated or overwritten)")
    if _sha256(path) != want["sha256"]:
      raise DamagedCheckpointError(f"{path} does not match the SHA-256 recorded when it was "
                                   "written (corrupted)")
  return True


class TrainCheckpointer:
  """Orbax CheckpointManager for a training run: the TrainState plus the data iterator's state.

  Saves are asynchronous (the step loop goes on while arrays are written) and atomic: Orbax writes
  into a temporary directory and renames it when complete, so a run killed mid-save leaves either
  the previous checkpoint or a temporary directory that is never restored. Each step is sealed
  with a digest just before that rename, and `restore` falls back past damaged steps (see the
  module docstring). The newest `keep` are kept. Every process calls every method: Orbax
  coordinates multi-host saves; process 0 writes digests and moves damaged steps aside.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
               async_save: bool = True):
    import grain
    self._grain = grain
    self.directory = paths.resolve(directory)
    self._async = async_save
    self._in_flight: int | None = None  # the step being written, which the seal callback names
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
            # Orbax calls it on the primary process only, when every process's files are written
            # and before the rename that commits the step (only an async checkpointer has it).
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_in_flight)
            if async_save else None),
        item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (temporary directories of interrupted writes excluded)."""
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def due(self, step: int) -> bool:
    """Whether the save interval asks for a checkpoint at `step`."""
    return self.manager.should_save(step)

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Save if `step` is due (or `force`); returns whether a save started.

    Raises:
      CheckpointError: this write, or the previous asynchronous one, failed (disk full, file-size
        limit, permissions); the newest complete checkpoint is left as it was.
    """
    self.wait()  # Orbax waits for the previous save here anyway; this reports its failure
    self._in_flight = step
    try:
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data_iter=self._grain.checkpoint.CheckpointSave(data_iter)), force=force)
      if started and not self._async and jax.process_index() == 0:
        write_digest(self.step_dir(step))  # committed already: a kill just before this is unsealed
    # tensorstore reports I/O failures as plain Exception; any failure here loses this checkpoint.
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._in_flight = None
      raise self._write_error(step, e) from e
    if not started:
      self._in_flight = None
    return started

  def _seal_in_flight(self) -> None:
    """Write the digest of the step being saved into its temporary directory, before the commit.

    Orbax's post-finalisation callback: it runs in Orbax's background thread on the primary
    process, after every process's files are written and before the temporary directory is
    renamed to the step, so no committed step is ever without its digest. A failure here fails
    the save (reported by `wait`), and the step is never committed.
    """
    step = self._in_flight
    # Renamed at the commit (POSIX); written in place, committed by a marker file (object stores).
    found = sorted(self.directory.glob(f"{step}{TMP_SUFFIX}*")) or [self.step_dir(step)]
    if step is None or len(found) != 1 or not found[0].is_dir():
      raise CheckpointError(f"cannot seal checkpoint step {step}: expected one directory being "
                            f"written in {self.directory}, found {[p.name for p in found]}")
    write_digest(found[0])

  def _write_error(self, step: int | None, e: Exception) -> CheckpointError:
    self.manager.reload()
    what = f"step {step}" if step is not None else "the last checkpoint"
    return CheckpointError(
        f"writing checkpoint {what} to {self.directory} failed ({type(e).__name__}: {e}); is the "
        f"disk full or the directory unwritable? The newest complete checkpoint is step "
        f"{self.latest_step()}, left untouched")

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """Restore `step` (default: the newest good one) into `abstract_state`'s shapes and shardings;
    the data iterator is set in place to continue at the exact next batch.

    Without `step`, sealed checkpoints are tried newest first: one whose files differ from its
    digest or that Orbax cannot read is named in a warning and moved to ``<checkpoints>_damaged/``,
    and the next older one is tried. Unsealed ones (no digest, so unverifiable) come after every
    sealed one, with a warning when used; those newer than the step resumed from are moved to
    ``<checkpoints>_unsealed/``. Returns the restored TrainState.

    Raises:
      CheckpointError: no checkpoint (or not `step`) can be restored; names each one's problem.
    """
    candidates, sealed = restore_order(self.directory, self.all_steps())
    if step is not None:
      candidates = [step]
    if not candidates:
      raise CheckpointError(f"{self.directory} holds no complete checkpoint")
    problems = []
    for s in candidates:
      try:
        restored = self._restore_step(s, abstract_state, data_iter)
      except CheckpointError as e:
        problems.append((s, e))
        logging.warning("checkpoint step %d in %s cannot be used: %s", s, self.directory, e)
        continue
      if step is None:
        self._set_aside_after_restoring(s, [bad for bad, _ in problems], sealed)
      return restored
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored, so the run stops instead of starting "
        "over (move the directory away to train from scratch): "
        + "; ".join(f"step {s}: {e}" for s, e in problems))

  def _restore_step(self, step: int, abstract_state, data_iter):
    if not self.step_dir(step).is_dir():
      raise CheckpointError(f"{self.step_dir(step)} does not exist (steps: {self.all_steps()})")
    if not verify_step(self.step_dir(step)):
      logging.warning("checkpoint step %d in %s has no digest (%s is missing: written by an older "
                      "saejax, or killed between commit and seal), so its files cannot be checked; "
                      "restoring it as Orbax reads it", step, self.directory, DIGEST_FILE)
    try:
      target, to_state = state_target(self.step_dir(step), abstract_state)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data_iter=self._grain.checkpoint.CheckpointRestore(data_iter)))
    # tensorstore raises plain Exception for unreadable chunks; Orbax ValueError / KeyError for
    # metadata that does not fit the target (a changed config) or cannot be parsed.
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise CheckpointError(f"{self.step_dir(step)} cannot be restored into this run's model and "
                            f"data (damaged, or did the config change?): {type(e).__name__}: "
                            f"{str(e)[:500]}") from e
    return to_state(restored["state"])

  def _set_aside_after_restoring(self, step: int, damaged: list[int], sealed: list[int]) -> None:
    """Move damaged steps, and unsealed steps newer than `step`, out of the manager's directory:
    the run will save those steps again."""
    unsealed = [s for s in self.all_steps() if s > step and s not in sealed and s not in damaged]
    for steps, kind in ((damaged, "damaged"), (unsealed, "unsealed")):
      if steps:
        logging.warning("resuming from checkpoint step %d, the newest good one; %s checkpoints %s "
                        "were moved to %s", step, kind, steps, self._aside_dir(kind))
        self._set_aside(steps, kind)

  def _aside_dir(self, kind: str) -> epath.Path:
    return self.directory.parent / f"{self.directory.name}_{kind}"

  def _set_aside(self, steps: list[int], kind: str) -> None:
    """Move `steps` to ``<checkpoints>_<kind>/``, named by step and time."""
    if jax.process_index() == 0:
      for s in steps:
        if self.step_dir(s).exists():
          paths.move_dir(self.step_dir(s),
                         self._aside_dir(kind) / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"saejax: {kind} checkpoints set aside")
    self.manager.reload()

  def wait(self):
    """Wait for the asynchronous save in flight (sealed by then, see `_seal_in_flight`).

    Raises:
      CheckpointError: the asynchronous write, or its seal, failed.
    """
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught  (see save)
      failed, self._in_flight = self._in_flight, None
      raise self._write_error(failed, e) from e
    self._in_flight = None

  def close(self):
    self.manager.close()
