"""The sparse inverted index: exact top-k search over saejax's TopK SAE codes.

A document's code is ``values`` [k] over ``indices`` [k] in [0, S); a query's code is the same
with its own k (queries and documents may use different k). The score of a document is the dot
product of the two sparse codes as `saejax.retrieval.encode.encode_sparse` gives them (unit-norm
when `SAEConfig.normalize_codes`, so the score is their cosine), the similarity the model is trained
with. Built with ``idf_power`` a > 0, the index scores an idf-weighted cosine instead: every
latent t's values, in documents and queries alike, are multiplied by idf_t^a, idf_t = ln((N + 1) /
(df_t + 0.5)) with df_t the documents holding t, and each code is rescaled to its own norm, so a
latent most documents share counts for less than a rare one (BM25's idf on latents instead of
words). The weights are the index's own statistics (`latent_weights`), derived from the posting
lists, so a saved index keeps them. `SparseIndex` holds the documents as an inverted index, one
posting list per latent in CSC form:

  offsets int64 [S+1]   latent t's postings are docs/weights[offsets[t]:offsets[t+1]]
  docs    int32 [nnz]   rows, ascending within each list
  weights float32 [nnz] (or float16: half the memory of the weights, each weight rounded to the
                        nearest float16; search is then exact for the rounded weights)
  doc_ids int64 [N]     the caller's id of each row, ascending (rows are stored in doc id order)

Entry points:
  * `SparseIndex.search`: exact top-k on CPU in compiled kernels
    (`saejax.retrieval.index_kernels`: blocked term-at-a-time scoring with dense columns for head
    latents; the docstring there says why hand-written kernels and how). Single-threaded unless
    ``num_threads`` > 1 splits a large batch over threads by queries, or a few queries (one
    alone) by document ranges whose rankings are merged; the kernel releases the GIL, so
    callers' own threads can also serve queries in parallel.
  * `SparseIndex.search_jax`: the same scores computed with JAX (each document gathers the query's
    dense vector at its latents), for GPUs/TPUs; on CPU it returns what `search` returns.
  * `SparseIndex.save` / `SparseIndex.load`: a directory with ``header.json`` and one ``.npy``
    per array, written atomically (temporary directory, then rename).
  * `SeismicAdapter`: the same codes in Seismic (Bruch et al., SIGIR 2024, "Efficient Inverted
    Indexes for Approximate Retrieval over Learned Sparse Representations"; pyseismic-lsr), an
    approximate engine, for comparison; `recall` measures it against the exact search.
  * `sparse_matrix`: codes as an [N, S] scipy CSR matrix, for exact scoring by a sparse product
    (`saejax.eval.quickeval`) and for latent statistics and steering (`saejax.interpret`).

Result rule, shared by every entry point (and by `saejax.eval.quickeval`): a document is returned
only if its score is > 0 (a document sharing no latent with the query is never a hit); results are
ordered by score descending, ties by lower doc id first; a query with fewer than ``top_k`` hits
is padded with score -inf and doc id -1. Scores are float32 sums whose summation order differs
between implementations, so two implementations may order documents whose scores differ by a few
ulps differently; with weights that sum exactly (e.g. small multiples of 1/8) they agree exactly.

Shape letters: N documents, K latents per document code, Q queries, R latents per query code,
S latents in the dictionary, nnz stored postings.
"""

import concurrent.futures
import functools
import json
import os
import shutil
import tokenize
import uuid
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jaxtyping import Array, Float, Int

from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.retrieval import index_kernels as kernels

WeightDtype = Literal["float32", "float16"]
FORMAT = "saejax.SparseIndex"
FORMAT_VERSION = 1
HEADER = "header.json"
# Latents held by at least this fraction of documents are scored as dense columns (see
# `saejax.retrieval.index_kernels`): 0.1 measured best on head-heavy Zipf codes, 0.05-0.15 within
# noise.
DENSE_FRACTION = 0.1
# The idf power saejax's searches use (the evaluation harness, corpus indexes, the MTEB adapter);
# `SparseIndex.build` itself defaults to 0, the plain dot product. On a joint run's k = 64 codes
# 0.5 lifts mean nDCG@10 over SciFact, Cranfield and Debian 0.615 -> 0.620, every set up; on
# held-out paraphrase retrieval (STS-B, SICK, MRPC test pairs) 0.8265 -> 0.8272 (RESULTS.md
# "Quality", session 23).
IDF_POWER = 0.5
# `SparseIndex.search` splits fewer queries than a batch per thread over document ranges when each
# thread gets at least this much work (`index_kernels.search_cost_ns`, ns on one thread); below it
# the hand-off between threads (~60 us) and the merge cost more than they save. One query alone on
# the frozen arm's real k = 64 codes, p50 1 thread vs every query split over 2 (estimated work):
# 100k documents 0.120 vs 0.151 ms (0.12 ms), 150k 0.176 vs 0.182 (0.19), 300k 0.40 vs 0.30
# (0.37), 1M 1.21 vs 0.76 (1.23); queries estimated at 0.3-0.4 ms at 150k-200k gain 1.1-1.2x
# (benchmarks/RESULTS.md, session 33).
MIN_SHARE_NS = 150_000
# Elements of the [queries, documents, latents] gather that `search_jax` holds at once.
_JAX_GATHER_BUDGET = 1 << 26
# Postings `_weigh_rows` weighs at once (float64 temporaries of a few MiB, whatever the corpus).
_WEIGH_CHUNK = 1 << 18


def sparse_matrix(values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
                  num_latents: int) -> sp.csr_matrix:
  """[N, S] CSR matrix of TopK codes; zero values (ReLU after TopK) are not stored."""
  n, k = values.shape
  # Copies: scipy compacts the index array in place when it drops zeros, and a reshape is a view
  # of the caller's array.
  m = sp.csr_matrix((values.reshape(-1).astype(np.float32), indices.reshape(-1).copy(),
                     np.arange(n + 1, dtype=np.int64) * k), shape=(n, num_latents))
  m.sum_duplicates()
  m.eliminate_zeros()
  return m


