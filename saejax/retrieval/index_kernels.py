"""Compiled (numba) kernels of `saejax.retrieval.index`: exact sparse top-k over an inverted index.

Why hand-written kernels: the index IS the product's search engine, and the work per query is a
scatter-accumulate over ~10^5-10^6 postings followed by a top-k. scipy does it as a general sparse
product whose [queries, documents] result must then be densified and partitioned; here one
compiled loop streams each posting once into a cache-resident accumulator and keeps only a top-k
heap, ~10x faster single-threaded (benchmarks/RESULTS.md).

The scoring is term-at-a-time with a dense accumulator (Turtle & Flood 1995, "Query evaluation:
strategies and optimizations"; Buckley & Lewit 1985), made cache-friendly in two ways:
  * documents are scored in blocks of `BLOCK` rows, so the accumulator stays in L1 while every
    query term's postings for that block are added; skip pointers (`block_skips`) give each
    posting list's range in each block (lists are sorted by row), and each range's first cache
    lines are prefetched a few lists ahead (by the time a list is revisited for the next block,
    the rest of the batch has evicted it: without the prefetch the sparse part ran ~2x slower);
  * latents held by a large fraction of documents (head latents of a Zipf-like code distribution:
    a TopK SAE's most frequent latents fire on most texts) are stored as dense columns and added
    with a vectorised axpy, 8 columns per pass, instead of a scatter. A dense column costs 4 bytes
    per document, a posting 8 bytes per holder, and the axpy runs ~15x faster per element than the
    scatter on AVX2, so a latent held by >= ~10% of documents is cheaper dense.
Queries are processed in batches of `QUERY_BATCH` so that a block's dense column slices, read from
memory once, serve every query of the batch.

Exactness: every document's score is the float32 sum of q_t * w_t over the latents it shares with
the query (summation order differs from a dense matmul, so scores can differ by a few ulps). Only
documents with a score > 0 are candidates (as in `saejax.eval.quickeval`: no shared latent, no hit).
Ties are broken by the lower row first; rows are in ascending doc id order (see `SparseIndex`), so
this is "lower doc id first". Rows pass through a bounded heap of `top_k` entries whose root is the
worst entry (lowest score, then highest row); a row enters only with a strictly higher score than
the root, which, rows arriving in ascending order, implements the tie rule. Each query's heap is
then sorted in place, so results leave the kernel ranked.

Weights are float32, or float16 read through a 65,536-entry float32 lookup table: numba has no
float16 arithmetic, and the table (256 KiB) converts exactly.
"""

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

# Rows per accumulator block: 32 KiB of float32, L1d-sized, while a query's terms are added.
# Measured on an AMD EPYC (Zen 3) at N=100k, k=64 and 128: 4096-16384 within ~10%, 8192 best.
BLOCK = 8192
# Queries sharing one pass over a block: a block's dense column slices (H x 32 KiB) are read from
# memory once per batch instead of once per query (dense part ~2.4x faster than batch 1 at
# N=100k, k=128; 128-512 within noise).
QUERY_BATCH = 256
_CHUNK = 128  # accumulator entries tested at once for a heap candidate
_AHEAD = 4  # posting runs whose first cache lines are prefetched ahead of the one being added
# Cache lines prefetched per run: in a batch, the hardware prefetcher follows the rest (the block's
# postings are in L3, read by the batch's other queries); a query searched alone finds them in
# memory, where prefetching whole runs (up to 64 lines) answers it ~15% sooner (1M documents) but
# would cost a batch ~5%.
_RUN_LINES = 4
_COLD_RUN_LINES = 64

# Every float16 bit pattern as float32: `lut[w.view(uint16)]` is the exact float32 value.
HALF_TO_FLOAT = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def widen(weights: np.ndarray, p: int, lut: np.ndarray) -> np.float32:
  """Posting ``p``'s weight as float32: float32 as it is, uint16 (float16 bits) through ``lut``."""
  if weights.dtype == np.uint16:
    return lut[weights[p]]
  return np.float32(weights[p])


@overload(widen, inline="always")
def _widen_numba(weights, p, lut):
  if weights.dtype == types.uint16:
    return lambda weights, p, lut: lut[weights[p]]
  return lambda weights, p, lut: np.float32(weights[p])


