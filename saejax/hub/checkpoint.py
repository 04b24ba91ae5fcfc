"""Orbax checkpoints of training runs (encoder checkpoints: `saejax.hub.convert`).

Training checkpoints (`TrainCheckpointer`) are guarded against the faults of long preemptible runs:

  * atomic: Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when whole; a
    run killed mid-write leaves only that temporary directory, which is never listed or restored
    (and is deleted at the next start);
  * sealed: once a step is committed, a digest (size and SHA-256 of every file,
    ``<step>/saejax_digest.json``) is written beside it. Orbax keeps no checksums, so a flipped
    bit in an array file would otherwise be restored as silently different weights;
  * verified on restore: the newest checkpoint whose files match their digest and that Orbax can
    read is used; a damaged newer one is named in a warning and moved to
    ``<checkpoints>_damaged/``; when none can be read, the run stops with a `CheckpointError` rather
    than silently training from scratch;
  * write failures (disk full, file-size limit, permissions) surface as a `CheckpointError` naming
    the step and the newest complete checkpoint, which the failed write never touches.
"""

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging

from saejax.errors import CheckpointError


DIGEST_FILE = "saejax_digest.json"
DIGEST_FORMAT = "saejax-checkpoint-digest"


class DamagedCheckpointError(CheckpointError):
  """A committed checkpoint's files differ from the digest written when it was saved."""


def check_writable(directory: str | os.PathLike) -> Path:
  """Create `directory` if needed and prove that a file can be written, synced and removed there.

  Called at start-up so that an unwritable workdir fails before any compute rather than at the
  first checkpoint, minutes or hours later.

  Raises:
    CheckpointError: the directory cannot be created or written, naming it and the OS reason.
  """
  directory = Path(directory).absolute()
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


def _digests(step_dir: Path) -> dict[str, dict]:
  """{relative path: {"bytes", "sha256"}} of every file of a committed checkpoint."""
  files = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and not path.name.startswith((DIGEST_FILE, "." + DIGEST_FILE)):
      with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
      files[str(path.relative_to(step_dir))] = {"bytes": path.stat().st_size, "sha256": digest}
  return files


def write_digest(step_dir: str | os.PathLike) -> Path:
  """Seal a committed checkpoint: write the size and SHA-256 of each of its files, atomically."""
  step_dir = Path(step_dir)
  body = json.dumps({"format": DIGEST_FORMAT, "version": 1, "files": _digests(step_dir)}, indent=1)
  tmp = step_dir / f".{DIGEST_FILE}.tmp"
  with open(tmp, "w") as f:
    f.write(body + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, step_dir / DIGEST_FILE)  # a kill here leaves no digest, never half of one
  return step_dir / DIGEST_FILE


def verify_step(step_dir: str | os.PathLike) -> bool:
  """Check a committed checkpoint against its digest.

  Returns:
    True when every file matches; False when the checkpoint has no digest (written by an older
    saejax, or the run was killed between the commit and the seal), so only Orbax's own reading
    can check it.

  Raises:
    DamagedCheckpointError: a file is missing, has another size (truncated) or other contents,
      or the digest itself is unreadable; the message names the file.
  """
  step_dir = Path(step_dir)
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
    if path.stat().st_size != want["bytes"]:
      raise DamagedCheckpointError(f"{path} has {path.stat().st_size} bytes, {want['bytes']} were "
                                   "written (truncated or overwritten)")
    with open(path, "rb") as f:
      if hashlib.file_digest(f, "sha256").hexdigest() != want["sha256"]:
        raise DamagedCheckpointError(f"{path} does not match the SHA-256 recorded when it was "
                                     "written (corrupted)")
  return True


class TrainCheckpointer:
  """Orbax CheckpointManager for a training run: the TrainState plus the data iterator's state.

  Saves are asynchronous (the step loop goes on while arrays are written) and atomic: Orbax writes
  into a temporary directory and renames it when complete, so a run killed mid-save leaves either
  the previous checkpoint or a temporary directory that is never restored. Each committed step is
  then sealed with a digest, and `restore` falls back past damaged steps (see the module
  docstring). The newest `keep` are kept. Every process calls every method: Orbax coordinates
  multi-host saves; process 0 writes digests and moves damaged steps aside.
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
    self._unsealed: list[int] = []  # steps this run saved that have no digest yet

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (temporary directories of interrupted writes excluded)."""
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> Path:
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
    self.wait()  # Orbax waits for the previous save here anyway; then it can be sealed
    try:
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data_iter=self._grain.checkpoint.CheckpointSave(data_iter)), force=force)
    # tensorstore reports I/O failures as plain Exception; any failure here loses this checkpoint.
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._write_error(step, e) from e
    if started:
      self._unsealed.append(step)
    return started

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

    Without `step`, checkpoints are tried newest first: one whose files differ from its digest or
    that Orbax cannot read is named in a warning and moved to ``<checkpoints>_damaged/``, and the
    next older one is tried. Returns the restored TrainState.

    Raises:
      CheckpointError: no checkpoint (or not `step`) can be restored; names each one's problem.
    """
    candidates = self.all_steps()[::-1] if step is None else [step]
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
      if problems:
        self._set_aside([bad for bad, _ in problems])
        logging.warning("resuming from checkpoint step %d, the newest good one; damaged newer "
                        "checkpoints %s were moved to %s", s, [bad for bad, _ in problems],
                        self._damaged_dir())
      return restored
    raise CheckpointError(
        f"no checkpoint in {self.directory} can be restored, so the run stops instead of starting "
        "over (move the directory away to train from scratch): "
        + "; ".join(f"step {s}: {e}" for s, e in problems))

  def _restore_step(self, step: int, abstract_state, data_iter):
    if not self.step_dir(step).is_dir():
      raise CheckpointError(f"{self.step_dir(step)} does not exist (steps: {self.all_steps()})")
    verify_step(self.step_dir(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=self._grain.checkpoint.CheckpointRestore(data_iter)))
    # tensorstore raises plain Exception for unreadable chunks; Orbax ValueError / KeyError for
    # metadata that does not fit the target (a changed config) or cannot be parsed.
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise CheckpointError(f"{self.step_dir(step)} cannot be restored into this run's model and "
                            f"data (damaged, or did the config change?): {type(e).__name__}: "
                            f"{str(e)[:500]}") from e
    return restored["state"]

  def _damaged_dir(self) -> Path:
    return self.directory.parent / f"{self.directory.name}_damaged"

  def _set_aside(self, steps: list[int]) -> None:
    """Move damaged steps out of the manager's directory: the run will save those steps again."""
    if jax.process_index() == 0:
      self._damaged_dir().mkdir(exist_ok=True)
      for s in steps:
        if self.step_dir(s).exists():
          self.step_dir(s).rename(self._damaged_dir() / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("saejax: damaged checkpoints set aside")
    self.manager.reload()

  def wait(self):
    """Wait for the asynchronous save in flight, then seal what this run committed.

    Raises:
      CheckpointError: the asynchronous write failed.
    """
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught  (see save)
      failed = self._unsealed[-1] if self._unsealed else None
      self._unsealed.clear()
      raise self._write_error(failed, e) from e
    if jax.process_index() == 0:
      for s in self._unsealed:
        if self.step_dir(s).is_dir():  # max_to_keep may already have deleted it
          write_digest(self.step_dir(s))
    self._unsealed.clear()

  def close(self):
    self.manager.close()