class IndexArraysError(DataError):
  """The arrays given to `SparseIndex` do not form a valid index; ``array`` names the bad one."""

  def __init__(self, array: str, message: str):
    super().__init__(f"{array}: {message}")
    self.array, self.message = array, message


class SparseIndex:
  """An inverted index over sparse codes with exact top-k search (see the module docstring).

  Build with `SparseIndex.build` or `SparseIndex.load`; the arrays are read-only afterwards.
  Besides the stored arrays, the index derives at construction: skip pointers per block of
  `index_kernels.BLOCK` rows (8 bytes x S per block) and dense float32 copies of the latents held
  by at least ``dense_fraction`` of the documents (4 bytes x N each); `nbytes` counts it all.
  """

  def __init__(self, offsets: Int[np.ndarray, "S+1"], docs: Int[np.ndarray, "nnz"],
               weights: Float[np.ndarray, "nnz"], doc_ids: Int[np.ndarray, "N"], *,
               dense_fraction: float = DENSE_FRACTION, idf_power: float = 0.0):
    """Wrap the index arrays (`build` and `load` make them); their structure is checked here.

    ``weights`` are the documents' values as scored (already idf-weighted when ``idf_power`` > 0);
    ``idf_power`` weights the queries to match.

    Raises:
      IndexArraysError: arrays of the wrong dtype or shape, or not a valid inverted index
        (everything the compiled kernels rely on for memory safety is checked).
      ConfigError: a bad dense_fraction or idf_power.
    """
    if not isinstance(dense_fraction, (int, float)) or not dense_fraction > 0:
      raise ConfigError(f"dense_fraction={dense_fraction!r} must be > 0 (above 1: no dense "
                        f"columns)")
    check_idf_power(idf_power)
    _check_arrays(offsets, docs, weights, doc_ids)
    # Read-only views: the kernels' safety rests on the checks above staying true.
    self.offsets, self.docs, self.weights, self.doc_ids = (
        a.view() for a in (offsets, docs, weights, doc_ids))
    for a in (self.offsets, self.docs, self.weights, self.doc_ids):
      a.flags.writeable = False
    self.dense_fraction = float(dense_fraction)
    self.idf_power = float(idf_power)
    self.latent_weights = latent_idf(np.diff(offsets), self.num_docs, self.idf_power)
    self.latent_weights.flags.writeable = False
    # float16 weights reach the kernels as their bits, widened through a lookup table.
    self._kernel_weights = weights.view(np.uint16) if weights.dtype == np.float16 else weights
    self._block = kernels.BLOCK  # the skips are only valid for the block they were made with
    self._skips = kernels.block_skips(offsets, docs, self.num_docs, self._block)
    lengths = np.diff(offsets)
    dense = np.flatnonzero((lengths >= dense_fraction * self.num_docs) & (lengths > 0))
    self._dense_slot = np.full(self.num_latents, -1, dtype=np.int64)
    self._dense_slot[dense] = np.arange(dense.size)
    self._dense_cols = kernels.fill_dense_columns(offsets, docs, self._kernel_weights,
                                                  kernels.HALF_TO_FLOAT, dense.astype(np.int64),
                                                  self.num_docs)
    self._jax_forward = None  # (latents [N, K], weights [N, K]) on device, made on first use

  # -------------------------------------------------------------------------------------------
  # Construction

  @classmethod
  def build(cls, values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
            num_latents: int, doc_ids: Int[np.ndarray, "N"] | None = None, *,
            dtype: WeightDtype = "float32", dense_fraction: float = DENSE_FRACTION,
            idf_power: float = 0.0) -> "SparseIndex":
    """Index N document codes.

    Zero values are not stored (a TopK code's ReLU zeros); a latent repeated within one row has
    its values summed (as `saejax.retrieval.index.sparse_matrix` does).

    Args:
      values: [N, K] weights of each document's active latents.
      indices: [N, K] latent ids in [0, num_latents).
      num_latents: S, the SAE dictionary size.
      doc_ids: [N] distinct integer ids (default: 0 .. N-1); search returns these.
      dtype: weight storage, "float32" or "float16" (half the weight memory; weights are rounded
        to float16 and must have magnitude <= 65504).
      dense_fraction: latents held by at least this fraction of documents are also kept as
        dense float32 columns for faster scoring (above 1: none); it changes speed, never
        results.
      idf_power: a > 0 scores the idf-weighted cosine (module docstring) with idf^a, the idf
        from these documents; 0 (default) scores the codes' plain dot product.

    Raises:
      DataError: shapes that do not fit, an index out of range, a non-finite value, duplicate
        doc ids, a value too large for float16.
      ConfigError: a bad num_latents, dtype, dense_fraction or idf_power.
    """
    if not isinstance(num_latents, (int, np.integer)) or num_latents < 1:
      raise ConfigError(f"num_latents={num_latents!r} must be a positive int")
    if dtype not in ("float32", "float16"):
      raise ConfigError(f"dtype={dtype!r} must be 'float32' or 'float16'")
    check_idf_power(idf_power)
    values, indices = _check_codes(values, indices, int(num_latents), "document")
    n = values.shape[0]
    if n >= 2**31:
      raise DataError(f"{n:,} documents exceed the int32 row ids of the index")
    doc_ids = _check_doc_ids(doc_ids, n)
    order = np.argsort(doc_ids, kind="stable")  # rows in doc id order: ties go to lower doc ids
    values, indices, doc_ids = values[order], indices[order], doc_ids[order]
    k = values.shape[1]
    csr = sp.csr_matrix((values.reshape(-1), indices.reshape(-1),
                         np.arange(n + 1, dtype=np.int64) * k), shape=(n, int(num_latents)))
    csr.sum_duplicates()
    csr.eliminate_zeros()
    if idf_power:
      df = np.bincount(csr.indices, minlength=int(num_latents))
      # In place: csr.data is built from the reordered copy above, never the caller's values.
      csr.data = _weigh_rows(csr.data, csr.indices, np.diff(csr.indptr),
                             latent_idf(df, n, idf_power))
    csc = csr.tocsc()
    csc.sort_indices()
    weights = csc.data.astype(np.float32)
    if dtype == "float16":
      too_big = np.abs(weights) > np.finfo(np.float16).max
      if too_big.any():
        raise DataError(f"{int(too_big.sum())} document values exceed float16's range "
                        f"(|value| > 65504, largest {np.abs(weights).max():g}); use "
                        f"dtype='float32'")
      weights = weights.astype(np.float16)
    return cls(csc.indptr.astype(np.int64), csc.indices.astype(np.int32), weights, doc_ids,
               dense_fraction=dense_fraction, idf_power=idf_power)

  # -------------------------------------------------------------------------------------------
  # Properties

  @property
  def num_docs(self) -> int:
    return int(self.doc_ids.shape[0])

  @property
  def num_latents(self) -> int:
    return int(self.offsets.shape[0] - 1)

  @property
  def nnz(self) -> int:
    return int(self.docs.shape[0])

  @property
  def dtype(self) -> WeightDtype:
    return "float16" if self.weights.dtype == np.float16 else "float32"

  @property
  def num_dense(self) -> int:
    """Latents also held as dense columns."""
    return int(self._dense_cols.shape[0])

  @property
  def nbytes(self) -> int:
    """Host memory of the index: stored arrays plus skip pointers and dense columns."""
    return sum(a.nbytes for a in (self.offsets, self.docs, self.weights, self.doc_ids,
                                  self._skips, self._dense_slot, self._dense_cols))

  def __repr__(self) -> str:
    return (f"SparseIndex(num_docs={self.num_docs:,}, num_latents={self.num_latents:,}, "
            f"nnz={self.nnz:,}, dtype={self.dtype}, dense={self.num_dense}, "
            f"{f'idf_power={self.idf_power:g}, ' if self.idf_power else ''}"
            f"{self.nbytes / 2**20:.1f} MiB)")

  # -------------------------------------------------------------------------------------------
  # Search

  def search(self, q_values: Float[np.ndarray, "Q R"], q_indices: Int[np.ndarray, "Q R"],
             top_k: int = 10, *, num_threads: int = 1
             ) -> tuple[Float[np.ndarray, "Q top_k"], Int[np.ndarray, "Q top_k"]]:
    """Exact top-``top_k`` documents of each query, on CPU.

    Args:
      q_values: [Q, R] query weights (any sign: negative weights suppress latents).
      q_indices: [Q, R] query latents in [0, S); R need not equal the documents' K.
      top_k: results per query; may exceed the number of documents.
      num_threads: threads searching at once (the kernel releases the GIL; each thread needs
        its own core to gain). A batch of at least `index_kernels.QUERY_BATCH` queries a thread
        is split into contiguous shares of the queries; fewer queries (one query alone) into
        contiguous ranges of the documents, each thread's best rows merged into one ranking, so
        that a lone query's latency also drops with cores. Queries too light to split (under
        `MIN_SHARE_NS` of estimated work a thread) are searched on the caller's thread. The
        results do not depend on it.

    Returns:
      (scores float32 [Q, top_k], doc ids int64 [Q, top_k]) under the module's result rule:
      scores > 0 descending, ties by lower doc id, padding -inf / -1.

    Raises:
      DataError: query codes of the wrong shape, out-of-range latents, non-finite values.
      ConfigError: a bad top_k or num_threads, or [Q, top_k] results larger than the machine's
        memory.
    """
    top_k, num_threads = _check_top_k(top_k), _check_num_threads(num_threads)
    q_values, q_indices = self._queries(q_values, q_indices)
    num_q, num_blocks = len(q_values), self._skips.shape[1] - 1
    self._check_result_size(num_q, top_k)
    # No query has more hits than documents: the kernel ranks at that depth (its heaps hold depth
    # entries a query) and `_ranked` pads to top_k.
    depth = min(top_k, max(1, self.num_docs))

    def ranked(lo: int, hi: int, block_lo: int = 0, block_hi: int = num_blocks):
      return kernels.search_kernel(
          self._skips, self.docs, self._kernel_weights, kernels.HALF_TO_FLOAT, self._dense_slot,
          self._dense_cols, self.num_docs, self._block, q_indices[lo:hi], q_values[lo:hi], depth,
          kernels.QUERY_BATCH, block_lo, block_hi)

    query_shares = min(num_threads, max(1, num_q // kernels.QUERY_BATCH))
    if query_shares > 1:
      bounds = _shares(num_q, query_shares)
      parts = _in_threads(ranked, [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])])
      return self._ranked(np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts]), top_k)
    row_shares = 1 if num_threads == 1 else min(num_threads, num_blocks, int(
        kernels.search_cost_ns(self.offsets, self._dense_slot, q_indices, q_values, self.num_docs)
        // MIN_SHARE_NS))
    if row_shares > 1:
      bounds = _shares(num_blocks, row_shares)
      parts = _in_threads(ranked, [(0, num_q, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])])
      return self._ranked(*kernels.merge_ranked(np.stack([p[0] for p in parts]),
                                                np.stack([p[1] for p in parts])), top_k)
    return self._ranked(*ranked(0, num_q), top_k)

  def search_jax(self, q_values: Float[np.ndarray, "Q R"], q_indices: Int[np.ndarray, "Q R"],
                 top_k: int = 10, *, query_chunk: int = 0
                 ) -> tuple[Float[np.ndarray, "Q top_k"], Int[np.ndarray, "Q top_k"]]:
    """`search` with the scores computed by JAX on the default device (GPU/TPU where present).

    Each document gathers the query's dense [S] vector at its K latents and sums the products
    (a gather, which accelerators do well, rather than a scatter over postings), then
    `jax.lax.top_k` keeps the best, lower index first on ties. The documents' [N, K] forward
    arrays are moved to the device on first use and kept there.

    Args:
      q_values: [Q, R] query weights.
      q_indices: [Q, R] query latents.
      top_k: results per query.
      query_chunk: queries scored per device call (0: as many as keep the [chunk, N, K] gather
        under 2^26 elements). Every call has the same shape, so one compilation serves all.

    Returns, Raises:
      As `search`.
    """
    top_k = _check_top_k(top_k)
    q_values, q_indices = self._queries(q_values, q_indices)
    if not isinstance(query_chunk, int) or query_chunk < 0:
      raise ConfigError(f"query_chunk={query_chunk!r} must be an int >= 0")
    num_q = q_values.shape[0]
    self._check_result_size(num_q, top_k)
    depth = min(top_k, self.num_docs)
    top_s = np.full((num_q, depth), -np.inf, dtype=np.float32)
    top_r = np.full((num_q, depth), -1, dtype=np.int32)
    if num_q == 0 or depth == 0:
      return self._ranked(top_s, top_r, top_k)
    fwd_latents, fwd_weights = self._device_forward()
    chunk = query_chunk or max(1, _JAX_GATHER_BUDGET // max(1, fwd_latents.size))
    chunk = min(chunk, num_q)
    for start in range(0, num_q, chunk):
      stop = min(num_q, start + chunk)
      pad = chunk - (stop - start)  # the last chunk is padded with empty queries: one shape
      qv = np.pad(q_values[start:stop], ((0, pad), (0, 0)))
      qi = np.pad(q_indices[start:stop], ((0, pad), (0, 0)))
      s, r = _jax_top(fwd_latents, fwd_weights, jnp.asarray(qi), jnp.asarray(qv),
                      num_latents=self.num_latents, depth=depth)
      top_s[start:stop] = np.asarray(s)[:stop - start]
      top_r[start:stop] = np.asarray(r)[:stop - start]
    miss = ~(top_s > 0)  # sorted descending: the misses trail
    top_s[miss], top_r[miss] = -np.inf, -1
    return self._ranked(top_s, top_r, top_k)

  def _queries(self, q_values, q_indices) -> tuple[Float[np.ndarray, "Q R"], Int[np.ndarray, "Q R"]]:
    """Checked query codes, weighted as the documents are (``idf_power`` > 0)."""
    q_values, q_indices = _check_codes(q_values, q_indices, self.num_latents, "query")
    if self.idf_power:  # the kernel itself: the indices were just checked
      q_values = kernels.weigh_codes(q_values, q_indices, self.latent_weights)
    return q_values, q_indices

  def _device_forward(self) -> tuple[Array, Array]:
    """The documents' codes as padded rows [N, K] (latent 0 with weight 0 as padding), on device."""
    if self._jax_forward is None:
      csr = sp.csc_matrix((self.weights, self.docs, self.offsets),
                          shape=(self.num_docs, self.num_latents)).tocsr()
      counts = np.diff(csr.indptr)
      width = max(1, int(counts.max(initial=0)))
      rows = np.repeat(np.arange(self.num_docs), counts)
      cols = np.arange(csr.nnz) - np.repeat(csr.indptr[:-1], counts)
      latents = np.zeros((self.num_docs, width), dtype=np.int32)
      weights = np.zeros((self.num_docs, width), dtype=self.weights.dtype)
      latents[rows, cols], weights[rows, cols] = csr.indices, csr.data
      self._jax_forward = (jnp.asarray(latents), jnp.asarray(weights))
    return self._jax_forward

  def _ranked(self, scores: Float[np.ndarray, "Q depth"], rows: Int[np.ndarray, "Q depth"],
              top_k: int) -> tuple[Float[np.ndarray, "Q top_k"], Int[np.ndarray, "Q top_k"]]:
    """Ranked rows (best first, padding -1 at the end: the kernel's and `jax.lax.top_k`'s order)
    as doc ids, padded with (-inf, -1) from depth to ``top_k`` columns."""
    num_q, depth = rows.shape
    ids = (np.where(rows >= 0, self.doc_ids[rows], -1) if self.num_docs
           else np.full(rows.shape, -1, dtype=np.int64))
    if depth == top_k:
      return scores, ids
    out_s = np.full((num_q, top_k), -np.inf, dtype=np.float32)
    out_ids = np.full((num_q, top_k), -1, dtype=np.int64)
    out_s[:, :depth], out_ids[:, :depth] = scores, ids
    return out_s, out_ids

  def _check_result_size(self, num_q: int, top_k: int) -> None:
    """ConfigError when [Q, top_k] results (float32 scores, int64 doc ids) exceed this machine's
    memory: allocating them would fail inside NumPy, or be granted and filled until the OS kills
    the process."""
    need = num_q * top_k * 12
    memory = _physical_memory()
    if memory and need > memory:
      raise ConfigError(f"top_k={top_k:,} for {num_q:,} queries needs {need / 2**30:,.0f} GiB of "
                        f"results (float32 score + int64 doc id each), more than this machine's "
                        f"{memory / 2**30:,.1f} GiB of memory; the index holds {self.num_docs:,} "
                        f"documents, so a top_k above that only adds padding")

  # -------------------------------------------------------------------------------------------
  # Files

  def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write the index to directory ``path`` atomically; returns ``path``.

    The arrays go to a temporary sibling directory which is renamed to ``path`` once complete,
    so a crash never leaves a half-written index under ``path``. With ``overwrite`` an existing
    index is replaced (moved aside, the new one renamed in, the old one deleted).

    Raises:
      CheckpointError: ``path`` exists and ``overwrite`` is False, or ``path`` is something
        other than a saejax index or an empty directory (``overwrite`` never deletes those).
    """
    path = Path(path)
    if path.exists() and not overwrite:
      raise CheckpointError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not (path.is_dir() and (not any(path.iterdir())
                                                 or _is_index_dir(path))):
      what = "a directory that holds no saejax index" if path.is_dir() else "not a directory"
      raise CheckpointError(f"{path} is {what}; overwrite=True replaces only a saejax index (or "
                            f"an empty directory), so nothing was written: choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
      for name, array in self._stored().items():
        with open(tmp / f"{name}.npy", "wb") as f:
          np.save(f, array, allow_pickle=False)
          f.flush()
          os.fsync(f.fileno())
      header = {"format": FORMAT, "version": FORMAT_VERSION, "num_docs": self.num_docs,
                "num_latents": self.num_latents, "nnz": self.nnz, "dtype": self.dtype,
                "dense_fraction": self.dense_fraction, "idf_power": self.idf_power}
      (tmp / HEADER).write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
      if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
      else:
        tmp.rename(path)
    finally:
      if tmp.exists():
        shutil.rmtree(tmp)
    return path

  def _stored(self) -> dict[str, np.ndarray]:
    return {"offsets": self.offsets, "docs": self.docs, "weights": self.weights,
            "doc_ids": self.doc_ids}

  @classmethod
  def load(cls, path: str | Path, *, dense_fraction: float | None = None) -> "SparseIndex":
    """Read an index written by `save`, checking every array before any search can touch it.

    Args:
      path: the index directory.
      dense_fraction: override the saved `build` setting (speed only).

    Raises:
      CheckpointError: a missing, truncated or corrupt file, or arrays that do not fit together;
        the message names the file.
    """
    path = Path(path)
    if not path.is_dir():
      raise CheckpointError(f"index directory {path} does not exist")
    header = _read_header(path / HEADER)
    n, s, nnz = header["num_docs"], header["num_latents"], header["nnz"]
    expected = {"offsets": (np.int64, (s + 1,)), "docs": (np.int32, (nnz,)),
                "weights": (np.dtype(header["dtype"]), (nnz,)), "doc_ids": (np.int64, (n,))}
    arrays = {}
    for name, (dtype, shape) in expected.items():
      arrays[name] = _read_npy(path / f"{name}.npy")
      if arrays[name].dtype != dtype or arrays[name].shape != shape:
        raise CheckpointError(f"{path / (name + '.npy')} holds {arrays[name].dtype} "
                              f"{arrays[name].shape}; the header {path / HEADER} implies "
                              f"{np.dtype(dtype)} {shape}")
    if dense_fraction is None:
      dense_fraction = header["dense_fraction"]
      if not dense_fraction > 0:
        raise CheckpointError(f"{path / HEADER}: field 'dense_fraction' is {dense_fraction!r}, "
                              f"not > 0 (pass dense_fraction= to load it anyway)")
    try:
      return cls(**arrays, dense_fraction=dense_fraction, idf_power=header.get("idf_power", 0.0))
    except IndexArraysError as e:
      raise CheckpointError(f"{path / (e.array + '.npy')}: {e.message}") from None


# ---------------------------------------------------------------------------------------------
# JAX scoring

@functools.partial(jax.jit, static_argnames=("num_latents", "depth"))
def _jax_top(fwd_latents: Int[Array, "N K"], fwd_weights: Float[Array, "N K"],
             q_indices: Int[Array, "Q R"], q_values: Float[Array, "Q R"], *, num_latents: int,
             depth: int) -> tuple[Float[Array, "Q depth"], Int[Array, "Q depth"]]:
  """Top-``depth`` (scores, rows) of each query: dense query vectors gathered by each document."""
  rows = jnp.arange(q_indices.shape[0])[:, None]
  dense = jnp.zeros((q_indices.shape[0], num_latents), jnp.float32).at[rows, q_indices].add(
      q_values.astype(jnp.float32))
  scores = jnp.sum(dense[:, fwd_latents] * fwd_weights.astype(jnp.float32)[None], axis=-1)
  top_s, top_r = jax.lax.top_k(scores, depth)
  return top_s, top_r.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Threads

@functools.lru_cache(maxsize=None)
def _pool(num_workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """Worker threads kept for the process: starting threads for every search would cost a lone
  query more than its share of the work saves."""
  return concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="saejax-search")


def _in_threads(fn, calls: list[tuple]) -> list:
  """``[fn(*c) for c in calls]``, the first on the caller's thread, the rest on `_pool` workers
  at the same time (a hand-off to a sleeping worker costs ~60 us on a 2-vCPU VM: one fewer)."""
  rest = [_pool(len(calls) - 1).submit(fn, *c) for c in calls[1:]]
  first = fn(*calls[0])
  return [first] + [f.result() for f in rest]


def _shares(n: int, parts: int) -> np.ndarray:
  """int64 [parts + 1]: bounds of ``parts`` contiguous near-equal shares of range(n)."""
  return np.linspace(0, n, parts + 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Validation

def latent_idf(df: Int[np.ndarray, "S"], num_docs: int, power: float) -> Float[np.ndarray, "S"]:
  """idf_t^power per latent, idf_t = ln((N + 1) / (df_t + 0.5)): > 0 for every df_t <= N (a
  latent in every document keeps a small weight), 1 everywhere when power is 0."""
  idf = np.log((num_docs + 1) / (np.asarray(df, np.float64) + 0.5))
  return (idf ** power).astype(np.float32)


def _weigh_rows(values: Float[np.ndarray, "nnz"], latents: Int[np.ndarray, "nnz"],
                row_lengths: Int[np.ndarray, "rows"], latent_weights: Float[np.ndarray, "S"]
                ) -> Float[np.ndarray, "nnz"]:
  """Each row's values (rows stored one after another) times their latents' weights, rescaled to
  the row's own L2 norm (a unit code stays a unit code). In place when ``values`` is float32 (the
  index's CSR data, replaced by the result anyway): a million 64-latent documents are merged into
  one index with this, so the rows are weighed `_WEIGH_CHUNK` postings at a time, which keeps the
  build's peak near the unweighted one (benchmarks/bench_memory.py). Norms are taken in float64:
  float32 squares underflow to 0 for a code of values below ~1e-22 (the document then scored 0
  everywhere, never found) and overflow above ~1e19."""
  weighted = np.asarray(values, np.float32)
  row_lengths = np.asarray(row_lengths, np.int64)
  ends = np.cumsum(row_lengths)
  r0 = 0
  while r0 < len(row_lengths):
    a = int(ends[r0] - row_lengths[r0])
    r1 = max(r0 + 1, int(np.searchsorted(ends, a + _WEIGH_CHUNK, side="right")))
    b = int(ends[r1 - 1])
    row = np.repeat(np.arange(r1 - r0), row_lengths[r0:r1])
    x = weighted[a:b].astype(np.float64)
    before = np.bincount(row, x * x, minlength=r1 - r0)
    x *= latent_weights[latents[a:b]]
    after = np.bincount(row, x * x, minlength=r1 - r0)
    scale = np.sqrt(np.divide(before, after, out=np.zeros(r1 - r0), where=after > 0))
    x *= scale[row]
    weighted[a:b] = x
    r0 = r1
  return weighted


def weigh_codes(values: Float[np.ndarray, "Q R"], indices: Int[np.ndarray, "Q R"],
                latent_weights: Float[np.ndarray, "S"]) -> Float[np.ndarray, "Q R"]:
  """Codes (any sign, a latent possibly repeated in a row) times their latents' weights, each row
  rescaled to the norm it had: the norms are those of the codes with repeats summed (a steered
  query repeats latents), so the result does not depend on how a code splits a latent's value.
  Indices must lie in [0, len(latent_weights)) (`SparseIndex` checks its queries first)."""
  values = np.ascontiguousarray(values, np.float32)
  indices = np.ascontiguousarray(indices)
  latent_weights = np.ascontiguousarray(latent_weights, np.float32)
  if values.shape != indices.shape or values.ndim != 2:
    raise DataError(f"values {values.shape} and indices {indices.shape} must both be [rows, k]")
  if not np.issubdtype(indices.dtype, np.integer):
    raise DataError(f"indices must be integers, got dtype {indices.dtype}")
  if indices.size and not (0 <= indices.min() and indices.max() < len(latent_weights)):
    raise DataError(f"indices must lie in [0, {len(latent_weights)}), the latents weighted")
  return kernels.weigh_codes(values, indices, latent_weights)


def check_idf_power(power) -> None:
  """ConfigError unless ``power`` is a finite number >= 0 (configs call it before any encoding)."""
  if (isinstance(power, bool) or not isinstance(power, (int, float, np.floating))
      or not np.isfinite(power) or power < 0):
    raise ConfigError(f"idf_power={power!r} must be a finite number >= 0 (0: no idf weighting)")


def _check_top_k(top_k) -> int:
  if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
    raise ConfigError(f"top_k={top_k!r} must be an int >= 1")
  return int(top_k)


@functools.lru_cache(maxsize=None)
def _physical_memory() -> int:
  """Bytes of RAM on this machine, 0 where sysconf cannot tell (Windows)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):
    return 0


def _check_num_threads(num_threads) -> int:
  if (not isinstance(num_threads, (int, np.integer)) or isinstance(num_threads, bool)
      or num_threads < 1):
    raise ConfigError(f"num_threads={num_threads!r} must be an int >= 1")
  return int(num_threads)


def _check_codes(values, indices, num_latents: int, what: str
                 ) -> tuple[Float[np.ndarray, "N K"], Int[np.ndarray, "N K"]]:
  """(values float32, indices int32) of [rows, k] codes, or a DataError naming the problem."""
  try:
    values, indices = np.asarray(values), np.asarray(indices)
  except ValueError as e:  # ragged nested lists
    raise DataError(f"{what} codes must be rectangular [rows, k] arrays ({e})") from None
  if values.ndim != 2 or values.shape != indices.shape:
    raise DataError(f"{what} values {values.shape} and indices {indices.shape} must both be "
                    f"[rows, k] with the same shape (one query: add a leading axis, x[None])")
  if indices.size and not np.issubdtype(indices.dtype, np.integer):
    raise DataError(f"{what} indices must be integers, got dtype {indices.dtype}")
  if values.size and not (np.issubdtype(values.dtype, np.floating)
                          or np.issubdtype(values.dtype, np.integer)):
    raise DataError(f"{what} values must be numbers, got dtype {values.dtype}")
  bad = (indices < 0) | (indices >= num_latents)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise DataError(f"{what} indices[{row}, {col}] = {indices[row, col]} is outside "
                    f"[0, {num_latents}) ({int(bad.sum())} such entries)")
  values = values.astype(np.float32)
  bad = ~np.isfinite(values)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise DataError(f"{what} values[{row}, {col}] = {values[row, col]} is not finite "
                    f"({int(bad.sum())} such entries, as float32)")
  return np.ascontiguousarray(values), np.ascontiguousarray(indices, dtype=np.int32)


def _check_doc_ids(doc_ids, n: int) -> Int[np.ndarray, "N"]:
  if doc_ids is None:
    return np.arange(n, dtype=np.int64)
  doc_ids = np.asarray(doc_ids)
  if doc_ids.shape != (n,):
    raise DataError(f"doc_ids has shape {doc_ids.shape}; expected ({n},), one per document row")
  if n and not np.issubdtype(doc_ids.dtype, np.integer):
    raise DataError(f"doc_ids must be integers, got dtype {doc_ids.dtype}")
  if n and doc_ids.dtype == np.uint64 and doc_ids.max() > np.iinfo(np.int64).max:
    raise DataError(f"doc_ids must fit int64 (the index stores them so); got {doc_ids.max()}")
  doc_ids = doc_ids.astype(np.int64)
  if n and doc_ids.min() < 0:
    raise DataError(f"doc_ids must be >= 0 (-1 marks a missing result); got {doc_ids.min()}")
  unique, counts = np.unique(doc_ids, return_counts=True)
  if unique.size != n:
    dup = unique[counts > 1]
    raise DataError(f"doc_ids has {dup.size} duplicated ids, e.g. {dup[:5].tolist()} "
                    f"(at rows {np.flatnonzero(doc_ids == dup[0]).tolist()[:5]})")
  return doc_ids


def _is_index_dir(path: Path) -> bool:
  """Whether ``path`` holds an index `SparseIndex.save` wrote (its header names the format)."""
  try:
    return json.loads((path / HEADER).read_text(encoding="utf-8")).get("format") == FORMAT
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
    return False


def _read_header(file: Path) -> dict:
  try:
    header = json.loads(file.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise CheckpointError(f"{file} is missing: not a saejax index directory") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file} is not readable JSON ({e})") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise CheckpointError(f"{file} is not a {FORMAT} header")
  if header.get("version") != FORMAT_VERSION:
    raise CheckpointError(f"{file} has format version {header.get('version')!r}; this saejax "
                          f"reads version {FORMAT_VERSION}")
  for key, kind in (("num_docs", int), ("num_latents", int), ("nnz", int), ("dtype", str),
                    ("dense_fraction", (int, float))):
    if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
      raise CheckpointError(f"{file}: field {key!r} is missing or not a {kind}")
  if header["dtype"] not in ("float32", "float16"):
    raise CheckpointError(f"{file}: dtype {header['dtype']!r} is not float32 or float16")
  try:
    check_idf_power(header.get("idf_power", 0.0))  # absent in indexes saved before idf weighting
  except ConfigError:
    raise CheckpointError(f"{file}: field 'idf_power' is {header['idf_power']!r}, not a finite "
                          f"number >= 0") from None
  return header


def _read_npy(file: Path) -> np.ndarray:
  if not file.is_file():
    raise CheckpointError(f"{file} is missing from the index directory")
  try:
    with open(file, "rb") as f:
      # The header first: numpy parses it as a Python literal, so a damaged one fails with
      # SyntaxError or tokenize.TokenError (found by the long fuzz run), and one that claims a
      # shape far beyond the file would have np.load try to allocate it (MemoryError).
      version = np.lib.format.read_magic(f)
      if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} (np.save writes 1.0 or 2.0)")
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
      need = int(np.prod(shape, dtype=object)) * dtype.itemsize
      if need > file.stat().st_size - f.tell():
        raise ValueError(f"its header claims shape {shape} of {dtype}: more bytes than the file")
      f.seek(0)
      return np.load(f, allow_pickle=False)
  except (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError) as e:
    raise CheckpointError(f"{file} is truncated or not a .npy array ({e})") from None


