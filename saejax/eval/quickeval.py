"""Retrieval evaluation right after training, on a BEIR-format folder, next to three baselines.

    python -m saejax.train --config configs/quickstart.py   # calls `run` if config.eval.enabled

Systems, each ranking the top `RUN_DEPTH` (100) documents per query exactly:
  * saejax: the trained `Embedder`'s TopK SAE embeddings (`saejax.sae.topk.SAE.embed`; k may differ
    for queries and documents), searched with the exact index (`saejax.retrieval.index`) as the
    evaluation harness searches them: sparse dot product of the unit-normalised codes (cosine)
    when `SAEConfig.normalize_codes`, else of the raw codes, the similarity the model is trained
    with, idf-weighted (`EvalConfig.idf_power`; 0: none);
  * "bm25": Okapi BM25 (Robertson & Zaragoza 2009) with bm25s (Lucene variant, k1=1.5, b=0.75),
    lower-cased word tokens (regex ``\\w\\w+``), English stopwords removed and NO stemming:
    PyStemmer is not a saejax dependency, so this baseline is a slightly conservative BM25;
  * "dense": the untouched encoder the model was initialised from (`config.model.init_from`),
    mean-pooled, cosine similarity (sentence-transformers' all-MiniLM-L6-v2 recipe);
  * "random": the floor, the untouched encoder with an untrained SAE of the same S and k (random
    unit encoder rows, zero biases): z = ReLU(TopK(G v)). No training at all keeps this much.
Documents with no score (no shared latent, no shared word) are not retrieved, so they never
count as lucky ties.

Metrics come from `ir_measures` (trec_eval's definitions through pytrec_eval): nDCG@10
(Jarvelin & Kekalainen 2002), Recall@100 and MRR@10, averaged over every query with at least one
relevant judgement (a query with nothing retrieved scores 0). Documents are embedded as "title text"
like BEIR. BEIR folders are read, checked and subsampled by `saejax.data.beir.load_beir`.

The pieces (`eval_sparse`, `eval_bm25`, `eval_dense`, `evaluate`) are public for the full
evaluation harness (`saejax.eval.harness`); `run` prints an aligned table and writes
``workdir/eval.json``.
"""

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import ir_measures
import jax
import ml_collections
import numpy as np
import scipy.sparse as sp
from flax import nnx
from ir_measures import RR, R, nDCG
from jaxtyping import Float, Int
from tokenizers import Tokenizer

from saejax import paths
from saejax.data.beir import BeirData, Qrels, load_beir
from saejax.errors import ConfigError
from saejax.hub import convert, trained
from saejax.retrieval.encode import EncodeConfig, encode_dense, encode_sparse
from saejax.retrieval.index import IDF_POWER, SparseIndex, check_idf_power
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder

Baseline = Literal["bm25", "dense", "random"]
RUN_DEPTH = 100  # documents ranked per query: Recall@100 needs the full 100
MEASURES = {"ndcg@10": nDCG @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}
# Scores held at once, as a dense [queries, docs] block: 2^24 float32 = 64 MiB.
_SCORE_BLOCK = 1 << 24