@intrinsic
def prefetch(typingctx, array, i):
  """Hint the CPU to fetch the cache line of ``array[i]`` (LLVM's llvm.prefetch; never faults)."""
  if not isinstance(array, types.Array) or not isinstance(i, types.Integer):
    return None

  def codegen(context, builder, signature, args):
    data = context.make_array(signature.args[0])(context, builder, args[0]).data
    offset = context.cast(builder, args[1], signature.args[1], types.intp)
    address = builder.bitcast(builder.gep(data, [offset]), ir.IntType(8).as_pointer())
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
        "llvm.prefetch.p0")
    # read, keep in all cache levels, data cache
    builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()

  return types.void(array, i), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _worse(s_a, r_a, s_b, r_b) -> bool:
  """Heap order: a ranks below b (lower score, or equal score and higher row)."""
  return s_a < s_b or (s_a == s_b and r_a > r_b)


@numba.njit(cache=True, nogil=True)
def _heap_sift_down(hs, hr, size, i):
  while True:
    worst = i
    left, right = 2 * i + 1, 2 * i + 2
    if left < size and _worse(hs[left], hr[left], hs[worst], hr[worst]):
      worst = left
    if right < size and _worse(hs[right], hr[right], hs[worst], hr[worst]):
      worst = right
    if worst == i:
      return
    hs[i], hs[worst] = hs[worst], hs[i]
    hr[i], hr[worst] = hr[worst], hr[i]
    i = worst


@numba.njit(cache=True, nogil=True)
def _heap_push(hs, hr, size, score, row):
  i = size
  hs[i], hr[i] = score, row
  while i > 0:
    parent = (i - 1) // 2
    if not _worse(hs[i], hr[i], hs[parent], hr[parent]):
      return
    hs[i], hs[parent] = hs[parent], hs[i]
    hr[i], hr[parent] = hr[parent], hr[i]
    i = parent


@numba.njit(cache=True, nogil=True)
def _heap_sort(hs, hr, size):
  """Order a heap's first ``size`` entries best first (score descending, then row ascending): each
  step swaps the root, the worst entry left, to the end of the shrinking heap."""
  for end in range(size - 1, 0, -1):
    hs[0], hs[end] = hs[end], hs[0]
    hr[0], hr[end] = hr[end], hr[0]
    _heap_sift_down(hs, hr, end, 0)


@numba.njit(cache=True, nogil=True)
def _collect(acc, length, row0, hs, hr, size):
  """Offer rows row0 .. row0+length-1 (scores acc[:length]) to the heap; returns its new size."""
  top_k = hs.shape[0]
  threshold = hs[0] if size == top_k else np.float32(0.0)
  for c0 in range(0, length, _CHUNK):
    c1 = min(length, c0 + _CHUNK)
    above = 0
    # Vectorised test: most chunks hold no candidate once the heap is full. The index is unsigned
    # because numba wraps negative indices: with a signed d the address is not affine in d and
    # LLVM vectorises the loop with gathers instead of plain loads, ~5x slower (1M documents: the
    # collection took 31% of a query's cycles, now 8%; benchmarks/results/ann_amd_2026-12-04b/).
    for d in range(c0, c1):
      above += acc[np.uint64(d)] > threshold
    if above == 0:
      continue
    for d in range(c0, c1):
      s = acc[d]
      if s > threshold:
        if size < top_k:
          _heap_push(hs, hr, size, s, row0 + d)
          size += 1
          if size == top_k:
            threshold = hs[0]
        else:
          hs[0], hr[0] = s, row0 + d
          _heap_sift_down(hs, hr, size, 0)
          threshold = hs[0]
  return size