def _check_arrays(offsets: np.ndarray, docs: np.ndarray, weights: np.ndarray,
                  doc_ids: np.ndarray) -> None:
  """Raise IndexArraysError unless the arrays form an index the kernels can read safely:
  dtypes, shapes, offsets non-decreasing from 0 to nnz, rows in range and strictly ascending
  within each list, finite weights, doc ids strictly ascending."""
  expected = {"offsets": (offsets, (np.int64,)), "docs": (docs, (np.int32,)),
              "weights": (weights, (np.float32, np.float16)), "doc_ids": (doc_ids, (np.int64,))}
  for name, (a, dtypes) in expected.items():
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype not in dtypes:
      raise IndexArraysError(name, f"expected a 1-d array of {[np.dtype(d).name for d in dtypes]}"
                                   f", got {getattr(a, 'dtype', type(a))} "
                                   f"{getattr(a, 'shape', '')}")
  n, nnz = doc_ids.shape[0], docs.shape[0]
  if weights.shape[0] != nnz:
    raise IndexArraysError("weights", f"{weights.shape[0]} weights for {nnz} postings")
  if offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != nnz or (np.diff(offsets) < 0).any():
    raise IndexArraysError("offsets", f"not non-decreasing from 0 to nnz={nnz} over >= 1 latent")
  if nnz and (docs.min() < 0 or docs.max() >= n):
    raise IndexArraysError("docs", f"rows outside [0, {n})")
  starts = np.zeros(nnz, dtype=bool)
  starts[offsets[:-1][offsets[:-1] < nnz]] = True
  if nnz > 1 and ((np.diff(docs) <= 0) & ~starts[1:]).any():
    raise IndexArraysError("docs", "rows are not strictly ascending within a posting list")
  if not np.isfinite(weights).all():
    raise IndexArraysError("weights", "non-finite weights")
  if n > 1 and (np.diff(doc_ids) <= 0).any():
    raise IndexArraysError("doc_ids", "not strictly ascending")