Run = dict[str, dict[str, float]]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate and how.

  Attributes:
    beir_dir: BEIR folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv.
    split: qrels split.
    max_docs: subsample the corpus to this many documents (0 = all); see
      `saejax.data.beir.load_beir`.
    baselines: systems to run beside the trained model.
    k_query: active latents per query (0 = the model's training k).
    k_doc: active latents per document (0 = the model's training k).
    max_query_len: query token budget (training's `data.max_query_len` by default).
    max_doc_len: document token budget (training's `data.max_doc_len` by default).
    batch_size: texts per forward pass.
    seed: seed of the subsample.
    idf_power: the sparse systems' idf weighting (`saejax.retrieval.index`; 0: plain cosine).
    progress: show progress bars.
  """
  beir_dir: str
  split: str = "test"
  max_docs: int = 0
  baselines: tuple[Baseline, ...] = ("bm25", "dense", "random")
  k_query: int = 0
  k_doc: int = 0
  max_query_len: int = 64
  max_doc_len: int = 256
  batch_size: int = 64
  seed: int = 0
  idf_power: float = IDF_POWER
  progress: bool = True

  def __post_init__(self):
    unknown = [b for b in self.baselines if b not in get_args(Baseline)]
    if unknown:
      raise ConfigError(f"eval.baselines has unknown entries {unknown}; choose from "
                        f"{get_args(Baseline)}")
    for name in ("max_docs", "k_query", "k_doc"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ConfigError(f"eval.{name}={getattr(self, name)!r} must be an int >= 0")
    check_idf_power(self.idf_power)  # here, not after the corpus is encoded

  def encode_config(self, max_len: int) -> EncodeConfig:
    return EncodeConfig(max_len=max_len, batch_size=self.batch_size, progress=self.progress)


# ---------------------------------------------------------------------------------------------
# Scoring

def _top(scores: Float[np.ndarray, "Q N"], depth: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row, the ``depth`` highest scores and their columns, best first, ties by lower column
  (the index's rule, `saejax.retrieval.index`). A partition keeps arbitrary columns of those tied
  with the depth-th score (duplicate documents tie exactly): rows where such a tie straddles the
  cut take the lowest of them instead."""
  depth = min(depth, scores.shape[1])
  if depth == 0:
    return np.zeros((len(scores), 0), np.int64), np.zeros((len(scores), 0), scores.dtype)
  cols = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
  top = np.take_along_axis(scores, cols, 1)
  kth = top.min(axis=1, keepdims=True)
  straddle = np.flatnonzero((scores == kth).sum(1) > (top == kth).sum(1))
  if straddle.size:  # few rows: the exact rule over their whole rows
    rows, cut = scores[straddle], kth[straddle]
    above, tied = rows > cut, rows == cut
    keep = above | (tied & (np.cumsum(tied, axis=1) <= depth - above.sum(1, keepdims=True)))
    cols[straddle] = np.nonzero(keep)[1].reshape(len(straddle), depth)
    top[straddle] = np.take_along_axis(rows, cols[straddle], 1)
  order = np.lexsort((cols, -top), axis=1)  # score descending, then column ascending
  return np.take_along_axis(cols, order, 1), np.take_along_axis(top, order, 1)


def _search(score_block, num_queries: int, num_docs: int,
            depth: int) -> tuple[Int[np.ndarray, "Q R"], Float[np.ndarray, "Q R"]]:
  rows = max(1, _SCORE_BLOCK // max(num_docs, 1))
  tops = [_top(score_block(s, min(s + rows, num_queries)), depth)
          for s in range(0, num_queries, rows)]
  return np.concatenate([t[0] for t in tops]), np.concatenate([t[1] for t in tops])


def search_sparse(q: sp.csr_matrix, d: sp.csr_matrix, depth: int = RUN_DEPTH
                  ) -> tuple[Int[np.ndarray, "Q R"], Float[np.ndarray, "Q R"]]:
  """Exact top-``depth`` documents per query by sparse dot product; -inf where nothing overlaps."""
  if q.shape[1] != d.shape[1]:
    raise ConfigError(f"query codes have {q.shape[1]} latents, document codes {d.shape[1]}")
  dt = d.T.tocsc()

  def block(start, stop):
    scores = (q[start:stop] @ dt).toarray()
    scores[scores <= 0] = -np.inf  # no shared active latent: not retrieved
    return scores

  return _search(block, q.shape[0], d.shape[0], depth)


def search_dense(q: Float[np.ndarray, "Q D"], d: Float[np.ndarray, "N D"], depth: int = RUN_DEPTH
                 ) -> tuple[Int[np.ndarray, "Q R"], Float[np.ndarray, "Q R"]]:
  """Exact top-``depth`` documents per query by cosine similarity."""
  if q.shape[1] != d.shape[1]:
    raise ConfigError(f"query vectors {q.shape} and document vectors {d.shape} differ in width")
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
  return _search(lambda start, stop: q[start:stop] @ d.T, q.shape[0], d.shape[0], depth)


def to_run(data: BeirData, docs: Int[np.ndarray, "Q R"], scores: Float[np.ndarray, "Q R"]) -> Run:
  """An ir_measures run {query id: {doc id: score}}; non-finite scores (not retrieved) left out."""
  return {q: {data.doc_ids[d]: float(s) for d, s in zip(row_docs, row_scores) if np.isfinite(s)}
          for q, row_docs, row_scores in zip(data.query_ids, docs, scores)}


def evaluate(qrels: Qrels, run: Run) -> dict[str, float]:
  """nDCG@10, Recall@100 and MRR@10, averaged over all queries of ``qrels`` (unranked ones: 0)."""
  values = ir_measures.calc_aggregate(list(MEASURES.values()), qrels, run)
  return {name: float(values[measure]) for name, measure in MEASURES.items()}


# ---------------------------------------------------------------------------------------------
# Systems

def eval_sparse(model: Embedder, tokenizer: Tokenizer, data: BeirData,
                cfg: EvalConfig) -> dict[str, float]:
  """Metrics of the model's sparse codes, with mean active latents and truncation counts."""
  start = time.time()
  k_q, k_d = cfg.k_query or model.sae.config.k, cfg.k_doc or model.sae.config.k
  q = encode_sparse(model, tokenizer, data.queries, k_q, cfg.encode_config(cfg.max_query_len),
                    desc="saejax queries")
  d = encode_sparse(model, tokenizer, data.docs, k_d, cfg.encode_config(cfg.max_doc_len),
                    desc="saejax docs")
  index = SparseIndex.build(d.values, d.indices, model.sae.config.num_latents,
                            idf_power=cfg.idf_power)
  scores, docs = index.search(q.values, q.indices, RUN_DEPTH)
  metrics = evaluate(data.qrels, to_run(data, docs, scores))
  return {**metrics, "k_query": k_q, "k_doc": k_d,
          "active_dims_query": float((q.values != 0).sum(1).mean()) if len(q.values) else 0.0,
          "active_dims_doc": float((d.values != 0).sum(1).mean()) if len(d.values) else 0.0,
          "truncated_queries": q.stats.num_truncated, "truncated_docs": d.stats.num_truncated,
          "seconds": time.time() - start}


def bm25_index(docs: Sequence[str]):
  """A bm25s index of ``docs`` (see the module docstring for the settings)."""
  import bm25s  # pylint: disable=import-outside-toplevel  (only this baseline needs it)
  logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s logs at DEBUG on import
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize(list(docs), stopwords="en", show_progress=False),
                  show_progress=False)
  return retriever


def bm25_retrieve(retriever, queries: Sequence[str], num_docs: int, depth: int = RUN_DEPTH
                  ) -> tuple[Int[np.ndarray, "Q R"], Float[np.ndarray, "Q R"]]:
  """Top-``depth`` rows of a `bm25_index` of ``num_docs`` documents per query; -inf: no hit."""
  import bm25s  # pylint: disable=import-outside-toplevel
  query_tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
  # numpy top-k, not bm25s' "auto" (which picks JAX): deterministic and leaves devices alone.
  ranked, scores = retriever.retrieve(query_tokens, k=min(depth, num_docs), show_progress=False,
                                      backend_selection="numpy", n_threads=0)
  return np.asarray(ranked), np.where(scores > 0, scores, -np.inf)  # no shared word: not retrieved


def bm25_search(docs: Sequence[str], queries: Sequence[str],
                depth: int = RUN_DEPTH) -> tuple[Int[np.ndarray, "Q R"], Float[np.ndarray, "Q R"]]:
  """Top-``depth`` documents per query by BM25 (see the module docstring for the settings)."""
  return bm25_retrieve(bm25_index(docs), queries, len(docs), depth)


def eval_bm25(data: BeirData) -> dict[str, float]:
  """Metrics of the BM25 baseline."""
  start = time.time()
  metrics = evaluate(data.qrels, to_run(data, *bm25_search(data.docs, data.queries)))
  return {**metrics, "seconds": time.time() - start}


def eval_dense(encoder: nnx.Module, tokenizer: Tokenizer, data: BeirData,
               cfg: EvalConfig) -> dict[str, float]:
  """Metrics of mean-pooled cosine retrieval with ``encoder`` (the untouched-encoder baseline)."""
  start = time.time()
  q = encode_dense(encoder, tokenizer, data.queries, cfg.encode_config(cfg.max_query_len),
                   desc="dense queries")
  d = encode_dense(encoder, tokenizer, data.docs, cfg.encode_config(cfg.max_doc_len),
                   desc="dense docs")
  metrics = evaluate(data.qrels, to_run(data, *search_dense(q.v, d.v)))
  return {**metrics, "truncated_queries": q.stats.num_truncated,
          "truncated_docs": d.stats.num_truncated, "seconds": time.time() - start}


# ---------------------------------------------------------------------------------------------
# After training

def eval_config(config: ml_collections.ConfigDict) -> EvalConfig:
  """The typed `EvalConfig` of a training config's ``eval`` section.

  Token budgets default to the training data's (``data.max_query_len`` / ``data.max_doc_len``).
  """
  section = {k: v for k, v in config.eval.to_dict().items() if k != "enabled"}
  known = {f.name for f in dataclasses.fields(EvalConfig)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise ConfigError(f"config.eval has unknown keys {unknown}; EvalConfig takes {sorted(known)}")
  data = config.get("data") or {}
  for key in ("max_query_len", "max_doc_len"):
    if key not in section and key in data:
      section[key] = data[key]
  section["baselines"] = tuple(section.get("baselines", ()))
  return EvalConfig(**section)


MEANING = ("nDCG@10: 1 = every query's relevant documents ranked first, BM25 = the lexical "
           "baseline, dense = the untouched encoder (the quality a sparse code tries to keep), "
           "random = the same encoder with an untrained random TopK head (the floor).")
# Where a longer run's numbers are kept: a pointer, not numbers that would go stale here
# (tests/test_quickeval.py checks the section exists).
LONGER_RUN = ("A longer run: benchmarks/RESULTS.md \"Quality\" has what the quality recipe "
              "(configs/quality.py: S = 16,384, more steps and data) reaches against the same "
              "baselines on SciFact, Cranfield and Debian; a few CPU minutes of training sit "
              "below it.")


def truncation_line(result: dict) -> str:
  """How many texts lost tokens to the budgets ("" when no system tokenised)."""
  m = next((m for m in result["systems"].values() if "truncated_docs" in m), None)
  if m is None:
    return ""
  return (f"token budget: {m['truncated_docs']:,} of {result['num_docs']:,} documents cut at "
          f"{result['max_doc_len']} tokens, {m['truncated_queries']:,} of "
          f"{result['num_queries']:,} queries at {result['max_query_len']} (training's budgets "
          "unless config.eval sets others; every encoder reads the same tokens, BM25 whole texts)")


def format_table(result: dict) -> str:
  """An aligned text table of `run`'s result, with its truncation counts."""
  lines = [f"retrieval on {result['beir_dir']} [{result['split']}]: {result['num_queries']:,} "
           f"queries x {result['num_docs']:,} documents",
           f"{'system':<8} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8} {'dims q/d':>12} {'time':>8}"]
  for name, m in result["systems"].items():
    dims = (f"{m['active_dims_query']:.1f}/{m['active_dims_doc']:.1f}"
            if "active_dims_query" in m else "-")
    lines.append(f"{name:<8} {m['ndcg@10']:>8.4f} {m['recall@100']:>8.4f} {m['mrr@10']:>8.4f} "
                 f"{dims:>12} {m['seconds']:>7.1f}s")
  truncation = truncation_line(result)
  return "\n".join(lines + ([truncation] if truncation else []))


def run(config: ml_collections.ConfigDict, model: Embedder, workdir: str | Path) -> dict:
  """Evaluate a trained model and the configured baselines; print a table, write eval.json.

  Args:
    config: the training config; reads ``eval``, ``model`` (tokenizer, init_from, dtype,
      attention_backend) and ``data`` (token budgets).
    model: the trained encoder + SAE.
    workdir: where ``eval.json`` is written.

  Returns:
    {"beir_dir", "split", "num_queries", "num_docs", "max_query_len", "max_doc_len",
    "systems": {name: metrics}}.
  """
  cfg = eval_config(config)
  if jax.process_count() > 1:
    raise ConfigError("quickeval runs in a single process; set config.eval.enabled=False for "
                      "multi-process runs and evaluate the saved checkpoint afterwards")
  init_from = config.model.get("init_from")
  if {"dense", "random"} & set(cfg.baselines) and not init_from:
    raise ConfigError(f"config.eval.baselines has {sorted(cfg.baselines)} but config.model.init_from "
                      "is empty: there is no untouched encoder to compare with")
  tokenizer = trained.tokenizer_for(config, model.encoder.cfg.vocab_size)
  data = load_beir(cfg.beir_dir, cfg.split, max_docs=cfg.max_docs, seed=cfg.seed)
  systems = {"saejax": eval_sparse(model, tokenizer, data, cfg)}
  if "bm25" in cfg.baselines:
    systems["bm25"] = eval_bm25(data)
  if {"dense", "random"} & set(cfg.baselines):
    overrides = {"dtype": config.model.get("dtype") or "float32"}
    if config.model.get("attention_backend"):
      overrides["attention_backend"] = config.model.attention_backend
    _, encoder = convert.load_hf(init_from, head=False, **overrides)
    if "dense" in cfg.baselines:
      systems["dense"] = eval_dense(encoder, tokenizer, data, cfg)
    if "random" in cfg.baselines:  # the floor: the untouched encoder + an untrained SAE
      untrained = sae_lib.SAE(dataclasses.replace(model.sae.config), rngs=nnx.Rngs(0))
      systems["random"] = eval_sparse(Embedder(encoder, untrained), tokenizer, data, cfg)
  result = {"beir_dir": str(cfg.beir_dir), "split": cfg.split, "num_queries": len(data.query_ids),
            "num_docs": len(data.doc_ids), "max_query_len": cfg.max_query_len,
            "max_doc_len": cfg.max_doc_len, "systems": systems}
  print(format_table(result), flush=True)
  print(MEANING, flush=True)
  print(LONGER_RUN, flush=True)
  workdir = paths.resolve(workdir)  # a local directory or a gs:// URL
  paths.makedirs(workdir)
  (workdir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
  return result
