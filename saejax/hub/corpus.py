"""Encode a whole corpus into one sparse index: every local device, every host, resumable.

    python -m saejax.hub.corpus --run runs/quickstart --corpus data/scifact --out runs/scifact-index

The corpus (a JSONL file with ``_id`` or ``id`` and ``text`` (and optional ``title``) per line, or
a BEIR folder's ``corpus.jsonl``) is cut by position into shards of ``--shard-size`` documents:
shard s holds documents [s * size, (s + 1) * size) in file order, so the split depends on nothing
but the file and the size. Shards go round-robin to the processes of the run (process p encodes
shards p, p + P, p + 2P, ...); within a process each batch is encoded data-parallel over all local
devices (`saejax.retrieval.encode.sparse_code` with a mesh over ``jax.local_devices()``: the
parameters replicated, the batch split over the devices), with the usual length buckets. Encoding
needs no collective between processes: each one reads the corpus, loads the run and writes its own
shards.

Output directory (``--out``, shared by every process):

  manifest.json           what the shards are codes of: the corpus (path and a digest of its ids and
                          texts), the run (path and a digest of its parameters), k, max_len, the
                          shard size and count. A rerun with other inputs is refused (use another
                          ``--out``), so shards of two settings never mix.
  shards/shard-00012.npz  values float32 [n, k], indices int32 [n, k], ids str [n] of one shard,
                          written to a temporary file and renamed, so a file under its final name is
                          complete. On a rerun a shard whose file loads and matches (shapes,
                          dtypes, its documents' ids) is skipped; a damaged one is re-encoded with
                          a warning.
  ids.json                the corpus ids in corpus order (row i of the index is ids[i])
  index/                  the merged `SparseIndex` (doc ids 0 .. N-1 = corpus positions)

Process 0 merges once every shard is on disk: it waits for the other processes' shards by polling
the directory (no collective, so a host that encodes for hours holds no barrier open), re-encodes a
damaged one itself, and gives up after ``--wait-timeout`` seconds naming the missing shards (rerun:
finished shards are kept). `load_index` reads the result back.

Multi-host: give every process ``--coordinator-address HOST:PORT --num-processes N --process-id I``
(or ``--distributed-auto`` to let `jax.distributed.initialize` detect SLURM / TPU pods); ``--out``
must be a filesystem every process sees.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from saejax import cli, paths, sharding
from saejax.data.sources import beir_document, read_beir_texts
from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.hub import trained
from saejax.models.bert import BertModel
from saejax.retrieval import encode as encode_lib
from saejax.retrieval.index import IDF_POWER, SparseIndex
from saejax.sae.embedder import model_fingerprint

FORMAT = "saejax.CorpusShards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDS = "ids.json"
INDEX = "index"
SHARDS = "shards"


# ---------------------------------------------------------------------------------------------
# The corpus

def read_corpus(path: str | Path) -> tuple[list[str], list[str]]:
  """(ids, texts) of a corpus in file order.

  Args:
    path: a JSONL file, one object per line with ``_id`` (BEIR) or ``id`` and ``text`` (and an
      optional ``title``, joined to the text as BEIR's evaluation does), or a BEIR folder holding
      ``corpus.jsonl``.

  Raises:
    DataError: a missing file, a line that is not such an object or has neither text nor title, a
      repeated id, no documents.
  """
  path = Path(path)
  file = path / "corpus.jsonl" if path.is_dir() else path
  if not file.is_file():
    raise DataError(f"corpus {path} does not exist" if not path.exists() else
                    f"corpus folder {path} has no corpus.jsonl")
  def text_of(row: dict) -> str:
    # Another JSONL layout (Pyserini's "contents", a "body") would otherwise read as empty texts,
    # every document then getting the same code.
    if "text" not in row and "title" not in row:
      key = row.get("_id", row.get("id"))
      raise DataError(f"{file}: document {str(key)!r} has no text or title field (its fields: "
                      f"{', '.join(sorted(row))}); each line needs text (and an optional title)")
    return beir_document(row)

  texts = read_beir_texts(file, None, text_of, id_fields=("_id", "id"), unique=True)
  ids = list(texts)
  if not ids:
    raise DataError(f"corpus {file} holds no documents")
  return ids, list(texts.values())


def _digest(strings: Sequence[str]) -> str:
  h = hashlib.sha256()
  for s in strings:
    data = s.encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Shards

@dataclasses.dataclass(frozen=True)
class Plan:
  """Documents [0, num_docs) cut into shards of shard_size by position."""
  num_docs: int
  shard_size: int

  @property
  def num_shards(self) -> int:
    return -(-self.num_docs // self.shard_size)

  def span(self, shard: int) -> tuple[int, int]:
    return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_docs)

  def mine(self, process: int, processes: int) -> list[int]:
    """The shards one process encodes: round-robin, so every process gets a similar share."""
    return list(range(process, self.num_shards, processes))


def shard_file(out: Path, shard: int) -> Path:
  return out / SHARDS / f"shard-{shard:05d}.npz"


def check_shard(file: Path, ids: Sequence[str], k: int) -> str | None:
  """None if ``file`` is a complete shard of documents ``ids`` with k codes each, else what is
  wrong with it (a missing file says "missing")."""
  if not file.is_file():
    return "missing"
  try:
    with np.load(file, allow_pickle=False) as z:
      arrays = {name: z[name] for name in ("values", "indices", "ids")}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    return f"unreadable ({type(e).__name__}: {e})"
  n = len(ids)
  for name, kind, shape in (("values", np.float32, (n, k)), ("indices", np.int32, (n, k))):
    if arrays[name].dtype != kind or arrays[name].shape != shape:
      return (f"{name} is {arrays[name].dtype} {arrays[name].shape}, expected "
              f"{np.dtype(kind)} {shape}")
  if arrays["ids"].shape != (n,) or list(arrays["ids"]) != list(ids):
    return "its document ids are not the shard's"
  if not np.isfinite(arrays["values"]).all():
    return "non-finite values"
  return None


def read_shard(file: Path) -> tuple[np.ndarray, np.ndarray]:
  with np.load(file, allow_pickle=False) as z:
    return z["values"], z["indices"]


def _write_atomic(file: Path, write, *, exclusive: bool = False) -> None:
  """``write(f)`` to a temporary sibling of ``file``, fsync, rename: ``file`` is whole or absent.

  ``exclusive``: a hard link instead of the rename, so a ``file`` that another process created in
  the meantime is kept (and this write dropped) rather than replaced."""
  file.parent.mkdir(parents=True, exist_ok=True)
  tmp = file.parent / f".{file.name}.tmp-{uuid.uuid4().hex}"
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    if not exclusive:
      os.replace(tmp, file)
    else:
      try:
        os.link(tmp, file)
      except FileExistsError:
        pass  # the other process's file stands
  finally:
    if tmp.exists():
      tmp.unlink()


def write_shard(file: Path, values: np.ndarray, indices: np.ndarray, ids: Sequence[str]) -> None:
  _write_atomic(file, lambda f: np.savez(f, values=values.astype(np.float32),
                                         indices=indices.astype(np.int32),
                                         ids=np.asarray(list(ids), dtype=np.str_)))


# ---------------------------------------------------------------------------------------------
# The job

@dataclasses.dataclass
class Job:
  """One process's part of encoding a corpus into ``out`` (see the module docstring)."""
  out: Path
  ids: list[str]
  texts: list[str]
  plan: Plan
  model: object
  tokenizer: object
  k: int
  config: encode_lib.EncodeConfig
  mesh: jax.sharding.Mesh
  process: int = 0
  processes: int = 1
  idf_power: float = IDF_POWER

  def log(self, message: str) -> None:
    print(f"process {self.process}/{self.processes}: {message}", file=sys.stderr, flush=True)

  def shard_ids(self, shard: int) -> list[str]:
    start, stop = self.plan.span(shard)
    return self.ids[start:stop]

  def encode_shard(self, shard: int) -> None:
    start, stop = self.plan.span(shard)
    began = time.perf_counter()
    codes = encode_lib.encode_sparse(self.model, self.tokenizer, self.texts[start:stop], self.k,
                                     self.config, desc=f"shard {shard}", mesh=self.mesh)
    write_shard(shard_file(self.out, shard), codes.values, codes.indices, self.ids[start:stop])
    self.log(f"shard {shard}: encoded {stop - start} documents in "
             f"{time.perf_counter() - began:.2f} s ({codes.stats.num_truncated} truncated)")

  def ensure_shard(self, shard: int, *, missing_ok: bool = True) -> bool:
    """Encode ``shard`` unless a valid file holds it; returns whether it was encoded."""
    problem = check_shard(shard_file(self.out, shard), self.shard_ids(shard), self.k)
    if problem is None:
      self.log(f"shard {shard}: complete on disk, skipped")
      return False
    if problem != "missing":
      self.log(f"warning: shard {shard} ({shard_file(self.out, shard)}) is damaged: {problem}; "
               "encoding it again")
    elif not missing_ok:
      raise DataError(f"shard {shard} ({shard_file(self.out, shard)}) is missing; run the "
                      "encoding (without --merge-only) first")
    self.encode_shard(shard)
    return True

  def wait_for_shards(self, timeout: float, poll: float = 1.0) -> None:
    """Process 0: wait until every shard is on disk and valid, re-encoding damaged ones."""
    pending, deadline = set(range(self.plan.num_shards)), time.time() + timeout
    while pending:
      for shard in sorted(pending):
        problem = check_shard(shard_file(self.out, shard), self.shard_ids(shard), self.k)
        if problem is None:
          pending.discard(shard)
        elif problem != "missing":
          self.log(f"warning: shard {shard} ({shard_file(self.out, shard)}) is damaged: "
                   f"{problem}; encoding it again")
          self.encode_shard(shard)
          pending.discard(shard)
      if pending:
        if time.time() > deadline:
          raise DataError(f"after {timeout:g} s shards {sorted(pending)} of {self.out / SHARDS} "
                          "are still missing (did a process fail?); rerun the command: finished "
                          "shards are kept")
        time.sleep(poll)

  def merge(self) -> SparseIndex:
    """All shards -> one `SparseIndex` (rows in corpus order) in ``out/index``, ids in ids.json."""
    values = np.empty((self.plan.num_docs, self.k), np.float32)
    indices = np.empty((self.plan.num_docs, self.k), np.int32)
    for shard in range(self.plan.num_shards):
      start, stop = self.plan.span(shard)
      values[start:stop], indices[start:stop] = read_shard(shard_file(self.out, shard))
    index = SparseIndex.build(values, indices, self.model.sae.config.num_latents,
                              idf_power=self.idf_power)
    _write_atomic(self.out / IDS, lambda f: f.write(json.dumps(self.ids).encode("utf-8")))
    index.save(self.out / INDEX, overwrite=True)
    self.log(f"merged {self.plan.num_shards} shards into {self.out / INDEX}: {index!r}")
    return index


def load_index(out: str | Path) -> tuple[SparseIndex, list[str]]:
  """(index, ids) written by the command: search returns rows, ``ids[row]`` is the document id."""
  out = Path(out)
  index = SparseIndex.load(out / INDEX)
  try:
    ids = json.loads((out / IDS).read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{out / IDS} cannot be read: {e}") from None
  if len(ids) != index.num_docs:
    raise CheckpointError(f"{out / IDS} holds {len(ids)} ids for {index.num_docs} documents")
  return index, ids


# Where the inputs were read from, for the record: the same corpus or run under another path (a
# symlink, a relative path, a copy) is the same input, told by corpus_digest and model_fingerprint.
_WHERE = ("corpus", "run")


def _read_manifest(file: Path) -> dict | None:
  try:
    return json.loads(file.read_text(encoding="utf-8"))
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return None


def _check_manifest(out: Path, manifest: dict) -> None:
  """Write ``out/manifest.json``, or check that the one there describes the same inputs (by
  content: digests, fingerprint and settings, not the paths they were read from)."""
  file = out / MANIFEST
  old = _read_manifest(file)
  if old is None:
    if any((out / SHARDS).glob("shard-*.npz")):
      # The manifest is written before any shard, and a shard holds only its codes and ids:
      # shards without a readable manifest are of a model and settings nothing records.
      raise ConfigError(f"{out / SHARDS} holds shards but {file} is missing or unreadable: "
                        f"their model and settings are unknown; delete {out} to start over")
    # Processes started together may all find none: the first one written stands (exclusive)
    # and every process compares with it (were the last one to win, shards of two settings
    # would mix); a damaged one with no shards behind it is replaced.
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    _write_atomic(file, lambda f: f.write(body), exclusive=not file.is_file())
    old = _read_manifest(file)
  differ = [key for key in manifest if key not in _WHERE and old.get(key) != manifest[key]]
  if differ:
    raise ConfigError(f"{out} holds shards of other inputs ({', '.join(differ)} differ from "
                      f"{file}); give another --out, or delete {out} to start over")


# ---------------------------------------------------------------------------------------------
# The command

def _local_path(value: str, flag: str) -> Path:
  """``value`` as an absolute local path (``file://`` included); a bucket URL is a `ConfigError`:
  shards, manifest and index are written with file calls (temporary file, fsync, rename), and
  ``Path("gs://b/x")`` would silently be the local directory ``gs:/b/x``."""
  if value.startswith("file://"):
    return Path(paths.resolve(value, flag))
  if not paths.is_local(value):
    raise ConfigError(f"{flag} {value}: only a local path is supported here (the corpus is read "
                      "and the shards written with local file calls); copy it or mount it on a "
                      "filesystem every process sees")
  return Path(value).absolute()


def _initialize(args) -> None:
  """Join the other processes. A process that finishes its shards early waits at JAX's shutdown
  barrier for process 0's merge, so that barrier is given ``--wait-timeout`` too (JAX: 300 s)."""
  shutdown = max(int(args.wait_timeout), 300)
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ConfigError("give all three of --coordinator-address, --num-processes, --process-id")
    if not 0 <= args.process_id < args.num_processes:
      raise ConfigError(f"--process-id={args.process_id} is not in [0, --num-processes="
                        f"{args.num_processes})")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                               shutdown_timeout_seconds=shutdown)
  elif args.distributed_auto:
    jax.distributed.initialize(shutdown_timeout_seconds=shutdown)


def main(argv: Sequence[str] | None = None) -> Path:
  """Encode a corpus with a trained run's TopK SAE into a sparse index, sharded over all local
  devices and all processes, resumable."""
  p = cli.ArgumentParser(prog="python -m saejax.hub.corpus", description=main.__doc__)
  p.add_argument("--run", required=True, help="a training run's workdir (its newest good "
                 "checkpoint is used)")
  p.add_argument("--corpus", required=True, help="JSONL (id/_id, text, optional title) or a "
                 "BEIR folder with corpus.jsonl")
  p.add_argument("--out", required=True, help="output directory: manifest, shards, index/")
  p.add_argument("--shard-size", type=int, default=8192, help="documents per shard")
  p.add_argument("--batch-size", type=int, default=64,
                 help="rows per forward pass, rounded up to a multiple of the local devices")
  p.add_argument("--max-len", type=int, default=None,
                 help="token budget per document (default: the run's data.max_doc_len)")
  p.add_argument("--k", type=int, default=None, help="active latents per document "
                 "(default: the training k)")
  p.add_argument("--idf-power", type=float, default=IDF_POWER,
                 help="the index scores the idf-weighted cosine with this power "
                 "(saejax.retrieval.index; 0: the plain cosine the model is trained with)")
  p.add_argument("--merge-only", action="store_true", help="encode nothing but damaged shards; "
                 "merge the shards on disk (all must be there)")
  p.add_argument("--wait-timeout", type=float, default=24 * 3600,
                 help="seconds process 0 waits for the other processes' shards")
  p.add_argument("--coordinator-address", default=None, help="HOST:PORT of process 0 "
                 "(multi-process, with --num-processes and --process-id)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--distributed-auto", action="store_true",
                 help="jax.distributed.initialize() with JAX's cluster detection (SLURM, TPU)")
  p.add_argument("--max-shards-this-run", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in ("shard_size", "batch_size"):
    if getattr(args, name) < 1:
      raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  out, corpus_path = _local_path(args.out, "--out"), _local_path(args.corpus, "--corpus")

  _initialize(args)  # before any device is touched
  ids, texts = read_corpus(corpus_path)
  run = paths.resolve(args.run, "--run")  # a local workdir or a gs:// one
  if not run.is_dir():
    raise CheckpointError(f"--run {args.run} is not a directory")
  config, model, tokenizer = trained.load_run(run)
  if model.sae is None:
    raise ConfigError(f"run {args.run} has no SAE (sae.enabled=False, the dense ablation): it "
                      "gives no sparse codes to index")
  k = model.sae.config.k if args.k is None else args.k
  if not 1 <= k <= model.sae.config.num_latents:
    raise ConfigError(f"--k={k} must be in [1, {model.sae.config.num_latents}]")
  max_len = int(config.data.max_doc_len) if args.max_len is None else args.max_len
  devices = jax.local_devices()
  batch = -(-args.batch_size // len(devices)) * len(devices)
  # Settings are checked before the manifest pins them (a refused one would block the rerun).
  encode_cfg = encode_lib.EncodeConfig(max_len=max_len, batch_size=batch, progress=False)
  if isinstance(model.encoder, BertModel) and max_len > model.encoder.cfg.max_position_embeddings:
    raise ConfigError(f"--max-len {max_len} exceeds the encoder's position table "
                      f"({model.encoder.cfg.max_position_embeddings} positions); the first text "
                      "that long would fail mid-run")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=-1), devices)
  plan = Plan(len(ids), args.shard_size)
  _check_manifest(out, {
      "format": FORMAT, "version": FORMAT_VERSION,
      "corpus": str(corpus_path), "corpus_digest": _digest(ids + texts),
      "num_docs": plan.num_docs, "run": str(run),
      "model_fingerprint": model_fingerprint(model),
      # the weights do not say how texts become ids (a re-imported model may lowercase)
      "tokenizer_digest": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
      "k": k, "max_len": max_len,
      "num_latents": model.sae.config.num_latents, "shard_size": plan.shard_size,
      "num_shards": plan.num_shards})
  job = Job(out, ids, texts, plan, model, tokenizer, k, encode_cfg, mesh, jax.process_index(),
            jax.process_count(), args.idf_power)
  mine = plan.mine(job.process, job.processes)
  job.log(f"{plan.num_docs} documents in {plan.num_shards} shards of {plan.shard_size}; "
          f"{len(mine)} shards here, batch {batch} over {len(devices)} local devices")
  if args.merge_only:
    if job.process == 0:
      for shard in range(plan.num_shards):
        job.ensure_shard(shard, missing_ok=False)
      job.merge()
    return out
  encoded = 0
  for shard in mine:
    if args.max_shards_this_run is not None and encoded >= args.max_shards_this_run:
      job.log(f"stopping after {encoded} shards (--max-shards-this-run); rerun to continue")
      return out
    encoded += job.ensure_shard(shard)
  if job.process == 0:
    job.wait_for_shards(args.wait_timeout)
    job.merge()
  return out


if __name__ == "__main__":
  cli.run(main)
