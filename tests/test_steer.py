"""saejax.interpret.steer: the query transform by hand, effects on a small exact index, errors."""

import numpy as np
import pytest

from saejax.interpret import steer
from saejax.interpret.labels import LabelConfig, LatentLabel, LatentLabels
from saejax.retrieval.index import SparseIndex

S, N, K = 32, 400, 4


@pytest.fixture(scope="module")
def corpus():
  """Random document codes: K distinct latents per document, values in (0.1, 1.1)."""
  rng = np.random.default_rng(0)
  indices = np.stack([rng.choice(S, K, replace=False) for _ in range(N)]).astype(np.int32)
  values = (rng.random((N, K)) + 0.1).astype(np.float32)
  doc_ids = rng.permutation(N) * 3 + 7  # ids unlike row numbers: lookups must map them
  return values, indices, doc_ids


@pytest.fixture(scope="module")
def searcher(corpus):
  values, indices, doc_ids = corpus
  index = SparseIndex.build(values, indices, S, doc_ids)
  return steer.SteeredSearch(index, steer.DocActivations(values, indices, S, doc_ids))


def _queries(n=40, seed=1):
  rng = np.random.default_rng(seed)
  idx = np.stack([rng.choice(S, K, replace=False) for _ in range(n)]).astype(np.int32)
  return (rng.random((n, K)) + 0.1).astype(np.float32), idx


def test_steer_query_by_hand():
  q_v, q_i = np.array([[2.0, 1.0, 0.0]]), np.array([[3, 5, 9]])
  v, i = steer.steer_query(q_v, q_i, steer.Steering.by_id(suppress=[3], boost=[7], strength=0.5),
                           S)
  # scale = 2 + 1 = 3; boost 7 -> +1.5; suppress 3 -> its 2.0 zeroed, -1.5 appended.
  np.testing.assert_array_equal(i, [[3, 5, 9, 7, 3]])
  np.testing.assert_allclose(v, [[0.0, 1.0, 0.0, 1.5, -1.5]])
  v, i = steer.steer_query(q_v, q_i, steer.Steering.by_id(exclude=[5]), S)
  np.testing.assert_allclose(v, [[2.0, 0.0, 0.0, 0.0]])


def test_steered_scores_are_exact(corpus, searcher):
  """Steered search through the index equals brute-force scoring of the steered query."""
  values, indices, doc_ids = corpus
  q_v, q_i = _queries(10)
  steering = steer.Steering.by_id(boost=[1, 2], suppress=[3], strength=0.7)
  scores, ids = searcher.search(q_v, q_i, 10, steering)
  sv, si = steer.steer_query(q_v, q_i, steering, S)
  dense_d = np.zeros((N, S))
  np.add.at(dense_d, (np.arange(N)[:, None], indices), values)
  dense_q = np.zeros((10, S))
  np.add.at(dense_q, (np.arange(10)[:, None], si), sv)
  brute = dense_q @ dense_d.T
  rows = searcher.docs.rows(ids)
  np.testing.assert_allclose(scores, np.take_along_axis(brute, rows, 1), rtol=1e-5)
  np.testing.assert_allclose(scores[:, 0], brute.max(1), rtol=1e-5)


def test_suppress_exclude_boost_only(searcher):
  q_v, q_i = _queries()
  j = int(np.bincount(q_i.ravel(), minlength=S).argmax())  # a latent many queries hold
  docs = searcher.docs
  _, base = searcher.search(q_v, q_i, 10)
  before = steer.fraction_activating(base, docs, j).mean()
  assert before > 0.1
  _, soft = searcher.search(q_v, q_i, 10, steer.Steering.by_id(suppress=[j], strength=5.0))
  assert steer.fraction_activating(soft, docs, j).mean() < 0.02
  _, hard = searcher.search(q_v, q_i, 10, steer.Steering.by_id(exclude=[j]))
  assert steer.fraction_activating(hard, docs, j).max() == 0
  assert (hard >= 0).all()  # deepening filled every query's 10 slots
  _, up = searcher.search(q_v, q_i, 10, steer.Steering.by_id(boost=[j], strength=1.0))
  assert steer.fraction_activating(up, docs, j).mean() > before
  _, only = searcher.search(q_v, q_i, 10, steer.Steering.by_id(only=[j]))
  assert steer.fraction_activating(only, docs, j).min() == 1.0
  # Queries without j whose results hold no j-document: suppression leaves their results alone.
  untouched = ~(q_i == j).any(1) & (steer.fraction_activating(base, docs, j) == 0)
  assert untouched.any()
  np.testing.assert_array_equal(soft[untouched], base[untouched])


