"""benchmarks/bench_ann.py's own logic: the tuning sweep, the tie-aware dense recall and the
sparse systems' scoring."""

import dataclasses
import importlib
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from idf_reference import idf_weighted  # tests/ is on sys.path (pytest rootdir-relative import)

from saejax.retrieval.index import IDF_POWER

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_ann():
  """The script as a module; the thread variables its import pins are restored afterwards."""
  pytest.importorskip("faiss")
  pytest.importorskip("seismic")
  sys.path.insert(0, str(BENCHMARKS))
  try:
    with mock.patch.dict(os.environ):
      return importlib.import_module("bench_ann")
  finally:
    sys.path.remove(str(BENCHMARKS))


def test_first_reaching_picks_the_smallest_candidate_reaching_the_target(bench_ann):
  recall = {16: 0.95, 32: 0.985, 64: 0.9901, 128: 0.999, 256: 1.0}
  asked = []

  def measure(ef):
    asked.append(ef)
    return recall[ef]

  chosen, measured = bench_ann.first_reaching(list(recall), measure, 0.99)
  assert chosen == 64
  assert asked == [16, 32, 64]  # the sweep stops at the first that reaches the target
  assert measured == {16: 0.95, 32: 0.985, 64: 0.9901}


def test_first_reaching_returns_none_when_nothing_reaches(bench_ann):
  chosen, measured = bench_ann.first_reaching(["a", "b"], {"a": 0.5, "b": 0.9}.get, 0.99)
  assert chosen is None and measured == {"a": 0.5, "b": 0.9}


def test_dense_tie_recall_counts_a_copy_of_an_exact_answer(bench_ann):
  rng = np.random.default_rng(0)
  distinct = bench_ann.unit(rng.standard_normal((40, 8)))
  docs = np.concatenate([distinct, distinct])  # document i + 40 is a copy of document i
  queries = bench_ann.unit(rng.standard_normal((3, 8)))
  scores = queries @ docs.T
  exact_ids = np.argsort(-scores, axis=1, kind="stable")[:, :10]
  exact_scores = np.take_along_axis(scores, exact_ids, 1)
  copies = np.where(exact_ids < 40, exact_ids + 40, exact_ids - 40)
  assert bench_ann.dense_tie_recall(copies, exact_scores, exact_ids, docs, queries) == 1.0
  worst = np.argsort(scores, axis=1, kind="stable")[:, :10]  # the 10 lowest: none is correct
  assert bench_ann.dense_tie_recall(worst, exact_scores, exact_ids, docs, queries) == 0.0
  half = exact_ids.copy()
  half[:, 5:] = -1  # five answers of ten, the rest missing
  assert bench_ann.dense_tie_recall(half, exact_scores, exact_ids, docs, queries) == 0.5


def test_sparse_systems_score_as_saejax_searches(bench_ann):
  """saejax and Seismic both score the idf-weighted cosine (the search saejax ships): each
  returned document's score equals the NumPy reference's, and both find the exact top 10."""
  rng = np.random.default_rng(1)
  n, k, s = 600, 6, 60
  popular = np.arange(1, s + 1) ** -1.0  # a few latents in most documents: idf matters
  indices = np.stack([rng.choice(s, k, replace=False, p=popular / popular.sum())
                      for _ in range(n + 20)]).astype(np.int32)
  values = bench_ann.unit(rng.random(indices.shape) + 0.1)
  corpus = bench_ann.bi.Corpus("test", values[:n], indices[:n], values[n:], indices[n:], s, "")
  dense = bench_ann.unit(rng.standard_normal((n + 20, 8)))
  args = bench_ann.parse_args(["--threads", "1"])
  assert args.idf_power == IDF_POWER
  docs, queries = np.zeros((n, s)), np.zeros((20, s))
  np.put_along_axis(docs, indices[:n], values[:n], 1)
  np.put_along_axis(queries, indices[n:], values[n:], 1)
  q_ref, d_ref = idf_weighted(queries, docs, IDF_POWER)
  reference = q_ref @ d_ref.T
  want = np.sort(reference, axis=1)[:, ::-1][:, :10]
  assert not np.allclose(want, np.sort(queries @ docs.T, axis=1)[:, ::-1][:, :10], atol=1e-3)
  systems = bench_ann.build_systems(corpus, dense[:n], dense[n:], args, (["40:1.0"], [64]),
                                    log=False)
  saejax, seismic_ = systems[:2]
  scores, ids = saejax.answers()
  np.testing.assert_allclose(scores, np.take_along_axis(reference, ids, 1), rtol=1e-5)
  np.testing.assert_allclose(scores, want, rtol=1e-5)  # exact: the true top 10
  # Seismic stores values in half precision: its scores are the reference's to ~1e-3; it is
  # approximate, so its recall (against saejax, on the weighted codes) is high, not 1.
  scores, ids = seismic_.answers()
  np.testing.assert_allclose(scores, np.take_along_axis(reference, ids, 1), rtol=2e-3, atol=1e-4)
  assert seismic_.recall > 0.9


