"""Workdir paths: a local directory or a bucket URL (``gs://BUCKET/PATH``), read and written alike.

    python -m saejax.train --config configs/base.py --workdir gs://my-bucket/runs/base1

Everything that opens a workdir (training, checkpoints and their digests, logs, plots, loading a
run back) takes its path from `resolve`, an ``etils.epath.Path``: the local filesystem for a plain
path, the bucket for a URL. Orbax writes the checkpoint arrays itself (TensorStore's gcs driver);
the rest goes through epath (gcsfs) and TensorBoard's own gs:// writer.

Object stores differ from a disk in three ways that the helpers here absorb:

  * no rename and no fsync: an object appears whole when its upload completes, or not at all, so
    `write_atomic` uploads directly where a disk needs a temporary file, fsync and ``os.replace``;
  * no append: gcsfs opens ``"a"`` as an overwrite (with a warning), so `LineLog` keeps a bucket
    file's lines and uploads the whole object now and then instead of appending;
  * no directories: a "directory" exists while an object is under it, so `makedirs` does nothing
    there (gcsfs would create a missing *bucket*) and `move_dir` copies and deletes.

Only schemes that both epath and Orbax can write are accepted: Orbax (0.12) writes checkpoints to a
local path or to gs:// only, so s3://, az:// and hf:// (which epath opens) are refused.
"""

import importlib
import importlib.util
import os
import re
import time

from etils import epath

from saejax.errors import ConfigError

# (module, pip package, what needs it) for gs:// workdirs: the `gcs` extra of pyproject.toml.
GCS_PACKAGES = (("gcsfs", "gcsfs", "epath's gs:// files (config, logs, digests)"),
                ("google.cloud.storage", "google-cloud-storage",
                 "Orbax's checkpoint listing and TensorBoard's gs:// writer"))
_EPATH_ONLY = ("s3", "az", "hf")  # epath opens these; Orbax cannot write checkpoints there
# A known scheme followed by one slash: a URL that lost a slash, not a local path.
_MANGLED_URL = re.compile(r"(gs|file|s3|az|hf):/(?!/)")


def resolve(path: str | os.PathLike, flag: str = "--workdir") -> epath.Path:
  """The ``epath.Path`` of a workdir or of a file in one: absolute when local, the URL when not.

  Args:
    path: a local path (relative ones are made absolute), ``file:///abs/path``, or
      ``gs://BUCKET[/PATH]``.
    flag: how the user gave it, for the error message.

  Raises:
    ConfigError: an unknown scheme, one Orbax cannot write checkpoints to, a gs:// URL without a
      bucket, or gs:// while a package it needs cannot be imported (named, with the pip command).
  """
  if isinstance(path, epath.Path) and not is_local(path):
    return path  # already resolved (and checked) once
  text = os.fspath(path)
  if "://" not in text:
    mangled = _MANGLED_URL.match(text)
    if mangled:  # "gs:/b/run" (or a pathlib.Path of "gs://b/run") would be a local directory
      raise ConfigError(f"{flag} {text}: looks like a {mangled.group(1)}:// URL with a slash "
                        f"lost (pathlib collapses '//'); pass the URL as a string: "
                        f"{mangled.group(1)}://{text[len(mangled.group(0)):].lstrip('/')}")
    return epath.Path(os.path.abspath(text))
  scheme, rest = text.split("://", 1)
  if scheme == "file":
    return epath.Path(os.path.abspath("/" + rest.lstrip("/")))
  if scheme in _EPATH_ONLY:
    raise ConfigError(f"{flag} {text}: {scheme}:// is not supported: Orbax writes checkpoints only "
                      "to a local path or gs://; mount the store (e.g. with a FUSE driver) and "
                      "pass the mounted path")
  if scheme != "gs":
    raise ConfigError(f"{flag} {text}: unknown scheme {scheme}://; a workdir is a local path or "
                      "gs://BUCKET/PATH")
  if not rest.split("/", 1)[0]:
    raise ConfigError(f"{flag} {text}: the URL names no bucket; write gs://BUCKET/PATH")
  missing = missing_gcs_packages()
  if missing:
    raise ConfigError(f"{flag} {text}: gs:// needs " + "; ".join(
        f"{package} (for {why})" for package, why in missing) + ", which cannot be imported here: "
        "pip install 'saejax[gcs]'")
  _no_stale_listings()
  return epath.Path(text)


