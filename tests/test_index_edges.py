"""saejax.retrieval.index at the edges a search engine's users reach: codes at the ends of
float32's range under idf weighting, and top_k far beyond the number of documents."""

import json

import numpy as np
import pytest

from saejax.errors import CheckpointError, ConfigError
from saejax.retrieval import index as index_module, index_kernels
from saejax.retrieval.index import SparseIndex
from idf_reference import idf_weighted  # tests/ is on sys.path (pytest rootdir-relative import)


@pytest.mark.parametrize("scale", [1e-30, 1e-23, 1e-21, 1e19, 1e30])
def test_idf_weighting_keeps_tiny_and_huge_codes(scale):
  """A document code whose values are all tiny (or huge) but finite is found, with the score of
  the float64 reference, as the plain index finds it: its row norm must not underflow (the
  document scored 0, never found) or overflow (the build failed) in float32 squares."""
  values = np.array([[1.0, 0.5], [0.75, 0.5], [1.0, 0.25], [3.0, 2.0]], np.float32)
  indices = np.array([[0, 1], [0, 2], [1, 3], [2, 3]], np.int32)
  values[3] *= np.float32(scale)  # document 3: one latent shared (2), one not (3)
  q_values, q_indices = np.array([[1.0, 0.5]], np.float32), np.array([[2, 0]], np.int32)
  docs, queries = np.zeros((4, 4)), np.zeros((1, 4))
  np.add.at(docs, (np.arange(4)[:, None], indices), values.astype(np.float64))
  np.add.at(queries, (np.arange(1)[:, None], q_indices), q_values)
  q_ref, d_ref = idf_weighted(queries, docs, 0.5)
  want = (q_ref @ d_ref.T)[0]
  assert want[3] > 0 and 3 in SparseIndex.build(values, indices, 4).search(
      q_values, q_indices, 4)[1]
  index = SparseIndex.build(values, indices, 4, idf_power=0.5)
  order = np.lexsort((np.arange(4), -want))
  order = order[want[order] > 0]  # document 2 shares no latent with the query: no hit
  assert sorted(order.tolist()) == [0, 1, 3]
  for scores, ids in (index.search(q_values, q_indices, 4),
                      index.search_jax(q_values, q_indices, 4)):
    assert ids[0].tolist() == order.tolist() + [-1]
    np.testing.assert_allclose(scores[0, :3], want[order], rtol=1e-5)


def test_top_k_beyond_the_documents_is_padding(monkeypatch):
  """top_k far above num_docs: the kernel ranks at depth num_docs (its [Q, top_k] heaps would
  otherwise take top_k x 8 bytes a query before any padding is written), and the result is padded
  to top_k as the result rule says, on every path (one thread, split over document ranges and
  merged, JAX)."""
  n = index_kernels.BLOCK + 5  # two row blocks: a split over document ranges has two shares
  values, indices = np.ones((n, 1), np.float32), np.full((n, 1), 2, np.int32)
  hits = {0: (0, 1.0), n - 1: (0, 0.25), 1: (1, 0.5)}  # row: (latent, value)
  for row, (latent, value) in hits.items():
    indices[row], values[row] = latent, value
  doc_ids = np.arange(n, dtype=np.int64) * 3
  doc_ids[-1] = 2**63 - 1
  index = SparseIndex.build(values, indices, 3, doc_ids)
  q_values, q_indices = np.array([[1.0], [-1.0]], np.float32), np.array([[0], [1]], np.int32)
  top_k = 200_000
  depths = []
  kernel = index_kernels.search_kernel

  def recording(*args):
    depths.append(args[10])  # top_k
    return kernel(*args)

  monkeypatch.setattr(index_kernels, "search_kernel", recording)
  monkeypatch.setattr(index_module, "MIN_SHARE_NS", 1.0)  # any work splits over documents
  results = [index.search(q_values, q_indices, top_k),
             index.search(q_values, q_indices, top_k, num_threads=2),
             index.search_jax(q_values, q_indices, top_k)]
  assert len(depths) == 3 and max(depths) <= n
  for scores, ids in results:
    assert scores.shape == ids.shape == (2, top_k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert ids[0, :2].tolist() == [0, 2**63 - 1] and scores[0, :2].tolist() == [1.0, 0.25]
    assert (ids[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    assert (ids[1] == -1).all() and np.isneginf(scores[1]).all()  # negative scores: no hits


def test_top_k_too_large_for_memory_is_a_config_error():
  """A top_k whose padded results cannot fit in the machine's memory fails at once with a
  ConfigError naming top_k, the queries and the bytes (not a MemoryError from inside a kernel,
  nor an allocation the kernel then fills until the OS kills the process)."""
  index = SparseIndex.build(np.ones((3, 1), np.float32), np.arange(3)[:, None], 3)
  q = np.ones((2, 1), np.float32), np.zeros((2, 1), np.int32)
  for search in (index.search, index.search_jax):
    with pytest.raises(ConfigError,
                       match=r"top_k=1,000,000,000,000 for 2 queries needs 22,352 GiB"):
      search(*q, top_k=10**12)


@pytest.mark.parametrize("field, value", [("idf_power", -1), ("idf_power", "0.5"),
                                          ("idf_power", None), ("dense_fraction", 0)])
def test_load_bad_header_setting_is_a_checkpoint_error(tmp_path, field, value):
  """A header whose idf_power or dense_fraction is damaged is a corrupt file: CheckpointError
  naming header.json and the field (as for every other header field), not a ConfigError about a
  setting the caller never passed."""
  index = SparseIndex.build(np.ones((3, 1), np.float32), np.arange(3)[:, None], 3, idf_power=0.5)
  path = index.save(tmp_path / "index")
  header = json.loads((path / "header.json").read_text())
  (path / "header.json").write_text(json.dumps({**header, field: value}))
  with pytest.raises(CheckpointError, match=rf"header\.json: field '{field}'"):
    SparseIndex.load(path)
  if field == "dense_fraction":  # an override of the damaged setting still loads
    assert SparseIndex.load(path, dense_fraction=0.5).idf_power == 0.5
