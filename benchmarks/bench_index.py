"""Top-10 sparse search over TopK SAE codes: saejax's SparseIndex vs scipy vs Seismic, one thread.

Codes (``--codes``, one or more of):
  zipf          synthetic, head-heavy (the original benchmark): S latents ranked by popularity; each
                text draws its k distinct latents one at a time with probability ~ rank^-a
                (``--zipf``, default 1.0), a draw that repeats a latent already taken being redrawn
                (successive sampling without replacement), and gives each a value |N(0, 1)|. With
                a = 1 and S = 16,384 the most popular latent is in ~100% of documents, the 10th in
                ~55%, the 100th in ~7%, and a k=64 query's posting lists hold ~10 N postings: the
                case the index's dense columns were built for. Queries: same generator, other
                seed, same k.
  balanced      synthetic, uniform popularity: the same generator with a = 0, every latent in
                ~k/S of documents (0.4% at k=64, S=16,384); no dense columns.
  real:scifact  real codes of a trained model: SciFact's 5,183 documents and its 300 test queries;
  real:debian   Debian descriptions dev: 2,869 documents, 2,869 queries;
  real:1m       every distinct cached text (the 12,295 training positives, the SciFact, Cranfield
                and Debian documents, and the 12,295 training queries, used as documents),
                shuffled and tiled to ``--docs`` N documents with distinct ids (each text ~N/T
                times; below T, a random subset); queries: all 3,394 evaluation queries.
                The log states the number T of distinct texts and the repeat factor.
``--docs`` sets N for zipf, balanced and real:1m; SciFact and Debian have their own size.
``--queries`` caps the queries (a seeded random subset of the real ones; default: synthetic
1,000, real all of them).

Real codes: the TopK codes of ``--model`` (default runs/quality/frozen, the quality
benchmark's frozen-encoder arm) for the texts embedded once by benchmarks/embed_cache.py
(runs/cache: all-MiniLM-L6-v2, documents 128 tokens, queries 64). Only a run whose encoder was
frozen qualifies: its encoder is checked to equal the untouched MiniLM it started from, so
``sae.embed`` of a cached embedding is exactly the model's code of that text (a spot check
re-encodes 16 SciFact documents from text when ../shared/data is there). A run with a trained
encoder is refused: the cache holds another encoder's embeddings. ``--k`` is the k of the codes
(the model was trained at 64). The codes are computed in a child process (so that the model and
JAX's buffers do not count in this process' peak RSS) and cached as
runs/cache/codes_<model fingerprint>_k<k>.npz (`saejax.interpret.latents.model_fingerprint`).

Every corpus gets its latent popularity profile (fraction of documents holding each latent: max,
99th percentile over the S latents, latents in > 10% of documents, latents used) and the postings
a query's latents hold, in multiples of N (the work of a term-at-a-time search).

Systems, each asked for the top 10 of every query, single-threaded (NUMBA_NUM_THREADS, OMP, MKL and
OpenBLAS threads set to 1 before anything is imported; Seismic's num_threads=1), all scoring the
plain dot product of the codes: this measures the search kernels. The idf-weighted search saejax
ships differs only by weighting each query first (bench_ann.py measures it: 2% of one-thread QPS,
~20 us a query, at 100k real codes):
  saejax   `SparseIndex.search`, exact (the reference for recall);
  scipy    the plain baseline: `q_csr @ D_csr.T` (D.T converted to CSR once, outside the timing)
           for blocks of 64 queries, `.toarray()`, `np.argpartition` top 10, sorted. Exact: its
           scores are checked against saejax's;
  seismic  pyseismic-lsr built from the same codes with its default build parameters, searched at
           each ``--seismic`` (query_cut:heap_factor) setting; approximate, so recall@10 vs
           saejax. Recall counts a returned document as correct when its true score (recomputed
           exactly) reaches the exact 10th score (relative tolerance 1e-5): real:1m holds copies of
           each text with equal scores, and any copy is a correct answer; without ties this is
           the plain overlap of ids (the log shows both).

Timing: every system searches all queries once untimed (numba compiles, caches warm), then
``--rounds`` rounds take turns over the systems so that load from other processes falls on all of
them; QPS = queries / wall time of a round, best round reported with the range over rounds.
Memory: the index structures' own bytes (saejax `nbytes`; scipy D + D.T; Seismic's own count,
`print_space_usage_byte`) and the process' peak RSS.

    .venv/bin/python benchmarks/bench_index.py --docs 100000 --k 64
    .venv/bin/python benchmarks/bench_index.py --docs 10000 100000 --k 32 64 128
    .venv/bin/python benchmarks/bench_index.py --codes real:scifact real:debian
    .venv/bin/python benchmarks/bench_index.py --codes real:1m --docs 100000
    .venv/bin/python benchmarks/bench_index.py --codes real:1m --docs 1000000 --queries 1000 \
        --rounds 2
    .venv/bin/python benchmarks/bench_index.py --codes balanced --docs 100000
    .venv/bin/python benchmarks/bench_index.py --codes balanced --docs 1000000 --queries 1000 \
        --rounds 2
"""

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ[_var] = "1"  # before numpy, scipy and numba start their thread pools