def test_hnsw_is_tuned_to_the_least_efsearch_reaching_the_target(bench_ann):
  """A coarse grid's first passing efSearch is refined by bisection: with recall planted as a
  step at 410, the grid's 512 becomes ~410 (within 1/16), never below it."""
  recall = lambda ef: 0.995 if ef >= 410 else 0.98  # noqa: E731
  ef, got = bench_ann.tune("planted", [64, 128, 256, 384, 512, 768], recall, 0.99, log=False,
                           refine=True)
  assert 410 <= ef <= 410 + 384 // 16 and got == 0.995
  # Without a failing candidate before it there is nothing to refine; unrefined, the grid's value.
  assert bench_ann.tune("planted", [512, 768], recall, 0.99, log=False, refine=True)[0] == 512
  assert bench_ann.tune("planted", [384, 512], recall, 0.99, log=False)[0] == 512


def test_jitter_repeats_moves_each_repeat_to_the_cosine_and_recodes_it(bench_ann):
  """Every occurrence of a tiled text after its first lies at exactly the cosine of its original
  (norm kept), carries the code of its moved vector, and the first occurrences are untouched."""
  rng = np.random.default_rng(2)
  texts, d, k = 30, 16, 4
  base = rng.standard_normal((texts, d)).astype(np.float32) * 3
  rows = rng.permutation(np.arange(100) % texts)  # each text 3-4 times, shuffled

  def codes(v):  # a NumPy TopK of the raw vector: a code that changes when the vector moves
    idx = np.argsort(-v, axis=1, kind="stable")[:, :k].astype(np.int32)
    return np.take_along_axis(v, idx, 1), idx

  values, indices = codes(base[rows])
  corpus = bench_ann.bi.Corpus("real:1m", values, indices, values[:2], indices[:2], d, "x",
                               rows, np.arange(2))
  moved_corpus, moved = bench_ann.jitter_repeats(corpus, base[rows], 0.9, codes)
  first = np.zeros(len(rows), bool)
  first[[int(np.flatnonzero(rows == t)[0]) for t in range(texts)]] = True
  np.testing.assert_array_equal(moved[first], base[rows][first])
  np.testing.assert_array_equal(moved_corpus.indices[first], indices[first])
  original = base[rows][~first]
  cos = np.sum(bench_ann.unit(moved[~first]) * bench_ann.unit(original), axis=1)
  np.testing.assert_allclose(cos, 0.9, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(moved[~first], axis=1),
                             np.linalg.norm(original, axis=1), rtol=1e-5)
  want_v, want_i = codes(moved[~first])
  np.testing.assert_array_equal(moved_corpus.indices[~first], want_i)
  np.testing.assert_array_equal(moved_corpus.values[~first], want_v)
  assert len({tuple(r) for r in moved.round(4)}) == len(rows)  # no two documents equal
  with pytest.raises(SystemExit, match="jitter-cosine"):
    bench_ann.jitter_repeats(corpus, base[rows], 1.0, codes)
  distinct = dataclasses.replace(corpus, rows=np.arange(texts), values=values[:texts],
                                 indices=indices[:texts])
  with pytest.raises(SystemExit, match="repeats no text"):  # nothing to move: said, not a crash
    bench_ann.jitter_repeats(distinct, base, 0.9, codes)