def _no_stale_listings() -> None:
  """Make gcsfs list a bucket afresh each time (for its instances made from now on).

  gcsfs caches directory listings and forgets them only on its own writes; the checkpoint arrays
  are written by TensorStore and other hosts, so a cached listing would hide their files from the
  digest and from the step listing.
  """
  import fsspec  # pylint: disable=import-outside-toplevel  (epath's dependency)
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def missing_gcs_packages() -> list[tuple[str, str]]:
  """[(pip package, what needs it)] of the gs:// packages that cannot be imported."""
  missing = []
  for module, package, why in GCS_PACKAGES:
    if module == "gcsfs" and importlib.util.find_spec("tensorflow") is not None:
      continue  # epath reads gs:// through tf.io.gfile when TensorFlow is installed
    try:
      importlib.import_module(module)
    except ImportError:
      missing.append((package, why))
  return missing


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` is on the local filesystem (no URL scheme)."""
  return "://" not in os.fspath(path)


def makedirs(directory: epath.Path) -> None:
  """Create a local directory and its parents; nothing in a bucket, which has no directories
  (and where gcsfs's makedirs would create a missing bucket instead of failing)."""
  if is_local(directory):
    directory.mkdir(parents=True, exist_ok=True)


def write_atomic(path: epath.Path, text: str) -> None:
  """Write a whole file that a kill cannot leave half-written.

  On disk: a temporary file beside it, fsync, then ``os.replace``. In a bucket: one direct upload
  (an object is committed whole or not at all; a rename there is a copy, and there is no fsync).
  """
  if not is_local(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)  # a kill here leaves no file, never half of one


def files_under(directory: epath.Path) -> list[epath.Path]:
  """Every file below `directory`, sorted (epath's glob has no ``**`` for buckets)."""
  found = []
  for child in directory.iterdir():
    if child.is_dir():
      found += files_under(child)
    else:
      found.append(child)
  return sorted(found, key=str)


def move_dir(source: epath.Path, target: epath.Path) -> None:
  """Move a directory: a rename on disk; in a bucket, a copy of each file, then a delete."""
  if is_local(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
    return
  for file in files_under(source):
    file.copy(target / file.relative_to(source))
  source.rmtree()


class LineLog:
  """A text file that grows by lines (metrics.jsonl), on disk or in a bucket.

  On disk each line is appended and flushed at once, so a killed run keeps every line. A bucket
  object cannot be appended to: the file's earlier lines (a resumed run's) are read once, and the
  whole object is uploaded again by `flush`, which `write` calls at most every `upload_every_s`
  seconds; the trainer also flushes after each checkpoint and at the end, so the lines up to the
  step a run resumes from are always there.
  """

  def __init__(self, path: epath.Path, upload_every_s: float = 60.0):
    self.path = path
    self._local = is_local(path)
    self._every = upload_every_s
    if self._local:
      self._file = open(path, "a")
    else:
      self._lines = [path.read_text()] if path.exists() else []
      self._dirty, self._uploaded = False, time.monotonic()

  def write(self, line: str) -> None:
    """Add one line (without its newline)."""
    if self._local:
      self._file.write(line + "\n")
      self._file.flush()
      return
    self._lines.append(line + "\n")
    self._dirty = True
    if time.monotonic() - self._uploaded >= self._every:
      self.flush()

  def flush(self) -> None:
    """Make every line written so far durable (a no-op on disk, where `write` did)."""
    if not self._local and self._dirty:
      self.path.write_text("".join(self._lines))
      self._dirty, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    if self._local:
      self._file.close()
    else:
      self.flush()
