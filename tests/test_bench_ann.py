"""benchmarks/bench_ann.py's own logic: the tuning sweep and the tie-aware dense recall."""

import importlib
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

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
