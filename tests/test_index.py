"""saejax.retrieval.index: exact search against dense brute force, files, the JAX path, Seismic.

Weights in most tests are small multiples of 1/8, so every score is an exact float32 sum whatever
the summation order: results must then match the brute force exactly, ties included (lower doc id
first). One test uses arbitrary floats and allows ulp-level score differences.
"""

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.retrieval import index as index_module, index_kernels
from saejax.retrieval.index import (IndexArraysError, SeismicAdapter, SparseIndex, recall,
                                    sparse_matrix, weigh_codes)
from idf_reference import idf_weighted  # tests/ is on sys.path (pytest rootdir-relative import)


def _zipf_codes(rng: np.random.Generator, n: int, k: int, s: int, a: float = 1.0,
                dyadic: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """[n, k] codes: k distinct latents per row, latent r drawn with probability ~ r^-a."""
  p = np.arange(1, s + 1, dtype=np.float64) ** -a
  indices = np.stack([rng.choice(s, k, replace=False, p=p / p.sum()) for _ in range(n)])
  if dyadic:
    values = rng.integers(1, 17, (n, k)) / 8
  else:
    values = np.abs(rng.standard_normal((n, k)))
  return values.astype(np.float32), indices.astype(np.int32)


def _brute_force(values, indices, doc_ids, q_values, q_indices, s: int, top_k: int):
  """The index's result rule, by dense numpy: scores > 0, desc, ties by lower doc id."""
  docs = np.zeros((values.shape[0], s), np.float32)
  np.add.at(docs, (np.arange(values.shape[0])[:, None], indices), values)
  queries = np.zeros((q_values.shape[0], s), np.float32)
  np.add.at(queries, (np.arange(q_values.shape[0])[:, None], q_indices), q_values)
  scores = queries @ docs.T
  order = np.lexsort((np.broadcast_to(doc_ids, scores.shape), -scores), axis=1)[:, :top_k]
  top = np.take_along_axis(scores, order, 1)
  ids = np.where(top > 0, np.asarray(doc_ids)[order], -1)
  top = np.where(top > 0, top, -np.inf).astype(np.float32)
  pad = top_k - top.shape[1]  # top_k > N
  return (np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf),
          np.pad(ids, ((0, 0), (0, pad)), constant_values=-1))


@pytest.fixture(scope="module")
def corpus():
  rng = np.random.default_rng(0)
  values, indices = _zipf_codes(rng, 600, 12, 300)
  q_values, q_indices = _zipf_codes(rng, 40, 5, 300)  # queries use a different k
  q_values[::3, 0] *= -1  # negative query weights (steering) lower scores
  doc_ids = rng.permutation(10_000)[:600] * 7 + 3  # arbitrary distinct ids, not in row order
  return values, indices, doc_ids, q_values, q_indices


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dense_fraction", [0.05, 0.3, 2.0])  # many, few, no dense columns
def test_search_equals_brute_force(corpus, dtype, dense_fraction):
  values, indices, doc_ids, q_values, q_indices = corpus
  index = SparseIndex.build(values, indices, 300, doc_ids, dtype=dtype,
                            dense_fraction=dense_fraction)
  assert (index.num_dense > 0) == (dense_fraction < 1)
  scores, ids = index.search(q_values, q_indices, top_k=25)
  want_scores, want_ids = _brute_force(values, indices, doc_ids, q_values, q_indices, 300, 25)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)
  assert scores.dtype == np.float32 and ids.dtype == np.int64


def test_search_spans_blocks_and_query_batches():
  # More rows than two kernel blocks and more queries than one kernel batch: skip pointers,
  # heaps carried across blocks and per-batch term splits all take part; queries searched one
  # at a time take the kernel's lone-query path (deeper prefetching).
  rng = np.random.default_rng(3)
  n = 2 * index_kernels.BLOCK + 123
  values, indices = _zipf_codes(rng, n, 3, 64)
  q_values, q_indices = _zipf_codes(rng, index_kernels.QUERY_BATCH + 9, 2, 64)
  for dense_fraction in (0.02, 2.0):
    index = SparseIndex.build(values, indices, 64, dense_fraction=dense_fraction)
    scores, ids = index.search(q_values, q_indices, top_k=7)
    want_scores, want_ids = _brute_force(values, indices, np.arange(n), q_values, q_indices, 64, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)
    for q in range(5):
      alone = index.search(q_values[q:q + 1], q_indices[q:q + 1], top_k=7)
      np.testing.assert_array_equal(alone[1], want_ids[q:q + 1])
      np.testing.assert_array_equal(alone[0], want_scores[q:q + 1])


