"""The evaluation harness: saejax models and their baselines on BEIR-format folders, one table.

    from saejax.eval import harness
    systems = [harness.load_system("runs/quickstart"), harness.BM25System(),
               harness.dense_system(minilm_dir())]
    results = harness.evaluate(systems, [harness.BeirSpec.parse("../shared/data/scifact:test")],
                               harness.HarnessConfig())

Systems (each ranks the top `HarnessConfig.depth` documents of every query, exactly):
  * `SparseSystem`: a saejax `Embedder` with its TopK SAE (a training run's workdir, or a
    sentence-transformers SparseEncoder directory through `saejax.hub.export.load_sparse_encoder`).
    Documents go into `saejax.retrieval.index.SparseIndex` (the exact inverted index) and are scored
    by the idf-weighted cosine of the sparse embeddings (`HarnessConfig.idf_power`; 0: the plain
    cosine of the unit-norm codes, the similarity the model is trained with). `random_topk_system` is the floor: the untouched encoder with an untrained SAE.
  * `DenseSystem`: mean-pooled encoder output, cosine similarity (`quickeval.search_dense`): the
    untouched encoder a model was initialised from (`dense_system(HF_DIR)`), or a run trained
    without SAE (the dense ablation, ``sae.enabled=False``; its loss is InfoNCE on cosine).
  * `BM25System`: Okapi BM25 with bm25s (`quickeval.bm25_index`; settings in its docstring).

What is reported per dataset and system (`SparseSystem.evaluate` and friends):
  * nDCG@10, Recall@100, MRR@10 from ir-measures (`quickeval.evaluate`).
  * active dimensions: mean count of non-zero latents per query and per document (TopK's ReLU
    can leave fewer than k); the width D for dense systems.
  * expected FLOPs per query, from the real posting lists: for each query, the sum over its
    active latents of the number of documents holding that latent (the multiply-adds an inverted
    index does), averaged over queries; the same divided by the number of documents
    (``flops_per_doc``: 0.3 means a query touches 0.3 postings per document on average). For a
    dense system a query costs N x D, so ``flops_per_doc`` = D. This is SPLADE's FLOPS measure
    (Paria et al., ICLR 2020, "Minimizing FLOPs to Learn Efficient Sparse Representations";
    Formal et al., SIGIR 2021) with the empirical query distribution instead of its expectation.
  * dead and hot latents over the corpus: dead fires in no document; hot fires in more than
    `HOT_FREQUENCY` = 1/10 of the documents. Why 1/10: Gao et al. 2024 ("Scaling and evaluating
    sparse autoencoders", sec. 2.4) call latents above a 10% firing rate dense, and it is where
    `saejax.retrieval.index` switches a latent to a dense column: a hot latent is one that makes
    every query that uses it touch a tenth of the corpus.
  * a histogram of latent document frequencies on log-spaced bins (for the report's plot).
  * quality vs k: the same model at several k (queries and documents alike), above its training k
    too (a TopK code can be read at any k). TopK values come back sorted (``jax.lax.top_k``), so
    the code at k' < k is the first k' columns of the code at k, renormalised when the model's
    codes are unit-norm: one encoding pass serves every k' (tests/test_eval.py checks this equals
    re-encoding with k = k').
  * time: encoding (queries, documents; jit compilation included, once per bucket shape),
    indexing and search (the index's numba kernels are warmed up on one query first), queries/s.
    Systems on one encoder module and datasets with the same texts share one encoding
    (`EncodingCache`); each reports its time.

Token budgets: every system reads the same `HarnessConfig.max_query_len` / ``max_doc_len``
(capped at each encoder's position table, `token_budgets`), so a table compares like with like.
`load_system` records the budgets a model was trained with (`SparseSystem.trained_lens`); the
CLI makes them the default (see `saejax.eval.__main__`).

Progress: `evaluate` reports each stage (dataset loaded, system started, system done with its
time and nDCG@10) on the ``saejax.eval`` logger at INFO; nothing shows unless a handler is
attached (the CLI attaches one to stderr unless ``--quiet``).

Bad input is the loader's (`saejax.data.beir.load_beir`: unknown ids in qrels and duplicate ids are
errors naming file and line; empty queries are skipped and counted in ``skipped_empty_queries``),
and the model loader's: a directory that is neither a run nor an export, a checkpoint of another
architecture or an unreadable one each raise `CheckpointError`.
"""

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from etils import epath
from flax import nnx
from jaxtyping import Float, Int
from tokenizers import Tokenizer

