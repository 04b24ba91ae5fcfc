"""Milvus Lite adapter vs saejax's exact index on real SciFact codes; JSONL round trip."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.data.tokenizer import load_tokenizer
from saejax.errors import ConfigError, DataError
from saejax.hub import convert
from saejax.hub.demo import minilm_dir
from saejax.retrieval import engines
from saejax.retrieval.encode import EncodeConfig, encode_dense, encode_sparse
from saejax.retrieval.index import SparseIndex, weigh_codes
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder

NUM_LATENTS = 4096


@pytest.fixture(scope="module")
def scifact_codes(data_dir):
  """300 SciFact abstracts and 40 of its queries, encoded by real MiniLM + a random TopK SAE."""
  docs = [json.loads(line) for _, line in zip(range(300), open(data_dir / "scifact/corpus.jsonl"))]
  queries = [json.loads(line)["text"]
             for _, line in zip(range(40), open(data_dir / "scifact/queries.jsonl"))]
  cfg, encoder = convert.load_hf(minilm_dir(), head=False)
  tok = load_tokenizer(minilm_dir(), vocab_size=cfg.vocab_size)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=cfg.hidden_size, num_latents=NUM_LATENTS, k=32),
                    rngs=nnx.Rngs(0))
  model = Embedder(encoder, sae)
  texts = [d["title"] + " " + d["text"] for d in docs]
  enc = EncodeConfig(max_len=128, batch_size=32, progress=False)
  sample = jnp.asarray(encode_dense(encoder, tok, texts[:64], enc).v)
  sae.b_pre.set_value(sae_lib.init_b_pre(sample, "mean"))  # centred codes, as after training
  d = encode_sparse(model, tok, texts, config=enc)
  q = encode_sparse(model, tok, queries, k=16, config=enc)
  doc_ids = np.asarray([int(doc["_id"]) for doc in docs])
  return doc_ids, [doc["text"] for doc in docs], d, q


@pytest.fixture(scope="module")
def milvus(scifact_codes, tmp_path_factory):
  doc_ids, _, d, _ = scifact_codes
  index = engines.MilvusIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids,
                                    uri=tmp_path_factory.mktemp("milvus") / "docs.db")
  yield index
  index.close()


def test_milvus_lite_equals_exact_index(scifact_codes, milvus):
  doc_ids, _, d, q = scifact_codes
  assert milvus.num_docs == len(doc_ids)
  exact = SparseIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids)
  want_scores, want_ids = exact.search(q.values, q.indices, top_k=10)
  got_scores, got_ids = milvus.search(q.values, q.indices, top_k=10)
  assert (want_ids >= 0).sum() > 200  # real hits, not padding
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)


def test_milvus_steered_query_with_negative_weight(scifact_codes, milvus):
  """A steered query (a boosted and a suppressed latent) ranks as in the exact index."""
  doc_ids, _, d, q = scifact_codes
  values = np.concatenate([q.values[:5], np.full((5, 2), [3.0, -2.0], np.float32)], axis=1)
  top = np.bincount(d.indices.reshape(-1), minlength=NUM_LATENTS).argsort()[::-1]
  indices = np.concatenate([q.indices[:5], np.tile(top[:2], (5, 1))], axis=1)
  exact = SparseIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids)
  want_scores, want_ids = exact.search(values, indices, top_k=10)
  got_scores, got_ids = milvus.search(values, indices, top_k=10)
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_milvus_idf_weighting_equals_exact_index_and_reopens(scifact_codes, tmp_path):
  """idf_power: Milvus ranks as `SparseIndex(idf_power=...)`, steered queries (a latent repeated,
  a negative weight) included; `open` reads the weights back; a plain rebuild drops them."""
  doc_ids, _, d, q = scifact_codes
  uri = tmp_path / "idf.db"
  milvus = engines.MilvusIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids, uri=uri,
                                     idf_power=0.5)
  exact = SparseIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids, idf_power=0.5)
  np.testing.assert_allclose(milvus.latent_weights, exact.latent_weights, rtol=1e-6)
  busiest = np.bincount(d.indices.reshape(-1), minlength=NUM_LATENTS).argmax()
  steered = (np.concatenate([q.values[:5], np.full((5, 2), [-2.0, 1.0], np.float32)], 1),
             np.concatenate([q.indices[:5], [[busiest, q.indices[i, 0]] for i in range(5)]], 1))
  for values, indices in ((q.values, q.indices), steered):
    want_scores, want_ids = exact.search(values, indices, top_k=10)
    got_scores, got_ids = milvus.search(values, indices, top_k=10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
  plain_ids = SparseIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids).search(
      q.values, q.indices, top_k=10)[1]
  idf_ids = exact.search(q.values, q.indices, top_k=10)[1]
  assert (plain_ids != idf_ids).any()  # the weights change rankings on these codes
  milvus.close()
  reopened = engines.MilvusIndex.open(uri, "saejax", NUM_LATENTS)
  assert reopened.idf_power == 0.5
  np.testing.assert_array_equal(reopened.search(q.values, q.indices, top_k=10)[1], idf_ids)
  reopened.close()
  engines.MilvusIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids, uri=uri,
                            overwrite=True).close()
  plain = engines.MilvusIndex.open(uri, "saejax", NUM_LATENTS)
  assert plain.idf_power == 0 and plain.latent_weights is None
  np.testing.assert_array_equal(plain.search(q.values, q.indices, top_k=10)[1], plain_ids)
  plain.close()


def test_milvus_empty_query_and_refusals(scifact_codes, milvus, tmp_path):
  _, _, d, q = scifact_codes
  scores, ids = milvus.search(np.zeros((1, 4), np.float32), q.indices[:1, :4], top_k=3)
  assert ids.tolist() == [[-1, -1, -1]] and np.isneginf(scores).all()
  with pytest.raises(DataError, match="outside"):
    milvus.search(q.values[:1], np.full((1, 16), NUM_LATENTS), top_k=3)
  with pytest.raises(DataError, match="no non-zero latent"):
    engines.MilvusIndex.build(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int32),
                              NUM_LATENTS, uri=tmp_path / "x.db")


def test_jsonl_round_trip(scifact_codes, tmp_path):
  doc_ids, contents, d, _ = scifact_codes
  file = engines.write_jsonl(tmp_path / "docs.jsonl", doc_ids, contents, d.values, d.indices,
                             NUM_LATENTS)
  first = json.loads(file.open().readline())
  assert set(first) == {"id", "content", "vector"} and first["content"] == contents[0]
  assert all(len(key) == 6 and key.startswith("f") for key in first["vector"])
  ids, texts, values, indices = engines.read_jsonl(file, NUM_LATENTS)
  assert ids == [str(i) for i in doc_ids] and texts == contents
  for row in range(len(ids)):
    want = {int(t): float(v) for t, v in zip(d.indices[row], d.values[row]) if v != 0}
    got = {int(t): float(v) for t, v in zip(indices[row], values[row]) if v != 0}
    assert got == pytest.approx(want)
  # What an engine reads back searches like the codes themselves.
  a = SparseIndex.build(values, indices, NUM_LATENTS, np.asarray(ids, int))
  b = SparseIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids)
  np.testing.assert_array_equal(a.search(d.values[:5], d.indices[:5])[1],
                                b.search(d.values[:5], d.indices[:5])[1])


def test_jsonl_with_idf_weights_ranks_as_the_idf_index(scifact_codes, tmp_path):
  """Documents written with an idf index's weights, read back into a plain inner-product index
  (what an engine ingesting the file does) and searched with queries weighted the same way, give
  the idf index's results; written without the weights they do not."""
  doc_ids, _, d, q = scifact_codes
  idf = SparseIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids, idf_power=0.5)
  want_scores, want_ids = idf.search(q.values, q.indices, top_k=10)
  weighted_q = weigh_codes(q.values, q.indices, idf.latent_weights)
  for weights, same in ((idf.latent_weights, True), (None, False)):
    file = engines.write_jsonl(tmp_path / "idf.jsonl", doc_ids, None, d.values, d.indices,
                               NUM_LATENTS, latent_weights=weights)
    ids, _, values, indices = engines.read_jsonl(file, NUM_LATENTS)
    engine = SparseIndex.build(values, indices, NUM_LATENTS, np.asarray(ids, int))
    scores, got = engine.search(weighted_q, q.indices, top_k=10)
    if same:
      np.testing.assert_array_equal(got, want_ids)
      np.testing.assert_allclose(scores, want_scores, rtol=1e-5)
    else:
      assert (got != want_ids).any()
  with pytest.raises(ConfigError, match="latent_weights must be 4096 finite positive"):
    engines.write_jsonl(tmp_path / "x.jsonl", doc_ids, None, d.values, d.indices, NUM_LATENTS,
                        latent_weights=np.zeros(NUM_LATENTS))