def test_search_float_weights_within_ulps():
  rng = np.random.default_rng(1)
  values, indices = _zipf_codes(rng, 2000, 32, 1000, dyadic=False)
  q_values, q_indices = _zipf_codes(rng, 30, 20, 1000, dyadic=False)
  index = SparseIndex.build(values, indices, 1000, dense_fraction=0.1)
  scores, ids = index.search(q_values, q_indices, top_k=10)
  want_scores, want_ids = _brute_force(values, indices, np.arange(2000), q_values, q_indices,
                                       1000, 10)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
  gaps = np.diff(want_scores, axis=1)  # rows may swap only where two scores are ulps apart
  close = np.zeros_like(ids, dtype=bool)
  close[:, 1:] |= gaps > -1e-4
  close[:, :-1] |= gaps > -1e-4
  assert (ids == want_ids)[~close].all()


def test_ties_go_to_lower_doc_id():
  # Four documents with the same code: every query ties them; ids are given out of order.
  values = np.ones((4, 2), np.float32)
  indices = np.tile(np.array([[3, 5]], np.int32), (4, 1))
  index = SparseIndex.build(values, indices, 8, doc_ids=[40, 10, 30, 20])
  scores, ids = index.search(np.ones((1, 1), np.float32), np.array([[5]]), top_k=3)
  assert ids.tolist() == [[10, 20, 30]]
  assert scores.tolist() == [[1.0, 1.0, 1.0]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.integers(1, 8), st.integers(1, 6), st.integers(1, 70),
       st.sampled_from([0.2, 2.0]), st.integers(0, 2**31 - 1))
def test_search_property(n, k, kq, top_k, dense_fraction, seed):
  rng = np.random.default_rng(seed)
  s = 20
  values = (rng.integers(0, 9, (n, k)) / 4).astype(np.float32)  # zeros: ReLU'd entries
  indices = rng.integers(0, s, (n, k))  # repeats within a row are summed
  q_values = (rng.integers(-4, 9, (3, kq)) / 4).astype(np.float32)
  q_indices = rng.integers(0, s, (3, kq))
  index = SparseIndex.build(values, indices, s, dense_fraction=dense_fraction)
  scores, ids = index.search(q_values, q_indices, top_k)
  want_scores, want_ids = _brute_force(values, indices, np.arange(n), q_values, q_indices, s,
                                       top_k)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(scores, want_scores)


def test_empty_lists_and_padding():
  values = np.array([[1.0, 2.0], [0.5, 0.0]], np.float32)
  indices = np.array([[0, 1], [1, 2]], np.int32)
  index = SparseIndex.build(values, indices, 1000)
  assert index.nnz == 3  # the zero value is not stored
  assert index.offsets[-1] == 3 and np.diff(index.offsets)[3:].sum() == 0
  # Query 0 only hits latents no document holds; query 1 holds no term at all (kq = 2, zeros).
  scores, ids = index.search(np.array([[1.0, 1.0], [0.0, 0.0]], np.float32),
                             np.array([[500, 999], [0, 1]]), top_k=5)
  assert (ids == -1).all() and np.isneginf(scores).all()
  scores, ids = index.search(np.array([[1.0]], np.float32), np.array([[1]]), top_k=5)
  assert ids.tolist() == [[0, 1, -1, -1, -1]]  # top_k > N: padded
  assert scores[0, :2].tolist() == [2.0, 0.5] and np.isneginf(scores[0, 2:]).all()