# ---------------------------------------------------------------------------------------------
# Seismic

def recall(found: Int[np.ndarray, "Q top_k"], exact: Int[np.ndarray, "Q top_k"]) -> float:
  """Mean over queries of |found ∩ exact| / |exact| (ids -1 ignored; queries with no exact hit
  are left out; 1.0 when none has one)."""
  found, exact = np.asarray(found), np.asarray(exact)
  if found.shape[0] != exact.shape[0]:
    raise DataError(f"found {found.shape} and exact {exact.shape} differ in number of queries")
  per_query = []
  for f, e in zip(found, exact):
    truth = set(e[e >= 0].tolist())
    if truth:
      per_query.append(len(truth & set(f[f >= 0].tolist())) / len(truth))
  return float(np.mean(per_query)) if per_query else 1.0


class SeismicAdapter:
  """The same codes in a Seismic index (pyseismic-lsr), approximate, for comparison.

  Latents become Seismic's string tokens ("42" for latent 42), doc ids become strings. Seismic's
  `batch_search` returns per-query result lists out of query order; they are keyed back by query
  id here. Results follow the module's result rule (scores > 0, padding -inf / -1), but the
  documents found are approximate: measure them with `recall` against `SparseIndex.search`.
  """

  def __init__(self, index, num_latents: int):
    """Wrap a built Seismic index; use `SeismicAdapter.build`."""
    self.index, self.num_latents = index, num_latents

  @classmethod
  def build(cls, values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
            num_latents: int, doc_ids: Int[np.ndarray, "N"] | None = None, *,
            n_postings: int = 3500, centroid_fraction: float = 0.1, summary_energy: float = 0.4,
            doc_cut: int = 15, num_threads: int = 1) -> "SeismicAdapter":
    """Build a Seismic index from document codes (Seismic's parameter names and defaults).

    Args:
      values, indices, num_latents, doc_ids: as `SparseIndex.build`.
      n_postings: average postings kept per latent (Seismic's static pruning).
      centroid_fraction: fraction of a list's postings used as cluster centroids (blocks).
      summary_energy: fraction of a block's mass kept in its summary vector.
      doc_cut: latents per document used when clustering.
      num_threads: build threads (0: all cores).

    Raises:
      ConfigError: pyseismic-lsr is not installed.
    """
    seismic = _import_seismic()
    if not isinstance(num_latents, (int, np.integer)) or num_latents < 1:
      raise ConfigError(f"num_latents={num_latents!r} must be a positive int")
    values, indices = _check_codes(values, indices, int(num_latents), "document")
    n, k = values.shape
    doc_ids = _check_doc_ids(doc_ids, n)
    # Copies: scipy keeps views of its inputs, and sum_duplicates sorts them in place (the caller's
    # int32 indices would come back scrambled, out of step with their values).
    csr = sp.csr_matrix((values.reshape(-1).copy(), indices.reshape(-1).copy(),
                         np.arange(n + 1, dtype=np.int64) * k), shape=(n, int(num_latents)))
    csr.sum_duplicates()  # also sorts each row: Seismic needs strictly increasing components
    csr.eliminate_zeros()
    dataset = seismic.SeismicDataset()
    dataset.add_documents_by_id([str(d) for d in doc_ids.tolist()],
                                csr.indices.astype(np.int64), csr.data.astype(np.float32),
                                csr.indptr.astype(np.int64))
    # Seismic's default index stores components as u16; wider dictionaries need the LV variant.
    kind = seismic.SeismicIndex if num_latents <= 1 << 16 else seismic.SeismicIndexLV
    index = kind.build_from_dataset(dataset, n_postings=n_postings,
                                    centroid_fraction=centroid_fraction,
                                    summary_energy=summary_energy, doc_cut=doc_cut,
                                    num_threads=num_threads)
    return cls(index, int(num_latents))

  def search(self, q_values: Float[np.ndarray, "Q R"], q_indices: Int[np.ndarray, "Q R"],
             top_k: int = 10, *, query_cut: int = 10, heap_factor: float = 0.7,
             num_threads: int = 1
             ) -> tuple[Float[np.ndarray, "Q top_k"], Int[np.ndarray, "Q top_k"]]:
    """Approximate top-``top_k`` documents of each query.

    Args:
      q_values, q_indices: as `SparseIndex.search`.
      top_k: results per query.
      query_cut: only the query's ``query_cut`` largest latents are looked up.
      heap_factor: a block is scanned when its summary score exceeds heap_factor x the current
        k-th score (1.0: safest, lower: faster).
      num_threads: search threads (0: all cores).

    Returns:
      As `SparseIndex.search`.
    """
    seismic = _import_seismic()
    top_k = _check_top_k(top_k)
    q_values, q_indices = _check_codes(q_values, q_indices, self.num_latents, "query")
    num_q = q_values.shape[0]
    scores = np.full((num_q, top_k), -np.inf, dtype=np.float32)
    ids = np.full((num_q, top_k), -1, dtype=np.int64)
    string = seismic.get_seismic_string()
    qids, comps, vals, asked = [], [], [], []
    for q in range(num_q):
      latents, weights = _sum_duplicates(q_indices[q], q_values[q])
      if latents.size:  # Seismic answers nothing useful for an empty query
        qids.append(str(q))
        comps.append(latents.astype(str).astype(string))
        vals.append(weights)
        asked.append(q)
    if not asked:
      return scores, ids
    results = self.index.batch_search(np.array(qids, dtype=string), comps, vals, k=top_k,
                                      query_cut=query_cut, heap_factor=heap_factor,
                                      num_threads=num_threads)
    by_query = {hits[0][0]: hits for hits in results if hits}  # out of order: key by query id
    for q in asked:
      hits = [(score, int(doc)) for _, score, doc in by_query.get(str(q), []) if score > 0]
      hits.sort(key=lambda h: (-h[0], h[1]))
      for j, (score, doc) in enumerate(hits[:top_k]):
        scores[q, j], ids[q, j] = score, doc
    return scores, ids


def _sum_duplicates(latents: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One entry per distinct latent with a non-zero summed weight."""
  unique, inverse = np.unique(latents, return_inverse=True)
  summed = np.zeros(unique.size, dtype=np.float32)
  np.add.at(summed, inverse, weights)
  keep = summed != 0
  return unique[keep], summed[keep]


def _import_seismic():
  try:
    import seismic  # pylint: disable=import-outside-toplevel  (optional comparison engine)
  except ImportError:
    raise ConfigError("SeismicAdapter needs pyseismic-lsr: pip install pyseismic-lsr") from None
  return seismic