def test_filters_see_every_document():
  """An `only` filter whose latent few documents hold deepens until all of them are found."""
  values = np.ones((50, 1), np.float32)
  indices = np.zeros((50, 1), np.int32)
  indices[[5, 40]] = 1  # only two documents hold latent 1
  s = steer.SteeredSearch(SparseIndex.build(values, indices, 2),
                          steer.DocActivations(values, indices, 2))
  _, ids = s.search(np.ones((1, 1), np.float32), np.zeros((1, 1), np.int32), 10,
                    steer.Steering.by_id(only=[1]))
  np.testing.assert_array_equal(ids[0, :2], [5, 40])
  assert (ids[0, 2:] == -1).all()


@pytest.mark.parametrize("idf_power", [0.5, 1.0])
def test_suppress_holds_on_an_idf_weighted_index(idf_power):
  """On an idf-weighted index a document whose strongest latent (as the index weighs it) is j
  drops out at strength 1, as on a plain one; a common latent's suppression is not weakened by its
  small idf. Reference: the idf weighting written out in NumPy."""
  rng = np.random.default_rng(3)
  k = 8
  p = 1.0 / np.arange(1, S + 1) ** 1.5  # head-heavy: idf weights spread over ~0.1 to ~2-4
  indices = np.stack([rng.choice(S, k, replace=False, p=p / p.sum()) for _ in range(N)])
  values = (rng.random((N, k)) + 0.1).astype(np.float32)
  index = SparseIndex.build(values, indices, S, idf_power=idf_power)
  searcher = steer.SteeredSearch(index, steer.DocActivations(values, indices, S))
  df = np.bincount(indices.ravel(), minlength=S)
  w = np.log((N + 1) / (df + 0.5)) ** idf_power
  weighted = values * w[indices]
  strongest = indices[np.arange(N), weighted.argmax(1)]
  q_v, q_i = _queries(40, seed=4)
  counts = np.bincount(strongest, minlength=S)
  candidates = np.flatnonzero(counts >= 3)
  common = candidates[np.argsort(w[candidates])[:2]]  # the smallest idf among them
  assert w[common].max() < 1 < np.median(w)
  for j in (*common, counts.argmax()):
    scores, ids = searcher.search(q_v, q_i, N, steer.Steering.by_id(suppress=[j], strength=1.0))
    returned = ids[ids >= 0]
    assert not np.isin(returned, np.flatnonzero(strongest == j)).any(), j
    # ... while a weaker suppression keeps some of them (the test can tell strengths apart).
    _, mild = searcher.search(q_v, q_i, N, steer.Steering.by_id(suppress=[j], strength=0.3))
    assert np.isin(mild[mild >= 0], np.flatnonzero(strongest == j)).any(), j


def test_steer_query_with_latent_weights_by_hand():
  q_v, q_i = np.array([[2.0, 1.0]]), np.array([[3, 5]])
  w = np.ones(S)
  w[3], w[5], w[7] = 0.5, 2.0, 4.0
  v, i = steer.steer_query(q_v, q_i, steer.Steering.by_id(suppress=[3], boost=[7], strength=0.5),
                           S, w)
  # scale = 2 * 0.5 + 1 * 2 = 3 as weighted; boost 7 -> 0.5 * 3 / 4; suppress 3 -> -0.5 * 3 / 0.5.
  np.testing.assert_array_equal(i, [[3, 5, 7, 3]])
  np.testing.assert_allclose(v, [[0.0, 1.0, 0.375, -3.0]])
  with pytest.raises(steer.DataError, match="latent_weights"):
    steer.steer_query(q_v, q_i, steer.Steering.by_id(boost=[7]), S, np.zeros(S))
  with pytest.raises(steer.DataError, match=r"query indices\[0, 1\] = 40 is outside \[0, 32\)"):
    steer.steer_query(q_v, np.array([[3, 40]]), steer.Steering.by_id(boost=[7]), S)


def test_later_operations_win_in_the_filters_too():
  """Where two operations name one latent the later one alone acts, on the query and on the
  filters (as in the explorer page, which keeps one operation per latent). Documents 0-4 hold
  latent 1, documents 5-9 latent 2; the query holds both at 1, so scale = 2."""
  vals = np.ones((10, 1), np.float32)
  idx = np.array([[1]] * 5 + [[2]] * 5, np.int32)
  s = steer.SteeredSearch(SparseIndex.build(vals, idx, 8), steer.DocActivations(vals, idx, 8))
  q_v, q_i = np.ones((1, 2), np.float32), np.array([[1, 2]], np.int32)
  search = lambda text: s.search(q_v, q_i, 5, steer.parse_steering(text, None, 8))
  scores, ids = search("without #1; more about #1")  # the boost replaces the exclude
  np.testing.assert_array_equal(ids, [[0, 1, 2, 3, 4]])
  np.testing.assert_allclose(scores, [[3.0] * 5])  # latent 1 weighs 1 + scale
  scores, ids = search("more about #1; without #1")  # the exclude replaces the boost
  np.testing.assert_array_equal(ids, [[5, 6, 7, 8, 9]])
  np.testing.assert_allclose(scores, [[1.0] * 5])
  # One operation on several latents keeps, as a filter, those no later operation names.
  st = steer.parse_steering("only #1, 2; more about #2", None, 8)
  assert [(op.kind, op.latents) for op in st.filters] == [("only", (1,))]
  assert steer.parse_steering("only #1; more about #1", None, 8).filters == ()