def test_empty_index_and_no_queries():
  index = SparseIndex.build(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.int32), 10)
  scores, ids = index.search(np.ones((2, 1), np.float32), np.array([[1], [2]]), top_k=3)
  assert ids.shape == (2, 3) and (ids == -1).all()
  scores, ids = index.search(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32))
  assert scores.shape == (0, 10) and ids.shape == (0, 10)
  # Codes of width 0 (every document empty, e.g. read from a file of empty vectors): no postings.
  for n in (0, 5):
    empty = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int32)
    index = SparseIndex.build(*empty, 10)
    assert (index.num_docs, index.nnz) == (n, 0)
    assert (index.search(np.ones((1, 1), np.float32), np.array([[1]]), top_k=3)[1] == -1).all()
    assert sparse_matrix(*empty, 10).shape == (n, 10)


@pytest.mark.parametrize("make, match", [
    (lambda v, i: (v, i[:, :3]), r"values \(5, 4\) and indices \(5, 3\)"),
    (lambda v, i: (v[0], i[0]), r"\[rows, k\]"),
    (lambda v, i: (v, np.where(i == i[2, 1], 77, i)), r"indices\[\d+, \d+\] = 77 is outside"),
    (lambda v, i: (np.where(np.arange(4) == 2, np.nan, v), i), r"values\[0, 2\] = nan"),
    (lambda v, i: (v, i.astype(np.float32)), "must be integers"),
])
def test_build_rejects_bad_codes(make, match):
  rng = np.random.default_rng(0)
  values, indices = _zipf_codes(rng, 5, 4, 20)
  with pytest.raises(DataError, match=match):
    SparseIndex.build(*make(values, indices), 20)


def test_build_rejects_bad_settings():
  values, indices = np.ones((3, 2), np.float32), np.array([[0, 1], [1, 2], [2, 3]])
  with pytest.raises(DataError, match=r"duplicated ids, e.g. \[7\]"):
    SparseIndex.build(values, indices, 4, doc_ids=[7, 8, 7])
  with pytest.raises(DataError, match=r"shape \(2,\); expected \(3,\)"):
    SparseIndex.build(values, indices, 4, doc_ids=[7, 8])
  with pytest.raises(DataError, match="float16's range"):
    SparseIndex.build(values * 1e5, indices, 4, dtype="float16")
  with pytest.raises(ConfigError, match="dtype='bfloat16'"):
    SparseIndex.build(values, indices, 4, dtype="bfloat16")
  with pytest.raises(ConfigError, match="num_latents=0"):
    SparseIndex.build(values, indices, 0)
  with pytest.raises(ConfigError, match="dense_fraction=0"):
    SparseIndex.build(values, indices, 4, dense_fraction=0)
  index = SparseIndex.build(values, indices, 4)
  with pytest.raises(ConfigError, match="top_k=0"):
    index.search(values, indices, top_k=0)
  with pytest.raises(DataError, match=r"query indices\[2, 1\] = 4 is outside \[0, 4\)"):
    index.search(values, indices + 1)
  with pytest.raises(DataError, match=r"query codes must be rectangular \[rows, k\] arrays"):
    index.search([[1.0, 2.0], [1.0]], [[0, 1], [0]])
  with pytest.raises(DataError, match=r"doc_ids must fit int64 .* got 9223372036854775813"):
    SparseIndex.build(values, indices, 4, doc_ids=np.array([1, 2, 2**63 + 5], np.uint64))


def test_idf_weighting_by_hand():
  # Latent 0 is in all 4 documents, latent 1 in one. q = {0: 1, 1: .25}: by the plain dot product
  # d0 = {0: 1} (score 1; d2 and d3 tie with it) beats d1 = {0: .8, 1: .6} (.95). With idf_power 1, idf = ln(5 / 4.5)
  # = .105 for latent 0 and ln(5 / 1.5) = 1.204 for latent 1; each code is weighted and rescaled
  # to its own norm: d1 -> (.116, .993), q -> (.341, .973) (norm 1.031); the rare latent now
  # decides: d1 1.006, d0 .341. (Latent 2 holds only zeros, which are not postings: df 0.)
  values = np.array([[1, 0], [.8, .6], [1, 0], [1, 0]], np.float32)
  indices = np.array([[0, 1], [0, 1], [0, 2], [0, 2]], np.int32)
  q_values, q_indices = np.array([[1, .25]], np.float32), np.array([[0, 1]], np.int32)
  plain = SparseIndex.build(values, indices, 3)
  assert plain.search(q_values, q_indices, 4)[1].tolist() == [[0, 2, 3, 1]]
  index = SparseIndex.build(values, indices, 3, idf_power=1)
  scores, ids = index.search(q_values, q_indices, 2)
  assert ids.tolist() == [[1, 0]]
  np.testing.assert_allclose(scores, [[1.005807, 0.340555]], rtol=1e-5)
  np.testing.assert_allclose(index.latent_weights, np.log(5 / np.array([4.5, 1.5, 0.5])),
                             rtol=1e-6)