import argparse  # noqa: E402  (the thread settings above must come first)
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from saejax.retrieval.index import SeismicAdapter, SparseIndex, recall  # noqa: E402

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py; scripts run from this folder)

TOP_K = 10
SCIPY_BLOCK = 64  # queries per scipy product: a [64, N] dense score block
REPO = Path(__file__).resolve().parents[1]
SCIFACT = REPO.parent / "shared" / "data" / "scifact"  # for the spot check of real codes
EVAL_SETS = ("scifact", "cranfield", "debian")
SIZED = ("zipf", "balanced", "real:1m")  # the corpora whose size --docs sets
CODES = SIZED + ("real:scifact", "real:debian")
# The texts real:1m tiles, in the order their codes are concatenated.
TILED_SOURCES = ("train_d",) + tuple(f"{e}_docs" for e in EVAL_SETS) + ("train_q",)
RECALL_RTOL = 1e-5


@dataclasses.dataclass
class Corpus:
  """Document and query codes of one benchmark configuration."""
  codes: str  # one of CODES
  values: np.ndarray  # [N, k] float32
  indices: np.ndarray  # [N, k] int32
  q_values: np.ndarray
  q_indices: np.ndarray
  num_latents: int
  about: str  # where the codes come from, one line
  # real:1m: the rows of the documents and queries in the concatenated sources (TILED_SOURCES,
  # the evaluation sets' queries), so that other representations of the same texts line up
  rows: np.ndarray | None = None
  q_rows: np.ndarray | None = None


@numba.njit(cache=True)
def _draw_latents(cdf, n, k, seed):
  """[n, k] distinct latents per row, each drawn from ``cdf`` and redrawn on a repeat."""
  np.random.seed(seed)
  s = cdf.shape[0]
  out = np.empty((n, k), dtype=np.int32)
  taken_by = np.full(s, -1, dtype=np.int64)  # the last row that took each latent
  for row in range(n):
    j = 0
    while j < k:
      t = min(np.searchsorted(cdf, np.random.random(), side="right"), s - 1)
      if taken_by[t] != row:
        taken_by[t] = row
        out[row, j] = t
        j += 1
  return out