def test_jsonl_keys_naming_one_latent_add_up(tmp_path):
  file = tmp_path / "same.jsonl"
  file.write_text('{"id": 0, "vector": {"f00001": 0.5, "f1": 0.25, "f00002": 1.0}}\n')
  _, _, values, indices = engines.read_jsonl(file)
  assert dict(zip(indices[0].tolist(), values[0].tolist())) == {1: 0.75, 2: 1.0}
  file.write_text('{"id": 0, "vector": {"f1": 3e38, "f01": 3e38}}\n')  # each fits, the sum not
  with pytest.raises(DataError, match=r"same.jsonl:1: .* summed over its keys is not a finite"):
    engines.read_jsonl(file)
  file.write_text('{"id": 0, "vector": {"f1": 1' + '0' * 400 + '}}\n')  # an int past any float
  with pytest.raises(DataError, match=r"same.jsonl:1: weight of f1 .* not a finite float32"):
    engines.read_jsonl(file)
  file.write_text('{"id": 0, "vector": {"f9999999999": 1.0}}\n')
  with pytest.raises(DataError, match=r"same.jsonl:1: latent 9999999999 .* outside \[0, 2147483648\)"):
    engines.read_jsonl(file)


def test_milvus_build_refuses_before_writing_and_breaks_ties_by_id(tmp_path):
  """A refused build (a negative value, an empty row) creates nothing, so a corrected build can
  follow; exact duplicates tied at the cut come back lowest id first, as from `SparseIndex`."""
  pytest.importorskip("milvus_lite")
  uri = tmp_path / "m.db"
  good_v, good_i = np.full((3, 2), 0.5, np.float32), np.array([[0, 1], [1, 2], [2, 3]])
  for values, match in ((good_v * [[1, -1]], r"values\[0, 1\] = -0.5 is negative"),
                        (good_v * [[1, 1], [0, 0], [1, 1]], r"documents \[1\] have no non-zero")):
    with pytest.raises(DataError, match=match):
      engines.MilvusIndex.build(values, good_i, 8, uri=uri, idf_power=0.5)
    with pytest.raises(ConfigError, match="has no collection"):
      engines.MilvusIndex.open(uri, "saejax", 8)
  engines.MilvusIndex.build(good_v, good_i, 8, uri=uri).close()
  rng = np.random.default_rng(0)
  n = 60  # one code repeated under shuffled ids, plus a few others
  values = np.tile(np.array([[0.6, 0.8]], np.float32), (n, 1))
  indices = np.tile(np.array([[3, 5]]), (n, 1))
  indices[:10, 1] = 6
  doc_ids = rng.permutation(10 * n)[:n]
  exact = SparseIndex.build(values, indices, 8, doc_ids)
  milvus = engines.MilvusIndex.build(values, indices, 8, doc_ids, uri=tmp_path / "t.db")
  for top_k in (3, 7):
    want_s, want_i = exact.search(values[-1:], indices[-1:], top_k)
    got_s, got_i = milvus.search(values[-1:], indices[-1:], top_k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-6)
  milvus.close()