@pytest.mark.parametrize("power", [0.5, 2.0])
def test_idf_search_equals_numpy_reference(corpus, tmp_path, power):
  values, indices, doc_ids, q_values, q_indices = corpus
  values, q_values = np.abs(values), np.abs(q_values)
  docs = np.zeros((len(values), 300))
  np.add.at(docs, (np.arange(len(values))[:, None], indices), values)
  queries = np.zeros((len(q_values), 300))
  np.add.at(queries, (np.arange(len(q_values))[:, None], q_indices), q_values)
  idf = np.log((len(docs) + 1) / ((docs != 0).sum(0) + 0.5)) ** power

  def weigh(x):  # weighted, back to each row's own norm
    y = x * idf
    return y * (np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))[:, None]

  scores = weigh(queries) @ weigh(docs).T
  order = np.lexsort((np.broadcast_to(doc_ids, scores.shape), -scores), axis=1)[:, :20]
  index = SparseIndex.build(values, indices, 300, doc_ids, idf_power=power)
  got_scores, got_ids = index.search(q_values, q_indices, 20)
  np.testing.assert_array_equal(got_ids, doc_ids[order])
  np.testing.assert_allclose(got_scores, np.take_along_axis(scores, order, 1), rtol=1e-5)
  jax_scores, jax_ids = index.search_jax(q_values, q_indices, 20)
  np.testing.assert_array_equal(jax_ids, got_ids)
  np.testing.assert_allclose(jax_scores, got_scores, rtol=1e-5)
  assert not np.array_equal(SparseIndex.build(values, indices, 300, doc_ids).search(
      q_values, q_indices, 20)[1], got_ids)  # the weighting changes rankings here
  loaded = SparseIndex.load(index.save(tmp_path / "idf"))  # the header keeps the power
  assert loaded.idf_power == power and "idf_power" in repr(loaded)
  for got, want in zip(loaded.search(q_values, q_indices, 20), (got_scores, got_ids)):
    np.testing.assert_array_equal(got, want)
  for bad in (-0.5, float("nan"), True, "0.5"):
    with pytest.raises(ConfigError, match="idf_power"):
      SparseIndex.build(values, indices, 300, idf_power=bad)


def test_idf_steered_query_repeating_a_latent(corpus):
  """A steered query holds a latent twice (the query's own value, then a boost or a suppression):
  it is weighted as the code with the repeats summed, norm included (NumPy reference)."""
  values, indices, doc_ids, q_values, q_indices = corpus
  values = np.abs(values)
  steer_v = np.stack([np.full(len(q_values), 1.5), -0.5 * np.abs(q_values[:, 1])], 1)
  q_values = np.concatenate([np.abs(q_values), steer_v], 1).astype(np.float32)
  q_indices = np.concatenate([q_indices, q_indices[:, :2]], 1)  # both already in the query
  docs, queries = np.zeros((len(values), 300)), np.zeros((len(q_values), 300))
  np.add.at(docs, (np.arange(len(values))[:, None], indices), values)
  np.add.at(queries, (np.arange(len(q_values))[:, None], q_indices), q_values)
  q_ref, d_ref = idf_weighted(queries, docs, 0.5)
  scores = q_ref @ d_ref.T
  order = np.lexsort((np.broadcast_to(doc_ids, scores.shape), -scores), axis=1)[:, :10]
  want = np.take_along_axis(scores, order, 1)
  assert (want > 0).all()  # every rank a hit: the comparison covers scores, not padding
  got_scores, got_ids = SparseIndex.build(values, indices, 300, doc_ids, idf_power=0.5).search(
      q_values, q_indices, 10)
  np.testing.assert_array_equal(got_ids, doc_ids[order])
  np.testing.assert_allclose(got_scores, want, rtol=1e-5)