@numba.njit(cache=True, nogil=True)
def _add_dense(acc, cols, slots, vals, count, b0, b1):
  """acc[:b1-b0] += sum_j vals[j] * cols[slots[j], b0:b1], eight then four columns per pass."""
  n = b1 - b0
  j = 0
  while j + 8 <= count:
    c0, c1 = cols[slots[j], b0:b1], cols[slots[j + 1], b0:b1]
    c2, c3 = cols[slots[j + 2], b0:b1], cols[slots[j + 3], b0:b1]
    c4, c5 = cols[slots[j + 4], b0:b1], cols[slots[j + 5], b0:b1]
    c6, c7 = cols[slots[j + 6], b0:b1], cols[slots[j + 7], b0:b1]
    x0, x1, x2, x3 = vals[j], vals[j + 1], vals[j + 2], vals[j + 3]
    x4, x5, x6, x7 = vals[j + 4], vals[j + 5], vals[j + 6], vals[j + 7]
    for d in range(n):
      acc[d] += (((x0 * c0[d] + x1 * c1[d]) + (x2 * c2[d] + x3 * c3[d]))
                 + ((x4 * c4[d] + x5 * c5[d]) + (x6 * c6[d] + x7 * c7[d])))
    j += 8
  while j + 4 <= count:
    c0, c1 = cols[slots[j], b0:b1], cols[slots[j + 1], b0:b1]
    c2, c3 = cols[slots[j + 2], b0:b1], cols[slots[j + 3], b0:b1]
    x0, x1, x2, x3 = vals[j], vals[j + 1], vals[j + 2], vals[j + 3]
    for d in range(n):
      acc[d] += (x0 * c0[d] + x1 * c1[d]) + (x2 * c2[d] + x3 * c3[d])
    j += 4
  while j < count:
    c0 = cols[slots[j], b0:b1]
    x0 = vals[j]
    for d in range(n):
      acc[d] += x0 * c0[d]
    j += 1


@numba.njit(cache=True, nogil=True, inline="always")
def _prefetch_run(docs, weights, start, stop, lines):
  """Prefetch the first ``lines`` cache lines of a run of postings (16 int32 docs a line)."""
  for p in range(start, min(stop, start + 16 * lines), 16):
    prefetch(docs, p)
    prefetch(weights, p)


@numba.njit(cache=True, nogil=True)
def _add_sparse(acc, skips, b, docs, weights, lut, latents, vals, count, b0, starts, stops,
                lines):
  """Scatter each listed latent's postings in row block b (rows b0 ..) into acc.

  Between two visits of a list (one block to the next) every other query of the batch runs, so
  each run of postings starts with a cache miss; the runs' skip pointers are loaded together
  (their misses overlap) and each run's first ``lines`` cache lines are prefetched `_AHEAD` runs
  early.
  """
  for j in range(count):
    starts[j], stops[j] = skips[latents[j], b], skips[latents[j], b + 1]
  for j in range(min(count, _AHEAD)):
    _prefetch_run(docs, weights, starts[j], stops[j], lines)
  for j in range(count):
    if j + _AHEAD < count:
      _prefetch_run(docs, weights, starts[j + _AHEAD], stops[j + _AHEAD], lines)
    x = vals[j]
    for p in range(starts[j], stops[j]):  # unsigned indices: no wraparound test (_collect)
      u = np.uint64(p)
      acc[np.uint32(docs[u] - b0)] += x * widen(weights, u, lut)