from saejax import paths
from saejax.data.beir import BeirData, load_beir
from saejax.data.tokenizer import load_tokenizer
from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.eval import quickeval
from saejax.eval.quickeval import RUN_DEPTH
from saejax.hub import convert, trained
from saejax.retrieval.encode import (DenseEmbeddings, EncodeConfig, SparseCodes, codes_of,
                                     encode_dense)
from saejax.retrieval.index import IDF_POWER, SparseIndex, check_idf_power
from saejax.sae.embedder import Embedder
from saejax.sae.topk import SAE, SAEConfig

HOT_FREQUENCY = 0.1  # see the module docstring
SWEEP_STEPS = 4      # default quality-vs-k points: k, k/2, k/4, k/8
HISTOGRAM_BINS = 30  # log-spaced document-frequency bins of the latent histogram

log = logging.getLogger(__name__)  # stage lines; see the module docstring

Kind = Literal["sparse", "dense", "bm25"]


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
  """How every system is evaluated (the same budgets for all, so the table compares like with like).

  Attributes:
    k_query: active latents per query for sparse systems (0 = each model's own: its training k,
      or the query k an export was made with).
    k_doc: active latents per document (0 = each model's training k).
    k_sweep: k values of the quality-vs-k curve (() = 2k, k, k/2, k/4, k/8 of each model; values
      above the model's number of latents are left out).
    k_query_sweep: query k values searched against the documents as indexed (at ``k_doc``): what
      a denser query buys and costs at an unchanged index (values above S are left out).
    max_query_len: query token budget, special tokens included.
    max_doc_len: document token budget.
    batch_size: texts per forward pass.
    depth: documents ranked per query (Recall@100 needs 100).
    hot_frequency: a latent firing in more than this fraction of documents is hot.
    idf_power: sparse systems score the idf-weighted cosine of their codes with this power
      (`saejax.retrieval.index`; 0: the plain cosine they are trained with).
    progress: show progress bars while encoding.
  """
  k_query: int = 0
  k_doc: int = 0
  k_sweep: tuple[int, ...] = ()
  k_query_sweep: tuple[int, ...] = ()
  max_query_len: int = 64
  max_doc_len: int = 256
  batch_size: int = 64
  depth: int = RUN_DEPTH
  hot_frequency: float = HOT_FREQUENCY
  idf_power: float = IDF_POWER
  progress: bool = False

  def __post_init__(self):
    for name in ("k_query", "k_doc"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ConfigError(f"HarnessConfig.{name}={getattr(self, name)!r} must be an int >= 0")
    for name in ("k_sweep", "k_query_sweep"):
      if any(not isinstance(k, int) or k < 1 for k in getattr(self, name)):
        raise ConfigError(f"HarnessConfig.{name}={getattr(self, name)!r} must hold ints >= 1")
    if not isinstance(self.depth, int) or self.depth < 1:
      raise ConfigError(f"HarnessConfig.depth={self.depth!r} must be an int >= 1")
    if not 0 < self.hot_frequency <= 1:
      raise ConfigError(f"HarnessConfig.hot_frequency={self.hot_frequency!r} must lie in (0, 1]")
    check_idf_power(self.idf_power)  # here, not after the whole corpus is encoded
    self.encode_config(self.max_query_len)  # EncodeConfig checks lengths and batch size
    self.encode_config(self.max_doc_len)

  def encode_config(self, max_len: int) -> EncodeConfig:
    return EncodeConfig(max_len=max_len, batch_size=self.batch_size, progress=self.progress)


# ---------------------------------------------------------------------------------------------
# Datasets

@dataclasses.dataclass(frozen=True)
class BeirSpec:
  """One BEIR split to evaluate on.

  Attributes:
    name: the dataset's name in tables, plots and file names.
    path: the BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
    split: qrels split, or ``SPLIT~SEEN``: the queries of SPLIT whose relevant documents are not
      relevant in SEEN (unseen by a model trained on SEEN; `saejax.data.beir.load_beir`).
    max_docs: subsample the corpus to this many documents (0 = all; see
      `saejax.data.beir.load_beir`).
    seed: seed of the subsample.
  """
  name: str
  path: str
  split: str = "test"
  max_docs: int = 0
  seed: int = 0

  @classmethod
  def parse(cls, spec: str, *, max_docs: int = 0, seed: int = 0) -> "BeirSpec":
    """``[NAME=]FOLDER[:SPLIT]``; the default name is the folder's name (``parent/name`` for a
    folder called ``beir*``, e.g. debian-descriptions/beir-dev; ``scifact~train`` for the split
    ``test~train``), the default split ``test``."""
    name, rest = split_name(spec)
    split = "test"
    if ":" in rest and "/" not in rest.rsplit(":", 1)[1]:
      rest, split = rest.rsplit(":", 1)
    if not rest or not split:
      raise ConfigError(f"BEIR spec {spec!r}: expected [NAME=]FOLDER[:SPLIT]")
    folder = Path(rest)
    if name is None:
      name = folder.name
      if name.startswith("beir") and folder.parent.name:
        name = f"{folder.parent.name}/{name}"
      if "~" in split:
        name += "~" + split.partition("~")[2]
    return cls(name=name, path=str(folder), split=split, max_docs=max_docs, seed=seed)

  def load(self) -> BeirData:
    return load_beir(self.path, self.split, max_docs=self.max_docs, seed=self.seed)

  def check(self) -> None:
    """A DataError now if the folder or its qrels file is missing (`load` would say it later)."""
    if not Path(self.path).is_dir():
      raise DataError(f"BEIR folder {self.path} does not exist")
    for split in self.split.split("~"):
      qrels = Path(self.path) / "qrels" / f"{split}.tsv"
      if not qrels.is_file():
        raise DataError(f"BEIR qrels file {qrels} does not exist")


def split_name(spec: str) -> tuple[str | None, str]:
  """``NAME=REST`` -> (NAME, REST); REST alone -> (None, REST). A '=' inside a path is kept."""
  head, sep, rest = spec.partition("=")
  return (head, rest) if sep and head and "/" not in head else (None, spec)


def file_stem(name: str) -> str:
  """A name made safe for a file name (dataset and system names may hold '/')."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


# ---------------------------------------------------------------------------------------------
# Measures

def default_sweep(k: int, steps: int = SWEEP_STEPS) -> tuple[int, ...]:
  """k/8 .. 2k: k, k/2, k/4, ... (``steps`` values >= 1) and 2k, ascending. A TopK code can be
  read at any k (the pre-activations are all there), so k above the training k is a real point."""
  return tuple(sorted({max(1, k >> i) for i in range(steps)} | {2 * k}))


def posting_lengths(index: SparseIndex) -> Int[np.ndarray, "S"]:
  """Documents holding each latent (its posting list's length, zeros not stored)."""
  return np.diff(index.offsets)


def expected_flops(q_values: Float[np.ndarray, "Q R"], q_indices: Int[np.ndarray, "Q R"],
                   lengths: Int[np.ndarray, "S"]) -> float:
  """Mean over queries of the summed posting lengths of the query's active (non-zero) latents."""
  if q_values.shape[0] == 0:
    return 0.0
  return float(np.where(q_values != 0, lengths[q_indices], 0).sum(axis=1).mean())


def frequency_histogram(lengths: Int[np.ndarray, "S"], num_docs: int,
                        bins: int = HISTOGRAM_BINS) -> dict:
  """Latent document frequencies (fraction of documents) counted in log-spaced bins.

  The bins span [1 / num_docs, 1]; dead latents (frequency 0) have no place on a log axis and are
  counted on their own in ``dead``.
  """
  freq = lengths[lengths > 0] / max(num_docs, 1)
  edges = np.logspace(math.log10(1 / max(num_docs, 1)), 0, bins + 1)
  edges[0], edges[-1] = edges[0] * (1 - 1e-9), 1.0  # the ends hold exactly 1/N and 1
  counts, _ = np.histogram(freq, edges)
  return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": int((lengths == 0).sum())}


def token_budgets(cfg: HarnessConfig, encoder: nnx.Module) -> tuple[int, int]:
  """(query, document) token budgets, capped at the encoder's position table (a model trained
  with 128 positions cannot read 256 tokens; its texts are truncated, and counted, instead)."""
  limit = getattr(getattr(encoder, "cfg", None), "max_position_embeddings", None) or 1 << 30
  return min(cfg.max_query_len, limit), min(cfg.max_doc_len, limit)


def _unit_rows(x: Float[np.ndarray, "N K"]) -> Float[np.ndarray, "N K"]:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _code_stats(values: Float[np.ndarray, "N K"]) -> float:
  return float((values != 0).sum(axis=1).mean()) if values.shape[0] else 0.0


def _retrieval(data: BeirData, docs: Int[np.ndarray, "Q R"],
               scores: Float[np.ndarray, "Q R"]) -> dict[str, float]:
  return quickeval.evaluate(data.qrels, quickeval.to_run(data, docs, scores))


class EncodingCache:
  """Pooled embeddings v, computed once per encoder, token budget and list of texts.

  `evaluate` hands one to every system: systems built on one encoder module (a sparse model and
  its encoder read densely, `encoder_system`; the untouched encoder and the random TopK floor on
  it, `random_topk_system`) run it once per text, and a later dataset searching the same corpus
  (SciFact's unseen claims search SciFact's) reuses its documents. A system's codes are its SAE
  applied to the cached v (`saejax.retrieval.encode.codes_of`: what `encode_sparse` computes in
  one pass). Each system reports the encoding's time as measured when it ran (what the system
  costs alone) plus its own SAE time. `keep` drops what is no longer read, so the cache holds
  one dataset's embeddings (N x D float32 per encoder) and any corpus a later dataset searches.
  """

  def __init__(self):
    self._entries: dict[tuple, tuple[nnx.Module, DenseEmbeddings, float]] = {}

  def dense(self, encoder: nnx.Module, tokenizer: Tokenizer, texts: Sequence[str],
            config: EncodeConfig, desc: str) -> tuple[DenseEmbeddings, float]:
    """(`encode_dense` of ``texts``, the seconds it took when it ran)."""
    key = (id(encoder), id(tokenizer), dataclasses.replace(config, progress=False), tuple(texts))
    if key not in self._entries:
      start = time.perf_counter()
      embeddings = encode_dense(encoder, tokenizer, texts, config, desc=desc)
      # The module is held beside its id, so the id is not reused while the entry lives.
      self._entries[key] = (encoder, embeddings, time.perf_counter() - start)
    _, embeddings, seconds = self._entries[key]
    return embeddings, seconds

  def keep(self, *text_lists: Sequence[str]) -> None:
    """Drop every entry whose texts are none of ``text_lists``."""
    wanted = {tuple(texts) for texts in text_lists}
    self._entries = {key: entry for key, entry in self._entries.items() if key[3] in wanted}


# ---------------------------------------------------------------------------------------------
# Systems

@dataclasses.dataclass
class SparseSystem:
  """A saejax model with its TopK SAE, searched with the exact sparse index.

  Attributes:
    name: the system's name in tables.
    model: encoder + SAE.
    tokenizer: its tokenizer.
    source: where it was loaded from.
    init_from: the untouched encoder it started from (a training run's ``model.init_from``).
    trained_lens: (query, document) token budgets it was trained with; None if unknown.
    query_k: latents per query when the model asks for denser queries than documents (an
      export with ``--query-k``); 0: the training k. `HarnessConfig.k_query` overrides it.
  """
  name: str
  model: Embedder
  tokenizer: Tokenizer
  source: str = ""
  init_from: str = ""
  trained_lens: tuple[int, int] | None = None
  query_k: int = 0
  kind: ClassVar[Kind] = "sparse"

  def __post_init__(self):
    if self.model.sae is None:
      raise ConfigError(f"system {self.name!r}: the model has no SAE; wrap it in DenseSystem")

  @property
  def k(self) -> int:
    return self.model.sae.config.k

  def evaluate(self, data: BeirData, cfg: HarnessConfig,
               cache: EncodingCache | None = None) -> dict:
    """Metrics, sparsity, FLOPs, latent health, quality vs k and times on one dataset."""
    s = self.model.sae.config.num_latents
    k_q, k_d = cfg.k_query or self.query_k or self.k, cfg.k_doc or self.k
    sweep = [k for k in (cfg.k_sweep or default_sweep(self.k)) if k <= s]
    query_sweep = [k for k in cfg.k_query_sweep if k <= s]
    len_q, len_d = token_budgets(cfg, self.model.encoder)
    cache = cache or EncodingCache()
    q, encode_q = self._codes(cache, data.queries, max([k_q, *sweep, *query_sweep]),
                              cfg.encode_config(len_q), "queries")
    d, encode_d = self._codes(cache, data.docs, max([k_d, *sweep]), cfg.encode_config(len_d),
                              "docs")

    unit = self.model.sae.config.normalize_codes
    doc_index = _doc_index(d.values, d.indices, k_d, s, unit, cfg.idf_power)  # shared by the
    # query-k sweep
    main = _sparse_retrieval(data, q.values, q.indices, d.values, d.indices, k_q, k_d, s, cfg,
                             unit, doc_index)
    lengths = main.pop("_lengths")
    n = len(data.doc_ids)
    result = {
        "kind": self.kind, "k_train": self.k, "k_query": k_q, "k_doc": k_d, "num_latents": s,
        "idf_power": cfg.idf_power,
        **main,
        "dead_fraction": float((lengths == 0).mean()),
        "hot_fraction": float((lengths > cfg.hot_frequency * n).mean()),
        "latent_frequency": frequency_histogram(lengths, n),
        "encode_queries_s": encode_q, "encode_docs_s": encode_d,
        "max_query_len": len_q, "max_doc_len": len_d,
        "truncated_queries": q.stats.num_truncated, "truncated_docs": d.stats.num_truncated,
    }
    sweep_rows = []
    for k in sweep:
      if k == k_q == k_d:
        row = {key: main[key] for key in ("ndcg@10", "recall@100", "mrr@10", "active_dims_query",
                                          "active_dims_doc", "flops_per_query", "flops_per_doc")}
      else:
        row = _sparse_retrieval(data, q.values, q.indices, d.values, d.indices, k, k, s, cfg,
                                unit)
        row.pop("_lengths")
        for key in ("index_s", "search_s", "queries_per_s"):
          row.pop(key)
      sweep_rows.append({"k": k, **row})
    result["k_sweep"] = sweep_rows
    query_rows = []
    for k in query_sweep:  # documents at k_d every time: only the queries change, so their search
      # time is the cost of the query k and is kept
      row = _sparse_retrieval(data, q.values, q.indices, d.values, d.indices, k, k_d, s, cfg, unit,
                              doc_index)
      row.pop("_lengths")
      row.pop("index_s")
      query_rows.append({"k_query": k, "k_doc": k_d, **row})
    result["k_query_sweep"] = query_rows
    return result

  def _codes(self, cache: EncodingCache, texts: Sequence[str], k: int, config: EncodeConfig,
             what: str) -> tuple[SparseCodes, float]:
    """(the codes of ``texts`` at ``k``, seconds: the encoder's, as measured, and the SAE's)."""
    v, encode_s = cache.dense(self.model.encoder, self.tokenizer, texts, config,
                              f"{self.name} {what}")
    start = time.perf_counter()
    values, indices = codes_of(self.model.sae, v.v, k)
    return SparseCodes(values, indices, v.stats), encode_s + time.perf_counter() - start


def _doc_index(d_values, d_indices, k_d: int, num_latents: int, unit: bool,
               idf_power: float) -> tuple[SparseIndex, np.ndarray, float]:
  """(the index of the documents' first ``k_d`` code columns, their values as given to it,
  build s)."""
  dv, di = d_values[:, :k_d], d_indices[:, :k_d]
  if unit:
    dv = _unit_rows(dv)
  start = time.perf_counter()
  index = SparseIndex.build(dv, di, num_latents, idf_power=idf_power)
  return index, dv, time.perf_counter() - start


def _sparse_retrieval(data: BeirData, q_values, q_indices, d_values, d_indices, k_q: int, k_d: int,
                      num_latents: int, cfg: HarnessConfig, unit: bool,
                      doc_index: tuple[SparseIndex, np.ndarray, float] | None = None) -> dict:
  """Index the documents' first ``k_d`` code columns, search with the queries' first ``k_q``.

  With ``unit`` (the model's `SAEConfig.normalize_codes`) each truncated code is renormalised:
  the first k' values of a unit code at k are not a unit code, and a document's norm changes its
  rank. ``doc_index``: `_doc_index` of the same documents at the same ``k_d``, built once for
  several query k.
  """
  qv, qi = q_values[:, :k_q], q_indices[:, :k_q]
  if unit:
    qv = _unit_rows(qv)
  index, dv, index_s = doc_index or _doc_index(d_values, d_indices, k_d, num_latents, unit,
                                               cfg.idf_power)
  index.search(qv[:1], qi[:1], cfg.depth)  # loads the compiled kernels: not search time
  start = time.perf_counter()
  scores, rows = index.search(qv, qi, cfg.depth)
  search_s = time.perf_counter() - start
  lengths = posting_lengths(index)
  flops = expected_flops(qv, qi, lengths)
  return {**_retrieval(data, rows, scores),
          "active_dims_query": _code_stats(qv), "active_dims_doc": _code_stats(dv),
          "flops_per_query": flops, "flops_per_doc": flops / max(len(data.doc_ids), 1),
          "index_s": index_s, "search_s": search_s,
          "queries_per_s": len(data.query_ids) / max(search_s, 1e-9), "_lengths": lengths}


@dataclasses.dataclass
class DenseSystem:
  """Mean-pooled encoder output, cosine similarity, exact search.

  Attributes:
    name: the system's name in tables.
    encoder: any module called as ``encoder(ids, valid) -> [B, T, D]``.
    tokenizer: its tokenizer.
    source: where it was loaded from.
    trained_lens: (query, document) token budgets it was trained with; None if unknown.
  """
  name: str
  encoder: nnx.Module
  tokenizer: Tokenizer
  source: str = ""
  trained_lens: tuple[int, int] | None = None
  kind: ClassVar[Kind] = "dense"

  def evaluate(self, data: BeirData, cfg: HarnessConfig,
               cache: EncodingCache | None = None) -> dict:
    """Metrics, width, FLOPs and times on one dataset."""
    len_q, len_d = token_budgets(cfg, self.encoder)
    cache = cache or EncodingCache()
    q, encode_q = cache.dense(self.encoder, self.tokenizer, data.queries, cfg.encode_config(len_q),
                              f"{self.name} queries")
    d, encode_d = cache.dense(self.encoder, self.tokenizer, data.docs, cfg.encode_config(len_d),
                              f"{self.name} docs")
    start = time.perf_counter()
    rows, scores = quickeval.search_dense(q.v, d.v, cfg.depth)
    search_s = time.perf_counter() - start
    width = int(d.v.shape[1])
    n = len(data.doc_ids)
    return {"kind": self.kind, **_retrieval(data, rows, scores),
            "active_dims_query": float(width), "active_dims_doc": float(width),
            "flops_per_query": float(n * width), "flops_per_doc": float(width),
            "encode_queries_s": encode_q, "encode_docs_s": encode_d, "index_s": 0.0,
            "search_s": search_s, "queries_per_s": len(data.query_ids) / max(search_s, 1e-9),
            "max_query_len": len_q, "max_doc_len": len_d,
            "truncated_queries": q.stats.num_truncated, "truncated_docs": d.stats.num_truncated}


@dataclasses.dataclass
class BM25System:
  """Okapi BM25 (bm25s); its index build counts as encoding the documents."""
  name: str = "bm25"
  source: str = "bm25s"
  kind: ClassVar[Kind] = "bm25"

  def evaluate(self, data: BeirData, cfg: HarnessConfig,
               cache: EncodingCache | None = None) -> dict:
    """Metrics and times on one dataset (``cache``: unused, BM25 encodes nothing)."""
    del cache
    start = time.perf_counter()
    retriever = quickeval.bm25_index(data.docs)
    index_s = time.perf_counter() - start
    start = time.perf_counter()
    rows, scores = quickeval.bm25_retrieve(retriever, data.queries, len(data.docs), cfg.depth)
    search_s = time.perf_counter() - start
    return {"kind": self.kind, **_retrieval(data, rows, scores), "encode_queries_s": 0.0,
            "encode_docs_s": 0.0, "index_s": index_s, "search_s": search_s,
            "queries_per_s": len(data.query_ids) / max(search_s, 1e-9)}


System = SparseSystem | DenseSystem | BM25System


# ---------------------------------------------------------------------------------------------
# Loading

def load_system(path: str | Path, name: str | None = None) -> SparseSystem | DenseSystem:
  """A trained model as a system: a run's workdir, or an exported SparseEncoder directory.

  Args:
    path: a ``python -m saejax.train`` workdir (config.json + checkpoints/; the newest
      checkpoint; local or gs://), or a local sentence-transformers SparseEncoder directory
      (modules.json), read with `saejax.hub.export.load_sparse_encoder`.
    name: the system's name (default: the directory's name).

  Returns:
    A `SparseSystem`, or a `DenseSystem` for a run trained without SAE (the dense ablation), with
    its trained token budgets: a run's ``data.max_query_len`` / ``data.max_doc_len``, an export's
    ``max_seq_length`` for both (sentence-transformers reads every text at that length).

  Raises:
    CheckpointError: a directory that is neither, a checkpoint that does not fit its config
      (another architecture) or cannot be read.
  """
  path = _model_path(path)
  name = name or path.absolute().name
  if model_kind(path) == "export":
    try:
      from saejax.hub import export  # pylint: disable=import-outside-toplevel  (pulls in safetensors)
    except ImportError as e:
      raise ConfigError(f"{path} is an exported directory (modules.json), but saejax.hub.export "
                        f"cannot be imported: {e}") from e
    model, tokenizer, info = export.load_sparse_encoder(path)
    length = int(info["max_seq_length"])
    return SparseSystem(name, model, tokenizer, source=str(path), trained_lens=(length, length),
                        query_k=info["query_k"])
  config = trained.read_config(path)
  if "model" not in config or "sae" not in config:
    raise CheckpointError(f"{path / 'config.json'} is not a saejax training config (it has no "
                          f"'model' and 'sae' sections); is this a Hugging Face directory?")
  config, model, tokenizer = trained.load_run(path)  # CheckpointError: another model, bad bytes
  lens = trained.trained_lens(config)
  if model.sae is None:
    return DenseSystem(name, model.encoder, tokenizer, source=str(path), trained_lens=lens)
  return SparseSystem(name, model, tokenizer, source=str(path),
                      init_from=str(config.model.get("init_from") or ""), trained_lens=lens)


def encoder_system(model: str | Path | SparseSystem, name: str | None = None) -> DenseSystem:
  """A sparse model's own encoder as a dense model: the cosine of the pooled v its SAE codes.

  Beside the sparse model it splits what a trained model loses against a dense one into what the
  encoder lost and what the k-latent code loses on top. ``model``: a run or an export (as
  `load_system`), or the sparse system already loaded, whose encoder module it then shares (so
  `evaluate` encodes each text once for both).
  """
  system = model if isinstance(model, SparseSystem) else load_system(model, name)
  if isinstance(system, DenseSystem):
    raise ConfigError(f"{model} has no SAE: it is a dense model already; pass it as --model")
  return DenseSystem(name or system.name, system.model.encoder, system.tokenizer,
                     source=f"the encoder of {system.source}", trained_lens=system.trained_lens)


def model_kind(path: str | Path) -> Literal["run", "export"]:
  """What a model directory is, from its files alone (cheap: the CLI checks every --model
  before loading any); a CheckpointError if it is neither a run nor an export."""
  path = _model_path(path)
  if paths.is_local(path) and (path / "modules.json").is_file():
    return "export"
  if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
    return "run"
  raise CheckpointError(f"{path} is neither a saejax training workdir (config.json and "
                        f"checkpoints/) nor an exported SparseEncoder directory (modules.json; "
                        f"read from a local directory)")


def _model_path(path: str | os.PathLike) -> Path | epath.Path:
  """A local model directory as a `Path`; a run in a bucket (gs://) as a checked epath."""
  return Path(path) if paths.is_local(path) else paths.resolve(path, "--model")


def random_sae(d_model: int, num_latents: int, k: int, seed: int = 0) -> SAE:
  """An SAE as initialised, never trained: random unit encoder rows, zero biases."""
  return SAE(SAEConfig(d_model=d_model, num_latents=num_latents, k=k,
                       k_aux=min(512, num_latents)), rngs=nnx.Rngs(seed))


def random_topk_system(hf_dir: str | Path | DenseSystem, k: int, num_latents: int = 16384,
                       seed: int = 0, name: str = "random-topk") -> SparseSystem:
  """The floor every trained model must clear: no training at all.

  The untouched encoder of ``hf_dir`` and an SAE straight from its initialisation: encoder rows
  are random Gaussian directions (unit-normalised), b_pre and b_lat are zero, so
  ``z = ReLU(TopK(G x, k))`` with unit-normalised codes (cosine), searched like a trained model.
  A trained model that does not beat this by a wide margin has learned nothing useful for search.
  ``hf_dir`` may be the untouched encoder's `dense_system`, whose encoder module the floor then
  shares (`evaluate` encodes each text once for both).
  """
  if isinstance(hf_dir, DenseSystem):
    encoder, tokenizer, where = hf_dir.encoder, hf_dir.tokenizer, hf_dir.source
    hidden = encoder.cfg.hidden_size
  else:
    cfg, encoder = convert.load_hf(hf_dir, head=False)
    tokenizer = load_tokenizer(convert.resolve(hf_dir), vocab_size=cfg.vocab_size)
    hidden, where = cfg.hidden_size, hf_dir
  sae = random_sae(hidden, num_latents, k, seed)
  return SparseSystem(name, Embedder(encoder, sae), tokenizer,
                      source=f"random TopK of {where} (S={num_latents}, seed {seed})")


def dense_system(hf_dir: str | Path, name: str = "dense") -> DenseSystem:
  """The untouched encoder of a Hugging Face directory (BERT family or ModernBERT), fp32."""
  cfg, encoder = convert.load_hf(hf_dir, head=False)
  tokenizer = load_tokenizer(convert.resolve(hf_dir), vocab_size=cfg.vocab_size)
  return DenseSystem(name, encoder, tokenizer, source=str(hf_dir))


# ---------------------------------------------------------------------------------------------
# Running

def evaluate_dataset(systems: Sequence[System], data: BeirData, cfg: HarnessConfig,
                     dataset: str = "", cache: EncodingCache | None = None) -> dict:
  """{system name: metrics} of every system on one loaded dataset (``dataset``: its name, for
  the stage lines; ``cache``: the embeddings systems share, `EncodingCache`)."""
  out = {}
  cache = cache or EncodingCache()
  for i, system in enumerate(systems, start=1):
    log.info("%s: system %d/%d %s (%s) on %s queries x %s documents", dataset, i, len(systems),
             system.name, system.kind, f"{len(data.query_ids):,}", f"{len(data.doc_ids):,}")
    start = time.perf_counter()
    out[system.name] = {"source": system.source, **system.evaluate(data, cfg, cache)}
    log.info("%s: %s done in %.1f s: nDCG@10 %.4f", dataset, system.name,
             time.perf_counter() - start, out[system.name]["ndcg@10"])
  return out


def evaluate(systems: Sequence[System], specs: Sequence[BeirSpec], cfg: HarnessConfig) -> dict:
  """Every system on every dataset.

  Returns:
    {"config": cfg as a dict, "datasets": {dataset name: {"path", "split", "num_queries",
    "num_docs", "max_docs", "skipped_empty_queries", "systems": {system name: metrics}}}}: the
    content of results.json (without the run information `report.write` adds).

  Raises:
    ConfigError: no system, or two systems or datasets with one name.
  """
  if not systems:
    raise ConfigError("no system to evaluate")
  for what, names in (("system", [s.name for s in systems]), ("dataset", [d.name for d in specs])):
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ConfigError(f"two {what}s are named {repeated}; give them names (NAME=PATH)")
  datasets = {}
  cache = EncodingCache()
  corpora: dict[str, Sequence[str]] = {}  # whole corpora by folder, while a later dataset reads one
  for i, spec in enumerate(specs, start=1):
    log.info("dataset %d/%d %s: loading %s [%s]", i, len(specs), spec.name, spec.path, spec.split)
    data = spec.load()
    if not spec.max_docs:  # every split of a folder reads all of its corpus: the same documents
      corpora[spec.path] = data.docs
    later = {s.path for s in specs[i:] if not s.max_docs}
    corpora = {path: docs for path, docs in corpora.items() if path in later | {spec.path}}
    cache.keep(data.queries, data.docs, *(corpora[path] for path in later & corpora.keys()))
    datasets[spec.name] = {
        "path": spec.path, "split": spec.split, "num_queries": len(data.query_ids),
        "num_docs": len(data.doc_ids), "max_docs": spec.max_docs,
        "skipped_empty_queries": len(data.skipped_empty_queries),
        "systems": evaluate_dataset(systems, data, cfg, spec.name, cache)}
  return {"config": dataclasses.asdict(cfg), "datasets": datasets}