def test_weigh_codes_mixed_rows_equal_dense_reference():
  """Rows holding each latent once (the fast path), rows repeating one (summed for the norm) and a
  row repeating one with a zero value (no repeat for the norm) in one call: each row equals the
  dense reference's, taken back from [rows, S] to the row's own slots by value share."""
  rng = np.random.default_rng(3)
  s = 40
  indices = np.stack([rng.choice(s, 6, replace=False) for _ in range(30)])
  values = rng.normal(size=indices.shape).astype(np.float32)
  indices[::4, 5] = indices[::4, 0]  # rows 0, 4, 8, ...: latent in slot 0 again in slot 5
  indices[1, 5], values[1, 5] = indices[1, 0], 0.0  # a zero-valued repeat
  weights = (rng.random(s) + 0.1).astype(np.float32)
  dense = np.zeros((len(values), s))
  np.add.at(dense, (np.arange(len(values))[:, None], indices), values)
  before = np.linalg.norm(dense, axis=1)
  after = np.linalg.norm(dense * weights, axis=1)
  want = values * weights[indices] * (before / after)[:, None]  # per slot: its own share
  np.testing.assert_allclose(weigh_codes(values, indices, weights), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(weigh_codes(values[:1], indices[:1], weights), want[:1], rtol=1e-5)
  with pytest.raises(DataError, match=r"indices must lie in \[0, 40\)"):
    weigh_codes(values, indices + 1, weights)  # the compiled loop does not check bounds itself
  with pytest.raises(DataError, match=r"values \(30, 6\) and indices \(30, 5\)"):
    weigh_codes(values, indices[:, :5], weights)


def test_threaded_search_splits_large_batches_and_equals_brute_force(corpus, monkeypatch):
  """num_threads > 1 splits the queries into contiguous shares of >= QUERY_BATCH, one kernel call
  each, in threads; the results equal the brute-force reference (hence one thread's)."""
  values, indices, doc_ids, _, _ = corpus
  rng = np.random.default_rng(5)
  q_values, q_indices = _zipf_codes(rng, 700, 5, 300)
  index = SparseIndex.build(values, indices, 300, doc_ids)
  calls = []
  kernel = index_kernels.search_kernel

  def counting(*args):
    calls.append((len(args[8]), threading.get_ident()))
    return kernel(*args)

  monkeypatch.setattr(index_kernels, "search_kernel", counting)
  want = index.search(q_values, q_indices, 10)
  assert [n for n, _ in calls] == [700]
  reference = _brute_force(values, indices, doc_ids, q_values, q_indices, 300, 10)
  np.testing.assert_array_equal(want[1], reference[1])
  calls.clear()
  got = index.search(q_values, q_indices, 10, num_threads=3)  # 700 // 256 = 2 shares
  assert sorted(n for n, _ in calls) == [350, 350]
  assert len({t for _, t in calls}) == 2 and threading.get_ident() in {t for _, t in calls}
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  calls.clear()
  index.search(q_values[:300], q_indices[:300], 10, num_threads=4)  # one share: caller's thread
  assert calls == [(300, threading.get_ident())]
  for bad in (0, -1, 1.5, True, "2"):
    with pytest.raises(ConfigError, match="num_threads"):
      index.search(q_values, q_indices, 10, num_threads=bad)


def test_threaded_search_splits_few_queries_over_document_ranges(monkeypatch):
  """Fewer queries than a kernel batch per thread: num_threads > 1 splits the documents into
  contiguous block ranges, one kernel call each at once (the first on
  the caller's thread), and merges their rankings: equal to brute force, ties across ranges (lower
  doc id first) and a query with fewer hits than top_k (padding) included."""
  rng = np.random.default_rng(4)
  n = 3 * index_kernels.BLOCK + 123  # 4 blocks
  values, indices = _zipf_codes(rng, n, 3, 64)  # dyadic weights over 64 latents: many exact ties
  rare = [5, index_kernels.BLOCK + 7, 3 * index_kernels.BLOCK + 100]  # latent 64: 3 documents
  indices[rare, 0] = 64
  doc_ids = rng.permutation(n) * 2 + 1  # rows are stored in doc id order: not this order
  q_values, q_indices = _zipf_codes(rng, 20, 2, 64)
  q_indices[0, 0], q_values[0, 1] = 64, 0.0  # query 0: latent 64 alone
  index = SparseIndex.build(values, indices, 65, doc_ids, dense_fraction=0.2)
  assert index.num_dense > 0
  want = _brute_force(values, indices, doc_ids, q_values, q_indices, 65, 12)
  calls = []
  kernel = index_kernels.search_kernel

  def recording(*args):
    calls.append((len(args[8]), args[-2], args[-1], threading.get_ident()))
    return kernel(*args)

  monkeypatch.setattr(index_kernels, "search_kernel", recording)
  np.testing.assert_array_equal(index.search(q_values, q_indices, 12, num_threads=3)[1], want[1])
  assert [(q, lo, hi) for q, lo, hi, _ in calls] == [(20, 0, 4)]  # too little work to split
  monkeypatch.setattr(index_module, "MIN_SHARE_NS", 1.0)  # any work splits
  for threads, ranges in ((3, [(0, 1), (1, 2), (2, 4)]), (2, [(0, 2), (2, 4)])):
    calls.clear()
    got = index.search(q_values, q_indices, 12, num_threads=threads)
    assert sorted((lo, hi) for _, lo, hi, _ in calls) == ranges and {q for q, *_ in calls} == {20}
    threads_used = {t for *_, t in calls}  # one share on the caller's thread, the rest on workers
    assert len(threads_used) >= 2 and threading.get_ident() in threads_used
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    assert (got[1][0] == -1).sum() == 12 - 3  # the rare query: 3 hits, 9 padding
    for q in range(3):  # one query alone: the same rows
      alone = index.search(q_values[q:q + 1], q_indices[q:q + 1], 12, num_threads=threads)
      np.testing.assert_array_equal(alone[1], want[1][q:q + 1])
      np.testing.assert_array_equal(alone[0], want[0][q:q + 1])


def test_lone_query_split_follows_its_estimated_work(monkeypatch):
  """`search_cost_ns` is the per-row, per-posting and per-dense-entry cost summed over the queries'
  nonzero terms (recomputed here from the codes), and `search` splits a lone query over document
  ranges only when that work reaches MIN_SHARE_NS a thread: a query over rare latents stays on one
  thread where a query over head latents of the same index is split."""
  rng = np.random.default_rng(5)
  n = 4 * index_kernels.BLOCK
  values, indices = _zipf_codes(rng, n, 4, 200)
  index = SparseIndex.build(values, indices, 200, dense_fraction=0.3)
  dense = set(np.flatnonzero(index._dense_slot >= 0).tolist())
  assert dense and len(dense) < 200
  held = np.bincount(indices.reshape(-1), minlength=200)  # documents holding each latent
  q_indices = np.array([[0, 1, 2, 3], [199, 198, 197, 0]], dtype=np.int32)  # head / tail latents
  q_values = np.array([[1.0, 0.5, 0.25, 0.5], [1.0, 0.5, 0.25, 0.0]], dtype=np.float32)

  def reference(q):
    terms = [(t, x) for t, x in zip(q_indices[q], q_values[q]) if x != 0]
    return (index_kernels.COST_ROW_NS * n + sum(
        index_kernels.COST_DENSE_NS * n if t in dense else index_kernels.COST_POSTING_NS * held[t]
        for t, _ in terms))

  costs = [index_kernels.search_cost_ns(index.offsets, index._dense_slot, q_indices[q:q + 1],
                                        q_values[q:q + 1], n) for q in range(2)]
  np.testing.assert_allclose(costs, [reference(0), reference(1)], rtol=1e-9)
  np.testing.assert_allclose(
      index_kernels.search_cost_ns(index.offsets, index._dense_slot, q_indices, q_values, n),
      sum(costs), rtol=1e-9)
  assert costs[1] < costs[0] / 2  # the tail query (its latent 0 has value 0) is much lighter
  calls = []
  kernel = index_kernels.search_kernel

  def recording(*args):
    calls.append((args[-2], args[-1]))
    return kernel(*args)

  monkeypatch.setattr(index_kernels, "search_kernel", recording)
  monkeypatch.setattr(index_module, "MIN_SHARE_NS", (costs[0] / 2 + costs[1]) / 2)
  want = _brute_force(values, indices, np.arange(n), q_values, q_indices, 200, 10)
  for q, ranges in ((0, [(0, 2), (2, 4)]), (1, [(0, 4)])):
    calls.clear()
    got = index.search(q_values[q:q + 1], q_indices[q:q + 1], 10, num_threads=2)
    assert sorted(calls) == ranges, q
    np.testing.assert_array_equal(got[1], want[1][q:q + 1])
    calls.clear()
    index.search(q_values[q:q + 1], q_indices[q:q + 1], 10)  # one thread: never split
    assert calls == [(0, 4)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_load_round_trip(corpus, tmp_path, dtype):
  values, indices, doc_ids, q_values, q_indices = corpus
  index = SparseIndex.build(values, indices, 300, doc_ids, dtype=dtype, dense_fraction=0.2)
  path = index.save(tmp_path / "index")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary left behind
  loaded = SparseIndex.load(path)
  for name in ("offsets", "docs", "weights", "doc_ids"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
    assert getattr(loaded, name).dtype == getattr(index, name).dtype
  assert loaded.dense_fraction == 0.2 and loaded.num_dense == index.num_dense
  for got, want in zip(loaded.search(q_values, q_indices, 15),
                       index.search(q_values, q_indices, 15)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(CheckpointError, match="already exists"):
    index.save(path)
  SparseIndex.build(values[:10], indices[:10], 300).save(path, overwrite=True)
  assert SparseIndex.load(path).num_docs == 10
  assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_overwrite_replaces_only_an_index(tmp_path):
  """overwrite=True never deletes a directory that is not an index, nor a file; an empty
  directory is fine; nothing is left behind either way."""
  index = SparseIndex.build(np.ones((3, 2), np.float32), np.array([[0, 1], [1, 2], [2, 3]]), 4)
  work = tmp_path / "work"
  (work / "checkpoints").mkdir(parents=True)
  (work / "precious.txt").write_text("keep me")
  afile = tmp_path / "notes.txt"
  afile.write_text("keep me too")
  for target, what in ((work, "holds no saejax index"), (afile, "not a directory")):
    with pytest.raises(CheckpointError, match=what):
      index.save(target, overwrite=True)
  assert (work / "precious.txt").read_text() == "keep me" and (work / "checkpoints").is_dir()
  assert afile.read_text() == "keep me too"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "work"]
  (tmp_path / "empty").mkdir()
  assert SparseIndex.load(index.save(tmp_path / "empty", overwrite=True)).num_docs == 3


def test_constructor_checks_the_arrays():
  index = SparseIndex.build(np.ones((3, 2), np.float32), np.array([[0, 1], [1, 2], [2, 3]]), 4)
  arrays = dict(offsets=index.offsets, docs=index.docs, weights=index.weights,
                doc_ids=index.doc_ids)
  _, ids = SparseIndex(**arrays).search(np.ones((1, 1), np.float32), [[1]])
  assert ids[0, :2].tolist() == [0, 1]
  with pytest.raises(IndexArraysError, match=r"docs: rows outside \[0, 3\)"):
    SparseIndex(**{**arrays, "docs": index.docs + 1})
  with pytest.raises(IndexArraysError, match="docs: rows are not strictly ascending"):
    SparseIndex(**{**arrays, "docs": index.docs[::-1].copy()})
  with pytest.raises(IndexArraysError, match=r"weights: expected a 1-d array of \['float32'"):
    SparseIndex(**{**arrays, "weights": index.weights.astype(np.float64)})
  with pytest.raises(IndexArraysError, match="doc_ids: not strictly ascending"):
    SparseIndex(**{**arrays, "doc_ids": index.doc_ids[::-1].copy()})
  with pytest.raises(ValueError, match="read-only"):
    index.weights[0] = 5.0


def _saved(tmp_path):
  rng = np.random.default_rng(2)
  values, indices = _zipf_codes(rng, 50, 6, 40)
  return SparseIndex.build(values, indices, 40).save(tmp_path / "index")


def test_load_truncated_array_names_the_file(tmp_path):
  path = _saved(tmp_path)
  data = (path / "docs.npy").read_bytes()
  (path / "docs.npy").write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match=r"docs\.npy is truncated"):
    SparseIndex.load(path)


@pytest.mark.parametrize("corrupt, match", [
    (lambda p: (p / "header.json").unlink(), r"header\.json is missing"),
    (lambda p: (p / "header.json").write_text("{not json"), r"header\.json is not readable JSON"),
    (lambda p: (p / "weights.npy").unlink(), r"weights\.npy is missing"),
    (lambda p: (p / "offsets.npy").write_bytes(b"\x93NUMPY garbage"), r"offsets\.npy is trunc"),
    (lambda p: np.save(p / "weights.npy", np.ones(3, np.float32)), r"weights\.npy holds float32"),
    (lambda p: np.save(p / "docs.npy", np.load(p / "docs.npy") + 1000), r"docs\.npy: rows outside"),
    (lambda p: np.save(p / "docs.npy", np.load(p / "docs.npy")[::-1].copy()),
     r"docs\.npy: rows are not strictly ascending"),
    (lambda p: np.save(p / "offsets.npy", np.load(p / "offsets.npy")[::-1].copy()),
     r"offsets\.npy: not non-decreasing"),
    (lambda p: np.save(p / "weights.npy", np.full_like(np.load(p / "weights.npy"), np.inf)),
     r"weights\.npy: non-finite"),
])
def test_load_corrupt_index(tmp_path, corrupt, match):
  path = _saved(tmp_path)
  corrupt(path)
  with pytest.raises(CheckpointError, match=match):
    SparseIndex.load(path)


def test_load_rejects_other_versions_and_missing_dirs(tmp_path):
  path = _saved(tmp_path)
  header = json.loads((path / "header.json").read_text())
  (path / "header.json").write_text(json.dumps({**header, "version": 99}))
  with pytest.raises(CheckpointError, match="format version 99"):
    SparseIndex.load(path)
  with pytest.raises(CheckpointError, match="does not exist"):
    SparseIndex.load(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_search_jax_equals_search(corpus, dtype):
  values, indices, doc_ids, q_values, q_indices = corpus
  index = SparseIndex.build(values, indices, 300, doc_ids, dtype=dtype)
  want = index.search(q_values, q_indices, top_k=700)  # top_k > N as well
  for chunk in (0, 7):  # one call; several calls with a padded last chunk
    got = index.search_jax(q_values, q_indices, top_k=700, query_chunk=chunk)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_recall():
  exact = np.array([[1, 2, 3], [4, -1, -1], [-1, -1, -1]])
  assert recall(np.array([[3, 9, 1], [4, 5, 6], [7, 8, 9]]), exact) == pytest.approx(5 / 6)
  with pytest.raises(DataError):
    recall(exact[:2], exact)


def test_seismic_adapter_recall(corpus):
  pytest.importorskip("seismic", reason="pyseismic-lsr is not installed")
  values, indices, doc_ids, q_values, q_indices = corpus
  q_values = np.abs(q_values)
  exact_scores, exact_ids = _brute_force(values, indices, doc_ids, q_values, q_indices, 300, 600)
  given = values.copy(), indices.copy()
  seismic = SeismicAdapter.build(values, indices, 300, doc_ids)
  # The caller's codes are left as they were (scipy once sorted the int32 indices in place).
  np.testing.assert_array_equal(values, given[0])
  np.testing.assert_array_equal(indices, given[1])
  scores, ids = seismic.search(q_values, q_indices, top_k=10, query_cut=5, heap_factor=1.0)
  assert ids.shape == (40, 10) and set(ids[ids >= 0].tolist()) <= set(doc_ids.tolist())
  assert recall(ids, exact_ids[:, :10]) >= 0.9
  # Results are keyed back to their own query: every hit carries that query's exact score.
  for q in range(40):
    exact = dict(zip(exact_ids[q].tolist(), exact_scores[q].tolist()))
    hits = ids[q] >= 0
    np.testing.assert_allclose(scores[q][hits], [exact[d] for d in ids[q][hits]], rtol=1e-5)
    assert (np.diff(scores[q][hits]) <= 0).all()