def test_jsonl_wide_dictionary_keys(tmp_path):
  file = engines.write_jsonl(tmp_path / "w.jsonl", ["a"], None, np.ones((1, 2), np.float32),
                             np.asarray([[3, 123456]]), 200_000)
  assert json.loads(file.read_text())["vector"] == {"f000003": 1.0, "f123456": 1.0}


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"content": "x", "vector": {}}', "expected an object with 'id'"),
    ('{"id": 1, "vector": {"x12": 1.0}}', "key 'x12'"),
    ('{"id": 1, "vector": {"f00012": "big"}}', "not a finite float32 number"),
    ('{"id": 1, "vector": {"f09999": 1.0}}', "outside"),
    ('{"id": 1, "vector": {"f00012": 1e39}}', "not a finite float32"),
])
def test_jsonl_bad_lines_name_the_line(tmp_path, line, message):
  file = tmp_path / "bad.jsonl"
  file.write_text('{"id": 0, "content": "ok", "vector": {"f00001": 0.5}}\n' + line + "\n")
  with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
    engines.read_jsonl(file, num_latents=4096)


def _as_anserini_reads(file) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(ids, values, indices) as Anserini's JsonVectorCollection indexes a file: each weight read
  with Jackson's ``asInt`` (a float truncated toward zero) as the latent's term frequency."""
  ids, rows = [], []
  for line in open(file, encoding="utf-8"):
    record = json.loads(line)
    ids.append(record["id"])
    rows.append({int(key[1:]): int(w) for key, w in record["vector"].items() if int(w) > 0})
  k = max(1, max(len(r) for r in rows))
  values, indices = np.zeros((len(rows), k), np.float32), np.zeros((len(rows), k), np.int32)
  for i, row in enumerate(rows):
    values[i, :len(row)], indices[i, :len(row)] = list(row.values()), list(row.keys())
  return ids, values, indices


def test_jsonl_for_anserini_has_integer_weights_that_rank_as_the_codes(scifact_codes, tmp_path):
  """Anserini reads every weight as an int: the float weights of unit-norm codes (all below 1)
  index as nothing; written with ``quantize`` they are round(w * q) and the file ranks, read as
  Anserini reads it, as the exact index does (but for near-ties)."""
  doc_ids, contents, d, q = scifact_codes
  floats = engines.write_jsonl(tmp_path / "f.jsonl", doc_ids, contents, d.values, d.indices,
                               NUM_LATENTS)
  assert not _as_anserini_reads(floats)[1].any()  # why a file for Anserini needs quantize
  file = engines.write_jsonl(tmp_path / "a.jsonl", doc_ids, contents, d.values, d.indices,
                             NUM_LATENTS, quantize=100)
  ids, values, indices = _as_anserini_reads(file)
  assert ids == [str(i) for i in doc_ids]
  for row in range(len(ids)):
    want = {int(t): 100 * float(v) for t, v in zip(d.indices[row], d.values[row])
            if round(100 * float(v))}
    got = {int(t): float(v) for t, v in zip(indices[row], values[row]) if v}
    assert set(got) == set(want) and all(abs(got[t] - want[t]) <= 0.5 for t in got)
  want_ids = SparseIndex.build(d.values, d.indices, NUM_LATENTS, doc_ids).search(
      q.values, q.indices, top_k=10)[1]
  got_ids = SparseIndex.build(values, indices, NUM_LATENTS, np.asarray(ids, int)).search(
      q.values, q.indices, top_k=10)[1]
  overlap = np.mean([len(set(a[a >= 0]) & set(b)) / max(1, (a >= 0).sum())
                     for a, b in zip(want_ids, got_ids)])
  assert overlap >= 0.9, overlap
  with pytest.raises(ConfigError, match="quantize=0 must be None"):
    engines.write_jsonl(tmp_path / "x.jsonl", doc_ids, None, d.values, d.indices, NUM_LATENTS,
                        quantize=0)


def test_milvus_open_refuses_another_dictionary_size(tmp_path):
  """An idf-weighted collection knows its dictionary (a weight per latent): reopening it with a
  larger or smaller num_latents is refused, not searched with weight 1 for latents it never had."""
  pytest.importorskip("milvus_lite")
  uri = tmp_path / "s.db"
  values, indices = np.full((3, 2), 0.5, np.float32), np.array([[0, 1], [1, 2], [2, 7]])
  engines.MilvusIndex.build(values, indices, 8, uri=uri, idf_power=0.5).close()
  for num_latents in (4, 16):
    with pytest.raises(ConfigError, match=rf"cover 8 latents, not num_latents={num_latents}"):
      engines.MilvusIndex.open(uri, "saejax", num_latents)
  reopened = engines.MilvusIndex.open(uri, "saejax", 8)
  np.testing.assert_allclose(reopened.latent_weights,
                             SparseIndex.build(values, indices, 8, idf_power=0.5).latent_weights)
  reopened.close()