def test_latent_ids_out_of_range_are_refused():
  """-1 would read latent S-1 through NumPy's negative indexing; S and above are no latent."""
  vals = np.ones((4, 1), np.float32)
  idx = np.array([[7], [7], [1], [2]], np.int32)
  docs = steer.DocActivations(vals, idx, 8)
  ids = np.arange(4)[None]
  np.testing.assert_allclose(steer.fraction_activating(ids, docs, 7), [0.5])
  for bad in (-1, 8, 100):
    with pytest.raises(steer.ConfigError, match=rf"latent id\(s\) \[{bad}\] out of range \[0, 8\)"):
      steer.fraction_activating(ids, docs, bad)
    with pytest.raises(steer.ConfigError, match=r"S=8"):
      docs.activation(ids, bad)


LABELS = LatentLabels(
    {0: LatentLabel(0, "audio sound mixer", ("audio", "sound", "mixer"), (3.0, 2.0, 1.0), 0.3),
     1: LatentLabel(1, "license gpl copyright", ("license", "gpl", "copyright"), (3, 2, 1), 0.2),
     2: LatentLabel(2, "network socket", ("network", "socket"), (2.0, 1.0), 0.1),
     5: LatentLabel(5, "audio plugins", ("audio", "plugins"), (2.0, 1.0), 0.05)},
    num_latents=S, fingerprint="x", config=LabelConfig())


def test_parse_by_label_and_id():
  st = steer.parse_steering("less about licensing; only about audio, more about latent 7, 9 ;"
                            " without network sockets", LABELS, S)
  assert [(op.kind, op.latents) for op in st.ops] == [
      ("suppress", (1,)), ("only", (0, 5)), ("boost", (7, 9)), ("exclude", (2,))]
  assert "license gpl copyright" in st.describe(LABELS)


def test_errors():
  with pytest.raises(steer.SteerError, match=r"no latent label matches 'karaoke'.*closest labels"):
    steer.parse_steering("less about karaoke", LABELS, S)
  with pytest.raises(steer.SteerError, match="'license gpl copyright' \\(latent 1\\)"):
    steer.parse_steering("only about licence", LABELS, S)
  with pytest.raises(steer.SteerError, match=r"out of range \[0, 32\)"):
    steer.parse_steering("more about #32", LABELS, S)
  with pytest.raises(steer.SteerError, match=r"\[40\] out of range"):
    steer.steer_query(np.ones((1, 1)), np.zeros((1, 1), int), steer.Steering.by_id(boost=[40]), S)
  with pytest.raises(steer.SteerError, match="does not start with"):
    steer.parse_steering("audio please", LABELS, S)
  with pytest.raises(steer.SteerError, match="docs=DocActivations"):
    steer.SteeredSearch(SparseIndex.build(np.ones((2, 1)), np.zeros((2, 1), int), S)).search(
        np.ones((1, 1)), np.zeros((1, 1), int), 5, steer.Steering.by_id(exclude=[0]))


def test_steering_through_milvus(corpus, searcher, tmp_path):
  """The external-engine adapter (`saejax.retrieval.engines.MilvusIndex`, Milvus Lite) gives the same
  steered results as the exact index: suppress (negative query weights) and exclude (filter)."""
  pytest.importorskip("milvus_lite")
  from saejax.retrieval import engines
  values, indices, doc_ids = corpus
  milvus = steer.SteeredSearch(
      engines.MilvusIndex.build(values, indices, S, doc_ids, uri=str(tmp_path / "docs.db")),
      steer.DocActivations(values, indices, S, doc_ids))
  q_v, q_i = _queries(8)
  j = int(q_i[0, 0])
  for steering in (steer.Steering.by_id(suppress=[j], boost=[(j + 1) % S], strength=0.5),
                   steer.Steering.by_id(exclude=[j])):
    want_s, want_i = searcher.search(q_v, q_i, 10, steering)
    got_s, got_i = milvus.search(q_v, q_i, 10, steering)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4)