def zipf_codes(n: int, k: int, s: int, a: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(values float32 [n, k], indices int32 [n, k]): see the module docstring (a = 0: balanced)."""
  p = np.arange(1, s + 1, dtype=np.float64) ** -a
  indices = _draw_latents(np.cumsum(p / p.sum()), n, k, seed)
  values = np.abs(np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32))
  return values, indices


def synthetic_corpus(codes: str, n: int, k: int, args: argparse.Namespace) -> Corpus:
  s, a = args.num_latents, (args.zipf if codes == "zipf" else 0.0)
  values, indices = zipf_codes(n, k, s, a, seed=1)
  q_values, q_indices = zipf_codes(args.queries or 1000, k, s, a, seed=2)
  about = (f"synthetic, latent popularity ~ rank^-{a:g}" if a else
           "synthetic, uniform latent popularity") + f", S={s:,}, values |N(0,1)|"
  return Corpus(codes, values, indices, q_values, q_indices, s, about)


# ---------------------------------------------------------------------------------------------
# Real codes

def make_real_codes(workdir: str, cache: str, k: int) -> tuple[str, str]:
  """Run in a child process: (path of the codes file, a line about the model).

  Loads the run, checks that its encoder is the untouched one the cached embeddings come from,
  and computes (or finds, keyed by the model's fingerprint) the codes of every cached text.
  """
  import jax  # pylint: disable=import-outside-toplevel  (only the child needs the model)
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from saejax.hub import convert, trained  # pylint: disable=import-outside-toplevel
  from saejax.interpret.latents import model_fingerprint  # pylint: disable=import-outside-toplevel

  workdir, cache = Path(workdir), Path(cache)
  config, model, tok = trained.load_run(workdir)
  if not config.optim.freeze_encoder:
    raise SystemExit(f"{workdir} trained its encoder (optim.freeze_encoder is false): the codes of "
                     f"{cache}'s frozen-MiniLM embeddings would not be this model's codes; use a "
                     f"frozen-encoder run (runs/quality/frozen)")
  _, untouched = convert.load_hf(config.model.init_from, head=False)
  leaves = [{jax.tree_util.keystr(p): np.asarray(x) for p, x in
             jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param))}
            for m in (model.encoder, untouched)]
  if leaves[0].keys() != leaves[1].keys():
    raise SystemExit(f"{workdir}'s encoder does not have the parameters of "
                     f"{config.model.init_from}")
  diff = max(float(np.abs(leaves[0][key] - leaves[1][key]).max()) for key in leaves[0])
  if diff != 0:
    raise SystemExit(f"{workdir}'s encoder differs from {config.model.init_from} (max |diff| "
                     f"{diff:g}) although frozen: the cached embeddings are not its own")
  fingerprint = model_fingerprint(model)
  s, trained_k = model.sae.config.num_latents, model.sae.config.k
  summary = workdir / "summary.json"
  step = (f"step {json.loads(summary.read_text())['step']}" if summary.is_file() else
          "UNFINISHED run (no summary.json), newest checkpoint")
  about = (f"real codes of {workdir} ({step}, fingerprint {fingerprint}): frozen encoder, equal "
           f"to the untouched {Path(config.model.init_from).parent.name} (max |diff| 0), SAE "
           f"S={s:,} trained at k={trained_k}, normalize_codes={model.sae.config.normalize_codes}"
           f"; codes at k={k} of the cached embeddings in {cache} (documents 128 tokens, "
           f"queries 64)")
  path = cache / f"codes_{fingerprint}_k{k}.npz"
  if path.is_file():
    return str(path), about + f"; read from {path}"

  start = time.perf_counter()
  codes = sae_codes(model, k)
  arrays = {"num_latents": np.int64(s)}
  embeddings = cached_embeddings(cache)
  for name, v in embeddings.items():
    arrays[f"{name}_values"], arrays[f"{name}_indices"] = codes(v)
  print(f"  computed the codes of {sum(len(v) for v in embeddings.values()):,} cached texts in "
        f"{time.perf_counter() - start:.0f}s", flush=True)
  if SCIFACT.is_dir():  # the cache's embeddings are the model's: re-encode a few texts from text
    from saejax.data.beir import load_beir  # pylint: disable=import-outside-toplevel
    from saejax.retrieval.encode import (  # pylint: disable=import-outside-toplevel
        EncodeConfig, encode_sparse)
    data = load_beir(SCIFACT, "test")
    ids = json.loads((cache / "eval_scifact.json").read_text())["doc_ids"]
    if list(data.doc_ids) != ids:
      raise SystemExit(f"{SCIFACT}'s documents are not in the order of {cache}/eval_scifact.json")
    fresh = encode_sparse(model, tok, list(data.docs[:16]), k,
                          EncodeConfig(max_len=128, batch_size=16), desc="spot check")
    same = float((fresh.indices == arrays["scifact_docs_indices"][:16]).mean())
    off = float(np.abs(fresh.values - arrays["scifact_docs_values"][:16]).max())
    print(f"  spot check: 16 SciFact documents encoded from text by the model: latents equal "
          f"{same:.1%}, max |value diff| {off:.1e}", flush=True)
    if same < 0.99 or off > 1e-4:
      raise SystemExit(f"the cached embeddings in {cache} do not give this model's codes")
  partial = path.with_name(f"{path.stem}.partial{os.getpid()}.npz")
  np.savez(partial, **arrays)
  os.replace(partial, path)
  return str(path), about + f"; computed, cached in {path}"


def sae_codes(model, k: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """[n, D] embeddings -> (values, indices) [n, k] of ``model``'s SAE (`sae.embed`, jitted, in
  chunks of 1,024). Only in a child process (it needs JAX)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  graphdef, state = nnx.split(model.sae)
  embed = jax.jit(lambda state, v: nnx.merge(graphdef, state).embed(v, k))

  def codes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out_v, out_i = [], []
    for begin in range(0, len(v), 1024):
      values, indices = embed(state, jax.numpy.asarray(v[begin:begin + 1024]))
      out_v.append(np.asarray(values, np.float32))
      out_i.append(np.asarray(indices, np.int32))
    return np.concatenate(out_v), np.concatenate(out_i)

  return codes


def _codes_file(workdir: str, vectors: str, k: int) -> str:
  """Run in a child process: the codes at ``k`` of the vectors in the .npy file ``vectors`` by
  ``workdir``'s SAE, saved beside it; returns that file's path."""
  from saejax.hub import trained  # pylint: disable=import-outside-toplevel

  _, model, _ = trained.load_run(Path(workdir))
  values, indices = sae_codes(model, k)(np.load(vectors))
  out = Path(vectors).with_suffix(".codes.npz")
  np.savez(out, values=values, indices=indices)
  return str(out)


def codes_of(workdir: str, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(values, indices) [n, k]: ``workdir``'s SAE codes of ``vectors`` [n, D] (frozen-encoder
  embeddings, as in the cache), computed in a child process (this one keeps JAX out)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "vectors.npy")
    np.save(path, np.asarray(vectors, np.float32))
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")) as pool:
      out = pool.submit(_codes_file, workdir, path, k).result()
    with np.load(out) as data:
      return data["values"], data["indices"]