@numba.njit(cache=True, nogil=True)
def search_kernel(skips, docs, weights, lut, dense_slot, dense_cols, num_docs, block,
                  q_indices, q_values, top_k, batch, block_lo, block_hi):
  """Exact top-``top_k`` rows per query among the rows of blocks ``block_lo`` .. ``block_hi``-1;
  see the module docstring for the method and tie rule.

  Args:
    skips: int64 [S, B+1], `block_skips`: latent t's postings in row block b are
      docs/weights[skips[t, b]:skips[t, b+1]].
    docs: int32 [nnz], rows ascending within each latent's list.
    weights: float32 [nnz], or uint16 [nnz] holding float16 bits (then read through ``lut``).
    lut: float32 [65536], `HALF_TO_FLOAT`.
    dense_slot: int64 [S], the row of ``dense_cols`` holding latent t, or -1 for a posting list.
    dense_cols: float32 [H, num_docs], dense copies of the head latents' posting lists.
    num_docs: N.
    block: rows per block, the one ``skips`` was made with.
    q_indices: int32 [Q, kq], latents of each query (validated: 0 <= index < S).
    q_values: float32 [Q, kq].
    top_k: results per query, >= 1.
    batch: queries sharing a pass over a block.
    block_lo, block_hi: the row blocks searched (0 and B: every document); threads searching
      disjoint block ranges each return their range's top rows (`merge_ranked` joins them).

  Returns:
    (scores float32 [Q, top_k], rows int32 [Q, top_k]), each row ranked best first (score
    descending, then lower row); unfilled slots at the end hold (-inf, -1).
  """
  num_q, kq = q_indices.shape
  out_s = np.full((num_q, top_k), -np.inf, dtype=np.float32)
  out_r = np.full((num_q, top_k), -1, dtype=np.int32)
  sizes = np.zeros(num_q, dtype=np.int64)
  acc = np.zeros(block, dtype=np.float32)
  d_slot = np.empty((batch, kq), dtype=np.int64)
  d_val = np.empty((batch, kq), dtype=np.float32)
  s_lat = np.empty((batch, kq), dtype=np.int64)
  s_val = np.empty((batch, kq), dtype=np.float32)
  n_dense = np.zeros(batch, dtype=np.int64)
  n_sparse = np.zeros(batch, dtype=np.int64)
  starts = np.empty(kq, dtype=np.int64)
  stops = np.empty(kq, dtype=np.int64)
  for q0 in range(0, num_q, batch):
    m = min(batch, num_q - q0)
    lines = _RUN_LINES if m > 1 else _COLD_RUN_LINES
    for a in range(m):  # split each query's terms into dense columns and posting lists
      n_dense[a] = 0
      n_sparse[a] = 0
      for j in range(kq):
        t, x = q_indices[q0 + a, j], q_values[q0 + a, j]
        if x == 0:
          continue
        if dense_slot[t] >= 0:
          d_slot[a, n_dense[a]], d_val[a, n_dense[a]] = dense_slot[t], x
          n_dense[a] += 1
        elif skips[t, -1] > skips[t, 0]:
          s_lat[a, n_sparse[a]], s_val[a, n_sparse[a]] = t, x
          n_sparse[a] += 1
    for b in range(block_lo, block_hi):
      b0 = b * block
      b1 = min(num_docs, b0 + block)
      for a in range(m):
        acc[:b1 - b0] = 0.0
        _add_dense(acc, dense_cols, d_slot[a], d_val[a], n_dense[a], b0, b1)
        _add_sparse(acc, skips, b, docs, weights, lut, s_lat[a], s_val[a], n_sparse[a], b0,
                    starts, stops, lines)
        sizes[q0 + a] = _collect(acc, b1 - b0, b0, out_s[q0 + a], out_r[q0 + a], sizes[q0 + a])
    for a in range(m):
      _heap_sort(out_s[q0 + a], out_r[q0 + a], sizes[q0 + a])
  return out_s, out_r


@numba.njit(cache=True, nogil=True)
def merge_ranked(scores, rows):
  """Join P ranked results over disjoint rows into one: (float32 [Q, top_k], int32 [Q, top_k]).

  scores, rows: [P, Q, top_k], each part's rows ranked as `search_kernel` returns them (padding
  (-inf, -1) at the end). A P-way merge under the same order (score descending, then lower row),
  so the result is the one a single search over every part's rows returns.
  """
  parts, num_q, top_k = scores.shape
  out_s = np.full((num_q, top_k), -np.inf, dtype=np.float32)
  out_r = np.full((num_q, top_k), -1, dtype=np.int32)
  at = np.zeros(parts, dtype=np.int64)
  for i in range(num_q):
    at[:] = 0
    for j in range(top_k):
      best = -1
      for p in range(parts):
        if at[p] < top_k and rows[p, i, at[p]] >= 0 and (
            best < 0 or _worse(scores[best, i, at[best]], rows[best, i, at[best]],
                               scores[p, i, at[p]], rows[p, i, at[p]])):
          best = p
      if best < 0:
        break
      out_s[i, j], out_r[i, j] = scores[best, i, at[best]], rows[best, i, at[best]]
      at[best] += 1
  return out_s, out_r