def cached_embeddings(cache: Path) -> dict[str, np.ndarray]:
  """The cached frozen-MiniLM embeddings [texts, D] by source: train_q, train_d, and NAME_queries,
  NAME_docs of each evaluation set (the names of the codes file's arrays, less _values)."""
  train = np.load(cache / "train.npz")
  embeddings = {"train_q": train["q"], "train_d": train["d"]}
  for name in EVAL_SETS:
    data = np.load(cache / f"eval_{name}.npz")
    embeddings[f"{name}_queries"], embeddings[f"{name}_docs"] = data["queries"], data["docs"]
  return embeddings


def real_codes(args: argparse.Namespace, k: int) -> tuple[dict, str]:
  """(codes file contents, about) for codes at ``k``, from a child process (see the docstring)."""
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn")) as pool:
    path, about = pool.submit(make_real_codes, args.model, args.cache, k).result()
  with np.load(path) as data:
    return dict(data), about


def distinct_rows(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """Rows of the first occurrence of each distinct code (values compared to 1e-5), in order."""
  key = np.concatenate([indices.astype(np.int64), np.round(values * 1e5).astype(np.int64)], 1)
  return np.sort(np.unique(key, axis=0, return_index=True)[1])


def query_rows(count: int, cap: int | None) -> np.ndarray:
  """Rows of the queries kept of ``count``: all, or a seeded random ``cap`` of them, in order."""
  if cap is None or cap >= count:
    return np.arange(count)
  return np.sort(np.random.default_rng(3).choice(count, cap, replace=False))


def pick_queries(values: np.ndarray, indices: np.ndarray, cap: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
  rows = query_rows(len(values), cap)
  return values[rows], indices[rows]


def tiled_rows(values: np.ndarray, indices: np.ndarray, n: int) -> tuple[np.ndarray, int]:
  """(rows of N documents, the number T of distinct texts): the distinct codes shuffled and tiled
  to N rows (each ~N/T times), shuffled again; below T, a random subset (see real:1m)."""
  keep = distinct_rows(values, indices)
  texts = len(keep)
  rng = np.random.default_rng(0)
  return keep[rng.permutation(texts)][np.arange(n) % texts][rng.permutation(n)], texts


def real_corpus(codes: str, n: int | None, args: argparse.Namespace, arrays: dict,
                about: str, q_arrays: dict | None = None) -> Corpus:
  """Documents from ``arrays``; queries from ``q_arrays`` (codes at ``--query-k``) if given."""
  s = int(arrays["num_latents"])
  q_arrays = arrays if q_arrays is None else q_arrays
  name = codes.split(":")[1]
  if name != "1m":
    q_values, q_indices = pick_queries(q_arrays[f"{name}_queries_values"],
                                       q_arrays[f"{name}_queries_indices"], args.queries)
    return Corpus(codes, arrays[f"{name}_docs_values"], arrays[f"{name}_docs_indices"],
                  q_values, q_indices, s, f"{about}; {name}'s own documents and queries")
  sources = TILED_SOURCES
  all_values = np.concatenate([arrays[f"{x}_values"] for x in sources])
  all_indices = np.concatenate([arrays[f"{x}_indices"] for x in sources])
  rows, texts = tiled_rows(all_values, all_indices, n)
  all_q_values = np.concatenate([q_arrays[f"{e}_queries_values"] for e in EVAL_SETS])
  q_rows = query_rows(len(all_q_values), args.queries)
  q_values = all_q_values[q_rows]
  q_indices = np.concatenate([q_arrays[f"{e}_queries_indices"] for e in EVAL_SETS])[q_rows]
  sizes = ", ".join(f"{x} {len(arrays[f'{x}_values']):,}" for x in sources)
  tiling = (f"each text {n / texts:.1f} times on average (repeat factor), shuffled" if n > texts
            else f"a random {n:,} of them, no repeats")
  return Corpus(codes, all_values[rows], all_indices[rows], q_values, q_indices, s,
                f"{about}; {texts:,} distinct texts ({sizes}, {len(all_values) - texts:,} "
                f"repeated codes dropped) tiled to N={n:,} documents with distinct ids: {tiling}; "
                f"queries: the evaluation sets' ({', '.join(EVAL_SETS)})", rows, q_rows)


# ---------------------------------------------------------------------------------------------
# Search and measurement

def codes_csr(values: np.ndarray, indices: np.ndarray, s: int) -> sp.csr_matrix:
  n, k = values.shape
  return sp.csr_matrix((values.reshape(-1), indices.reshape(-1), np.arange(0, n * k + 1, k)),
                       shape=(n, s))


def scipy_search(q: sp.csr_matrix, dt: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
  """The plain baseline: exact top-10 per query by sparse product, argpartition and sort."""
  scores, ids = [], []
  for start in range(0, q.shape[0], SCIPY_BLOCK):
    block = (q[start:start + SCIPY_BLOCK] @ dt).toarray()
    part = np.argpartition(-block, TOP_K - 1, axis=1)[:, :TOP_K]
    part_scores = np.take_along_axis(block, part, 1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    scores.append(np.take_along_axis(part_scores, order, 1))
    ids.append(np.take_along_axis(part, order, 1))
  return np.concatenate(scores), np.concatenate(ids)


def popularity(corpus: Corpus) -> dict:
  """The latent popularity profile of the documents and the postings a query's latents hold."""
  n, s = corpus.values.shape[0], corpus.num_latents
  counts = np.bincount(corpus.indices[corpus.values != 0], minlength=s)  # TopK: distinct per row
  frac = counts / n
  touched = (counts[corpus.q_indices] * (corpus.q_values != 0)).sum(1) / n
  return dict(used=int((counts > 0).sum()), max_frac=float(frac.max()),
              p99_frac=float(np.percentile(frac, 99)), over_10=int((frac > 0.1).sum()),
              postings=float(touched.mean()))


def tie_recall(found: np.ndarray, exact_scores: np.ndarray, exact_ids: np.ndarray,
               d: sp.csr_matrix, q: sp.csr_matrix) -> float:
  """Recall@10 where a found document counts when its true score reaches the exact 10th score."""
  d, q = d.sorted_indices(), q.sorted_indices()  # elementwise products need sorted rows
  flat = found.reshape(-1)
  valid = flat >= 0
  rows = np.repeat(np.arange(found.shape[0]), found.shape[1])[valid]
  true = np.full(flat.shape, -np.inf, dtype=np.float64)
  true[valid] = np.asarray(d[flat[valid]].multiply(q[rows]).sum(axis=1)).ravel()
  return recall_at_scores(found, true.reshape(found.shape), exact_scores, exact_ids)


def recall_at_scores(found: np.ndarray, true: np.ndarray, exact_scores: np.ndarray,
                     exact_ids: np.ndarray) -> float:
  """`tie_recall` given the true scores [Q, 10] of the found documents (-inf where id -1)."""
  per_query = []
  for f, t, e_ids, e_scores in zip(found, true, exact_ids, exact_scores):
    m = int((e_ids >= 0).sum())
    if m:
      bar = e_scores[m - 1] - RECALL_RTOL * abs(e_scores[m - 1])
      good = np.unique(f[(f >= 0) & (t >= bar)]).size
      per_query.append(min(good, m) / m)
  return float(np.mean(per_query)) if per_query else 1.0


@contextlib.contextmanager
def quiet_stdout():
  """Silence writes to file descriptor 1 (Seismic's Rust code prints build progress there)."""
  sys.stdout.flush()
  saved = os.dup(1)
  with open(os.devnull, "wb") as null:
    os.dup2(null.fileno(), 1)
    try:
      yield
    finally:
      os.dup2(saved, 1)
      os.close(saved)


def seismic_queries(q_values: np.ndarray, q_indices: np.ndarray) -> tuple[np.ndarray, list, list]:
  """Queries in Seismic's own form (ids, string tokens, values), as `SeismicAdapter.search`
  makes them: each query's non-zero latents, ascending (TopK latents are distinct). Seismic is
  timed on these, so its time excludes the adapter's Python conversion (~100 us a query, more
  than Seismic's own search on small corpora), as saejax's excludes nothing it needs."""
  import seismic  # the optional engine (the `seismic` extra)
  string = seismic.get_seismic_string()
  comps, vals = [], []
  for v, i in zip(q_values, q_indices):
    order = np.argsort(i[v != 0], kind="stable")
    comps.append(i[v != 0][order].astype(str).astype(string))
    vals.append(v[v != 0][order].astype(np.float32))
  return np.array([str(q) for q in range(len(q_values))], dtype=string), comps, vals


def seismic_nbytes(seismic: SeismicAdapter) -> float:
  """Seismic's own count of its index bytes ("Total" of `print_space_usage_byte`, which Rust
  prints to file descriptor 1); nan if it cannot be read."""
  sys.stdout.flush()
  saved = os.dup(1)
  with tempfile.TemporaryFile() as out:
    os.dup2(out.fileno(), 1)
    try:
      seismic.index.print_space_usage_byte()
    finally:
      os.dup2(saved, 1)
      os.close(saved)
    out.seek(0)
    found = re.search(rb"Total:\s*(\d+)\s*Bytes", out.read())
  return float(found.group(1)) if found else float("nan")


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def run_config(corpus: Corpus, args: argparse.Namespace) -> tuple[list[dict], dict]:
  """(rows of the results table, the popularity profile) of one corpus."""
  values, indices, s = corpus.values, corpus.indices, corpus.num_latents
  q_values, q_indices = corpus.q_values, corpus.q_indices
  (n, k), num_q = values.shape, len(q_values)
  k_q = q_values.shape[1]
  print(f"\n## {corpus.codes} N={n:,} k={k}" + (f" (queries {k_q})" if k_q != k else "") +
        f", {num_q:,} queries\n  codes: {corpus.about}",
        flush=True)
  profile = popularity(corpus)
  profile.update(codes=corpus.codes, docs=n, k=k)
  print(f"  latent popularity (fraction of documents per latent): max {profile['max_frac']:.2%}, "
        f"99th percentile {profile['p99_frac']:.2%}, {profile['over_10']} latents in > 10% of "
        f"documents, {profile['used']:,} of {s:,} latents used; a query's latents hold "
        f"{profile['postings']:.2f} N postings", flush=True)
  index, saejax_build = timed(lambda: SparseIndex.build(values, indices, s))
  profile["dense"] = index.num_dense
  print(f"  {index}", flush=True)
  d = codes_csr(values, indices, s)
  dt, scipy_build = timed(lambda: d.T.tocsr())
  q = codes_csr(q_values, q_indices, s)
  systems = {"saejax": lambda: index.search(q_values, q_indices, TOP_K),
             "scipy": lambda: scipy_search(q, dt)}
  answers = dict(systems)  # (scores, ids) of each system, for exactness and recall
  seismic, seismic_build, seismic_mem = None, 0.0, float("nan")
  if args.seismic and n <= args.seismic_max_docs:
    # Copies: SeismicAdapter.build sorts the indices array it is given in place (not the values),
    # which would scramble the codes that d, the recall check, shares.
    v_copy, i_copy = values.copy(), indices.copy()
    with quiet_stdout():
      seismic, seismic_build = timed(lambda: SeismicAdapter.build(v_copy, i_copy, s))
    del v_copy, i_copy
    seismic_mem = seismic_nbytes(seismic)
    print(f"  Seismic built in {seismic_build:.1f}s, {seismic_mem / 2**20:,.0f} MiB", flush=True)
    seismic_q = seismic_queries(q_values, q_indices)
    for setting in args.seismic:
      cut, heap = setting.split(":")
      params = dict(query_cut=int(cut), heap_factor=float(heap))
      answers[f"seismic {setting}"] = (
          lambda p=params: seismic.search(q_values, q_indices, TOP_K, **p))
      systems[f"seismic {setting}"] = (  # timed on its own calls, one thread
          lambda p=params: seismic.index.batch_search(*seismic_q, k=TOP_K, num_threads=1, **p))
  del values, indices
  results = {name: fn() for name, fn in answers.items()}  # the answers, untimed
  for fn in systems.values():  # untimed warm-up of what is timed
    fn()
  exact_scores, exact_ids = results["saejax"]
  scipy_scores = results["scipy"][0]
  if not np.allclose(np.where(exact_ids >= 0, exact_scores, 0), scipy_scores, rtol=1e-5):
    raise SystemExit("saejax's scores differ from scipy's exact sparse product (rtol 1e-5): "
                     "the exactness every ratio here rests on does not hold")
  print("  saejax scores == scipy scores (rtol 1e-5)", flush=True)
  recalls = {}
  for name, (_, ids) in results.items():
    if name.startswith("seismic"):
      recalls[name] = tie_recall(ids, exact_scores, exact_ids, d, q)
      print(f"  {name}: recall@10 {recalls[name]:.3f} (ids alone: {recall(ids, exact_ids):.3f})",
            flush=True)
  qps = {name: [] for name in systems}
  for round_ in range(args.rounds):
    for name, fn in systems.items():
      qps[name].append(num_q / timed(fn)[1])
    print(f"  round {round_}: " + ", ".join(f"{name} {v[-1]:,.0f}" for name, v in qps.items()),
          flush=True)
  memory = {"saejax": index.nbytes, "scipy": d.data.nbytes * 2 + d.indices.nbytes * 2,
            "seismic": seismic_mem}
  build = {"saejax": saejax_build, "scipy": scipy_build, "seismic": seismic_build}
  rows = []
  for name, values_ in qps.items():
    base = name.split()[0]
    rows.append(dict(
        codes=corpus.codes, docs=n, k=k if k_q == k else f"{k} (q {k_q})", system=name,
        build_s=build[base],
        mib=memory[base] / 2**20, qps=max(values_), lo=min(values_),
        recall=recalls.get(name, 1.0), speedup=max(values_) / max(qps["scipy"])))
  rows[-1]["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return rows, profile


def markdown(rows: list[dict]) -> str:
  lines = ["| codes | N | k | system | build (s) | index MiB | QPS (best) | QPS range | "
           "recall@10 | x scipy |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mib = "-" if np.isnan(r["mib"]) else f"{r['mib']:,.0f}"
    lines.append(f"| {r['codes']} | {r['docs']:,} | {r['k']} | {r['system']} | {r['build_s']:.1f} "
                 f"| {mib} | {r['qps']:,.0f} | {r['lo']:,.0f}-{r['qps']:,.0f} | "
                 f"{r['recall']:.3f} | {r['speedup']:.1f} |")
  return "\n".join(lines)


def markdown_profiles(profiles: list[dict]) -> str:
  lines = ["| codes | N | k | max doc fraction | p99 doc fraction | latents > 10% | "
           "dense columns | latents used | query postings (x N) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for p in profiles:
    lines.append(f"| {p['codes']} | {p['docs']:,} | {p['k']} | {p['max_frac']:.2%} | "
                 f"{p['p99_frac']:.2%} | {p['over_10']} | {p['dense']} | {p['used']:,} | "
                 f"{p['postings']:.2f} |")
  return "\n".join(lines)


def main(argv=None):
  # Seismic's batch_search runs on rayon's global pool whatever its num_threads (on 2 cores its
  # num_threads=1 used 1.9 cores of CPU); the pool reads this when first used, so the one-thread
  # comparison holds only with it set here (bench_ann.py, which imports this module, keeps its
  # all-core Seismic setting).
  os.environ["RAYON_NUM_THREADS"] = "1"
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--codes", nargs="+", default=["zipf"], choices=CODES,
                      help="code distributions / corpora (see the module docstring)")
  parser.add_argument("--docs", type=int, nargs="+", default=[100_000],
                      help="N values (zipf, balanced, real:1m)")
  parser.add_argument("--k", type=int, nargs="+", default=[64], help="latents per code")
  parser.add_argument("--query-k", type=int, default=0,
                      help="real codes: queries at this k against documents at --k (0: the same)")
  parser.add_argument("--num-latents", type=int, default=16_384, help="S (synthetic codes)")
  parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent a (zipf)")
  parser.add_argument("--model", default="runs/quality/frozen",
                      help="training run (frozen encoder) whose codes real:* uses")
  parser.add_argument("--cache", default="runs/cache",
                      help="embed_cache.py's output; the real codes are cached here too")
  parser.add_argument("--queries", type=int, default=None,
                      help="queries (default: synthetic 1000, real all; fewer: a random subset)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seismic", nargs="*",
                      default=["3:0.7", "5:0.7", "10:0.8", "20:0.9", "40:1.0"],
                      help="query_cut:heap_factor settings (none: skip Seismic)")
  parser.add_argument("--seismic-max-docs", type=int, default=1_000_000,
                      help="skip Seismic above this many documents (its build is slow)")
  args = parser.parse_args(argv)
  if args.query_k < 0:
    parser.error(f"--query-k {args.query_k}: a number of latents must be >= 0 (0: --k)")
  print(f"# bench_index: {cpu_model()}, {datetime.date.today()}, numba {numba.__version__}, "
        f"numpy {np.__version__}\n# command: {' '.join(sys.argv)}", flush=True)
  # Compile the build's kernels (skip pointers, dense columns) before any build is timed.
  SparseIndex.build(np.ones((2, 2), np.float32), np.array([[0, 1], [1, 2]], np.int32), 3)
  rows, profiles = [], []
  for k in args.k:
    real = query_arrays = None
    for codes in args.codes:
      if codes.startswith("real:") and real is None:
        real = real_codes(args, k)
        print(f"# {real[1]}", flush=True)
        if args.query_k and args.query_k != k:
          query_arrays = real_codes(args, args.query_k)[0]
          print(f"# queries at k={args.query_k}", flush=True)
      for n in args.docs if codes in SIZED else [None]:
        if codes.startswith("real:"):
          corpus = real_corpus(codes, n, args, *real, query_arrays)
        else:
          corpus = synthetic_corpus(codes, n, k, args)
        new_rows, profile = run_config(corpus, args)
        rows += new_rows
        profiles.append(profile)
        print(f"  peak RSS so far {rows[-1]['peak_rss_gib']:.1f} GiB", flush=True)
  print("\nLatent popularity of the documents (fraction of documents holding a latent), dense "
        "columns of saejax's index, postings held by a query's latents:\n\n" +
        markdown_profiles(profiles))
  print("\n" + markdown(rows))


if __name__ == "__main__":
  main()