# One thread's cost of `search_kernel` for a query alone, in ns: per document row (zeroing, the
# collection), per posting of a sparse query term, per row of a dense column a query term reads.
# Least squares over 2,400 lone queries (one call each, 3 rounds) on bench_index.py's synthetic
# codes, latent popularity ~ rank^-a for a = 0, 0.7, 1.0, 1.2 at N = 100k, 300k, 1M (k = 64,
# S = 16,384, 2-vCPU AMD EPYC VM): two runs gave 0.20 / 0.75 / 0.11 and 0.22 / 0.58 / 0.115,
# median error 10-11%; on the frozen arm's real codes the median query's estimate is within 8% of
# its time at 100k-1M documents (benchmarks/RESULTS.md, session 33).
COST_ROW_NS = 0.20
COST_POSTING_NS = 0.7
COST_DENSE_NS = 0.11


@numba.njit(cache=True, nogil=True)
def search_cost_ns(offsets, dense_slot, q_indices, q_values, num_docs):
  """Estimated single-thread ns for `search_kernel` to search all ``num_docs`` rows for each query
  as if alone (COST_*_NS): what `SparseIndex.search` weighs against a thread hand-off. Terms with
  value 0 cost nothing, as in the kernel."""
  total = 0.0
  for i in range(q_indices.shape[0]):
    total += COST_ROW_NS * num_docs
    for j in range(q_indices.shape[1]):
      t = q_indices[i, j]
      if q_values[i, j] == 0:
        continue
      if dense_slot[t] >= 0:
        total += COST_DENSE_NS * num_docs
      else:
        total += COST_POSTING_NS * (offsets[t + 1] - offsets[t])
  return total


@numba.njit(cache=True, nogil=True)
def weigh_codes(values, indices, latent_weights):
  """float32 [Q, R]: each code's values times their latents' weights, the row rescaled to the norm
  it had. The norms are those of the code with a repeated latent's values summed (a steered query
  repeats latents), so the result does not depend on how a code splits a latent's value.

  Two passes per row over an [S] scratch of sums: add each value to its latent's sum, then take
  each latent's sum once (zeroing it, which leaves the scratch clean for the next row); norms in
  float64. As array operations this was ~10 NumPy calls (and a scipy sum of duplicates for rows
  repeating a latent), ~13 us for one query: a quarter of a lone query's search on a small index.

  Args:
    values: float32 [Q, R].
    indices: integer [Q, R], each in [0, len(latent_weights)) (the caller checks).
    latent_weights: float32 [S].
  """
  num_q, r = values.shape
  out = np.empty((num_q, r), dtype=np.float32)
  sums = np.zeros(latent_weights.shape[0], dtype=np.float64)
  for i in range(num_q):
    for j in range(r):
      sums[indices[i, j]] += values[i, j]
    before = 0.0
    after = 0.0
    for j in range(r):
      t = indices[i, j]
      total = sums[t]
      sums[t] = 0.0
      before += total * total
      after += (total * latent_weights[t]) ** 2
    scale = np.sqrt(before / after) if after > 0 else 0.0
    for j in range(r):
      out[i, j] = values[i, j] * latent_weights[indices[i, j]] * scale
  return out


@numba.njit(cache=True, nogil=True)
def block_skips(offsets, docs, num_docs, block):
  """int64 [S, B+1], B = ceil(num_docs / block): where each latent's list enters each row block.

  skips[t, b] is the position of latent t's first posting with row >= b * block (skip pointers
  over row-sorted lists, Moffat & Zobel 1996), so skips[:, 0] = offsets[:-1] and
  skips[:, B] = offsets[1:]. A latent's pointers are adjacent: one cache line per list and block.
  """
  num_latents = offsets.shape[0] - 1
  num_blocks = (num_docs + block - 1) // block
  skips = np.empty((num_latents, num_blocks + 1), dtype=np.int64)
  for t in range(num_latents):
    p = offsets[t]
    for b in range(num_blocks):
      skips[t, b] = p
      limit = (b + 1) * block
      while p < offsets[t + 1] and docs[p] < limit:
        p += 1
    skips[t, num_blocks] = offsets[t + 1]
  return skips


@numba.njit(cache=True, nogil=True)
def fill_dense_columns(offsets, docs, weights, lut, latents, num_docs):
  """float32 [len(latents), num_docs]: latent latents[i]'s posting list as a dense column i."""
  cols = np.zeros((latents.shape[0], num_docs), dtype=np.float32)
  for i in range(latents.shape[0]):
    t = latents[i]
    for p in range(offsets[t], offsets[t + 1]):
      cols[i, docs[p]] = widen(weights, p, lut)
  return cols
