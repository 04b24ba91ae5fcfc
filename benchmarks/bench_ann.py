"""Exact sparse search vs dense ANN on the same texts: saejax and Seismic over SAE codes, faiss.

The design's efficiency claim (issue #15, item 3): exact search over TopK SAE codes is at least as
fast as HNSW at recall@10 >= 0.99 over the dense embeddings the codes come from, in less memory.

Corpus: bench_index.py's real:1m at ``--docs`` N: every distinct cached text (training positives,
the SciFact, Cranfield and Debian documents, the training queries used as documents) of
``--cache`` (embed_cache.py's frozen-MiniLM embeddings; runs/cache_full holds ~120k distinct
texts), a random N of them, or, above their number T, each tiled ~N/T times with distinct ids (the
log states T and the repeat factor); queries: the evaluation sets' 3,394 queries (``--queries``
caps them). Each document is two representations of one text: its code by the SAE of the
frozen-encoder run ``--model`` (exactly the model's code: see bench_index.py) and its cached
MiniLM embedding v itself, unit-normalised (cosine, as `saejax.eval.quickeval`'s dense baseline).

Systems, each asked for the top 10 of every query:
  saejax  `SparseIndex.search`, exact over the codes: the reference for Seismic's recall;
  seismic `SeismicAdapter` (pyseismic-lsr, default build parameters), at the first of the
          ``--seismic`` query_cut:heap_factor settings (listed cheapest first) whose recall@10
          reaches ``--target``; approximate, over the codes;
  flat    faiss `IndexFlatIP` over the unit embeddings: exact cosine, the reference for HNSW;
  hnsw    faiss `IndexHNSWFlat` (inner product, M = ``--hnsw-m``, efConstruction =
          ``--ef-construction``, one value, no grid) at the smallest of the ``--ef-search`` values
          whose recall@10 reaches ``--target``.
The sparse systems score the codes as saejax searches them: the idf-weighted cosine
(``--idf-power``, default `saejax.retrieval.index.IDF_POWER`; 0 scores plain dot products).
saejax weighs each query inside its timed search call, as it ships; Seismic is given documents and
queries already weighted by the same index's idf (outside its timing, like its query conversion).
The settings are tuned on the timed queries themselves (optimistic for the approximate systems);
every candidate's recall is printed. Recall is tie-aware as in bench_index.py: a returned document
counts when its true score reaches the exact 10th score (rtol 1e-5), so any of the copies of a
tiled text is a correct answer. Caveat: above T the corpus holds exact duplicates, which HNSW's
graph (and Seismic's clustering) handle worse than distinct texts would; ``--jitter-cosine C``
moves every repeat to cosine C of its original embedding (code: the model's code of the moved
vector; `jitter_repeats`), a corpus without exact copies to check how much of a result they make.

Threads: NUMBA/OMP/MKL/OpenBLAS threads are pinned to 1 before anything is imported (as in
bench_index.py). The all-core setting (``--threads``, default all cores) is raised at run time:
saejax by `SparseIndex.search`'s ``num_threads`` (threads over contiguous shares of the
queries, or of the documents for fewer queries; its kernel releases the GIL); faiss by `omp_set_num_threads` (its OpenBLAS is the OpenMP
build and follows it); Seismic by its num_threads. Each timed pass records process CPU time / wall
time, which shows the threads actually used (~1 single-threaded; below the thread count under
outside load).
Builds use the all-core setting (saejax's build is single-threaded scipy).

Timing (as bench_index.py): every system answers all queries once untimed, then ``--rounds``
rounds take turns over systems and thread settings; QPS = queries / wall time of a round, best
round reported with the range. Latency: one query per call over ``--latency-queries`` queries (a
seeded subset), at each thread setting, in every round; p50 and p99 of the round with the best
p50. With more threads saejax splits a lone query's documents over them (`SparseIndex.search`);
faiss answers one query on one thread whatever its OpenMP setting (it parallelises over queries),
and Seismic's `search` has no thread setting, so their two latency columns time the same work. Seismic is timed through its own `batch_search` / `search` with the queries already
converted to its string tokens (the adapter's Python conversion, ~100 us a query, is left out,
as in bench_index.py); saejax and faiss through their public calls.
Memory: saejax `nbytes`, Seismic's own count (`print_space_usage_byte`), faiss the size of
`write_index`'s file; and the process' peak RSS.

Quality: nDCG@10 (ir_measures) on SciFact test and Debian dev, each system built on that set's own
documents at the settings chosen above (recall there is printed too): the codes' quality vs
dense exact vs HNSW. saejax and flat give the quality benchmark's frozen-encoder SAE + FLOPS and
untouched dense MiniLM numbers (benchmarks/RESULTS.md "Quality"), a check that both sides index
what the model and the encoder give.

    .venv/bin/python benchmarks/bench_ann.py --cache runs/cache_full --docs 100000
    .venv/bin/python benchmarks/bench_ann.py --cache runs/cache_full --docs 1000000 \\
        --queries 1000 --latency-queries 200 --rounds 2 [--jitter-cosine 0.9]
    .venv/bin/python benchmarks/bench_ann.py --docs 10000 --queries 200 --rounds 1  # smoke
"""

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ[_var] = "1"  # before numpy, scipy, numba and faiss start their thread pools

import argparse  # noqa: E402  (the thread settings above must come first)
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import ir_measures  # noqa: E402
import numpy as np  # noqa: E402
from ir_measures import nDCG  # noqa: E402

from saejax.retrieval.index import (  # noqa: E402
    IDF_POWER, SeismicAdapter, SparseIndex, weigh_codes)

import bench_index as bi  # noqa: E402  (benchmarks/; scripts run from this folder)
from machine import cpu_model  # noqa: E402

TOP_K = bi.TOP_K
SETTLE_S = 0.5  # pause before each timed pass (`settle`)
QUALITY_SETS = {"scifact": "test", "debian": "dev"}  # name in the cache: qrels split


# ---------------------------------------------------------------------------------------------
# Tuning and recall

def first_reaching(candidates: Sequence, measure: Callable[[object], float], target: float
                   ) -> tuple[object | None, dict]:
  """(the first candidate whose measure reaches ``target``, or None; {candidate: measure} of
  those measured). Candidates are tried in order, cheapest first, and the sweep stops at the
  first that reaches the target."""
  measured = {}
  for candidate in candidates:
    measured[candidate] = measure(candidate)
    if measured[candidate] >= target:
      return candidate, measured
  return None, measured


def least_reaching(fails: int, passes: int, measure: Callable[[int], float], target: float,
                   measured: dict, resolution: float = 1 / 16) -> int:
  """The smallest integer between ``fails`` (below target) and ``passes`` (at or above it) that
  reaches ``target``, to within ``resolution`` of it, by bisection: a coarse grid's first passing
  value overstates the work HNSW needs (e.g. efSearch 512 where ~410 reaches 0.99 at 1M).
  Recall is taken as monotone in the value; every measurement lands in ``measured``."""
  while passes - fails > max(1, int(fails * resolution)):
    mid = (fails + passes) // 2
    measured[mid] = measure(mid)
    fails, passes = (fails, mid) if measured[mid] >= target else (mid, passes)
  return passes


def dense_tie_recall(found: np.ndarray, exact_scores: np.ndarray, exact_ids: np.ndarray,
                     docs: np.ndarray, queries: np.ndarray) -> float:
  """`bench_index.tie_recall` for dense vectors: recall@10 of ``found`` [Q, 10] where a document
  counts when its true inner product with the query reaches the exact 10th score."""
  safe = np.where(found >= 0, found, 0)
  true = np.einsum("qkd,qd->qk", docs[safe].astype(np.float64), queries.astype(np.float64))
  true[found < 0] = -np.inf
  return bi.recall_at_scores(found, true, exact_scores, exact_ids)


# ---------------------------------------------------------------------------------------------
# Corpus

def jitter_repeats(corpus: bi.Corpus, raw: np.ndarray, cosine: float,
                   codes: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[bi.Corpus, np.ndarray]:
  """(corpus, embeddings) with every repeat of a tiled text moved off its original.

  The first occurrence of each text (in ``corpus.rows``) is kept; each later one's embedding v
  becomes |v| (``cosine`` u + sqrt(1 - ``cosine``^2) g), u = v / |v| and g a random unit
  direction orthogonal to u, so it lies at exactly ``cosine`` to its original (and about
  ``cosine``^2 to the text's other repeats), and its code is ``codes`` of that vector (the
  model's code of it). A sensitivity check, not real text: exact copies (zero-distance ties)
  degrade HNSW's graph and cost exact search nothing; near-copies leave the graph sound.
  """
  if not 0 < cosine < 1:
    raise SystemExit(f"--jitter-cosine {cosine}: must lie strictly between 0 and 1")
  repeat = np.ones(len(corpus.rows), bool)
  repeat[np.unique(corpus.rows, return_index=True)[1]] = False
  if not repeat.any():
    raise SystemExit(f"--jitter-cosine: the corpus of {len(corpus.rows):,} documents repeats no "
                     f"text (it moves repeats; --docs above the distinct texts makes some)")
  v = raw[repeat]
  u = unit(v)
  g = np.random.default_rng(7).standard_normal(u.shape).astype(np.float32)
  g = unit(g - np.sum(g * u, axis=1, keepdims=True) * u)
  moved = np.linalg.norm(v, axis=1, keepdims=True) * (cosine * u + np.sqrt(1 - cosine ** 2) * g)
  del v
  values, indices = codes(moved)
  raw, d_values, d_indices = raw.copy(), corpus.values.copy(), corpus.indices.copy()
  raw[repeat], d_values[repeat], d_indices[repeat] = moved, values, indices
  about = (f"{corpus.about}; each repeat ({int(repeat.sum()):,} documents) moved to cosine "
           f"{cosine} of its original (--jitter-cosine: a random direction, code = the model's "
           f"code of the moved embedding): no exact copies")
  return dataclasses.replace(corpus, values=d_values, indices=d_indices, about=about), raw


# ---------------------------------------------------------------------------------------------
# Systems

@dataclasses.dataclass
class System:
  """One search system over the benchmark's queries."""
  name: str
  setting: str  # the tuned setting as printed, or "exact"
  batch: Callable[[int], object]  # answer every query with this many threads (timed)
  one: Callable[[int, int], object]  # answer query i alone with this many threads (timed)
  answers: Callable[[], tuple[np.ndarray, np.ndarray]]  # (scores, ids) [Q, 10] of every query
  build_s: float
  nbytes: float
  recall: float = 1.0
  knob: object = None  # the tuned value: a --seismic setting, or HNSW's (M, efSearch)
  one_thread_s: float = 0.0  # HNSW: one untimed-for-the-report pass, to pick the fastest M


def unit(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm, float32 (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def faiss_nbytes(index) -> int:
  """Bytes of a faiss index: the size of `faiss.write_index`'s file (its own serialisation)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "index.faiss")
    faiss.write_index(index, path)
    return os.path.getsize(path)


def faiss_search(index, queries: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
  """(scores, ids) [Q, 10] of a faiss index with ``threads`` OpenMP (and OpenBLAS) threads."""
  faiss.omp_set_num_threads(threads)
  return index.search(queries, TOP_K)


def saejax_system(index: SparseIndex, q_values, q_indices, build_s: float) -> System:
  """Exact sparse search; ``threads`` > 1: its own ``num_threads`` (contiguous query shares)."""
  return System("saejax", "exact",
                lambda threads: index.search(q_values, q_indices, TOP_K, num_threads=threads),
                lambda i, threads: index.search(q_values[i:i + 1], q_indices[i:i + 1], TOP_K,
                                                num_threads=threads),
                lambda: index.search(q_values, q_indices, TOP_K), build_s, index.nbytes)


def seismic_system(adapter: SeismicAdapter, q_values, q_indices, setting: str, build_s: float,
                   nbytes: float, recall_: float) -> System:
  """Seismic at ``setting`` (query_cut:heap_factor), timed through its own calls."""
  cut, heap = setting.split(":")
  params = dict(query_cut=int(cut), heap_factor=float(heap))
  ids, comps, vals = bi.seismic_queries(q_values, q_indices)
  found = adapter.search(q_values, q_indices, TOP_K, **params)[1]
  native = adapter.index.batch_search(ids, comps, vals, k=TOP_K, num_threads=1, **params)
  got = sorted(int(doc) for hits in native for _, score, doc in hits if score > 0)
  if got != sorted(found[found >= 0].tolist()):
    raise SystemExit("Seismic's own batch_search answers differ from SeismicAdapter.search's: "
                     "the queries are not converted as the adapter converts them")
  return System(
      "seismic", setting,
      lambda threads: adapter.index.batch_search(ids, comps, vals, k=TOP_K, num_threads=threads,
                                                 **params),
      lambda i, threads: adapter.index.search(ids[i], comps[i], vals[i], k=TOP_K, **params),
      lambda: adapter.search(q_values, q_indices, TOP_K, **params), build_s, nbytes, recall_,
      setting)


def faiss_system(name: str, index, queries: np.ndarray, setting: str, build_s: float,
                 recall_: float = 1.0, knob: object = None) -> System:
  """A faiss index over the unit query embeddings."""
  return System(name, setting, lambda threads: faiss_search(index, queries, threads),
                lambda i, threads: faiss_search(index, queries[i:i + 1], threads),
                lambda: faiss_search(index, queries, 1), build_s, faiss_nbytes(index),
                recall_, knob)


# ---------------------------------------------------------------------------------------------
# Building and tuning

def make_flat(docs: np.ndarray, threads: int):
  """IndexFlatIP over ``docs`` (exact inner product)."""
  faiss.omp_set_num_threads(threads)
  flat = faiss.IndexFlatIP(docs.shape[1])
  flat.add(docs)
  return flat


def build_hnsw(docs: np.ndarray, m: int, ef_construction: int, threads: int):
  """IndexHNSWFlat (inner product) over ``docs``, built with ``threads`` OpenMP threads."""
  faiss.omp_set_num_threads(threads)
  index = faiss.IndexHNSWFlat(docs.shape[1], m, faiss.METRIC_INNER_PRODUCT)
  index.hnsw.efConstruction = ef_construction
  index.add(docs)
  return index


def tune(label: str, candidates: Sequence, measure: Callable[[object], float],
         target: float, log: bool, refine: bool = False) -> tuple[object, float]:
  """(setting, its recall): the first candidate reaching ``target``, else the best one; with
  ``refine`` (integer candidates), the least value between the last failing candidate and that
  one which reaches it (`least_reaching`)."""
  chosen, measured = first_reaching(candidates, measure, target)
  below = [c for c in measured if measured[c] < target]
  if refine and chosen is not None and below:
    chosen = least_reaching(max(below), chosen, measure, target, measured)
  if log:
    print(f"  {label} sweep, recall@10: " + ", ".join(f"{c} {r:.4f}" for c, r in measured.items()),
          flush=True)
  if chosen is None:
    chosen = max(measured, key=measured.get)
    print(f"  {label}: no candidate reached recall {target}; using the best, {chosen}", flush=True)
  return chosen, measured[chosen]


def hnsw_recall(hnsw, docs, queries, exact, threads: int) -> Callable[[int], float]:
  """efSearch -> HNSW's recall@10 vs the exact search (it leaves efSearch at that value)."""

  def measure(ef: int) -> float:
    hnsw.hnsw.efSearch = ef
    return dense_tie_recall(faiss_search(hnsw, queries, threads)[1], *exact, docs, queries)

  return measure


def seismic_recall(adapter, corpus: bi.Corpus, exact, threads: int) -> Callable[[str], float]:
  """"query_cut:heap_factor" -> Seismic's recall@10 vs saejax's exact search."""
  s, qv, qi = corpus.num_latents, corpus.q_values, corpus.q_indices
  d_csr, q_csr = bi.codes_csr(corpus.values, corpus.indices, s), bi.codes_csr(qv, qi, s)

  def measure(setting: str) -> float:
    cut, heap = setting.split(":")
    found = adapter.search(qv, qi, TOP_K, query_cut=int(cut), heap_factor=float(heap),
                           num_threads=threads)[1]
    return bi.tie_recall(found, *exact, d_csr, q_csr)

  return measure


def build_seismic(corpus: bi.Corpus, threads: int) -> tuple[SeismicAdapter, float]:
  """(Seismic over the corpus' codes with its default parameters, build seconds)."""
  # Copies: SeismicAdapter.build sorts the indices it is given in place (see bench_index.py).
  v_copy, i_copy = corpus.values.copy(), corpus.indices.copy()
  with bi.quiet_stdout():
    return bi.timed(lambda: SeismicAdapter.build(v_copy, i_copy, corpus.num_latents,
                                                 num_threads=threads))


def build_systems(corpus: bi.Corpus, docs: np.ndarray, queries: np.ndarray,
                  args: argparse.Namespace, grids: tuple[Sequence, Sequence],
                  log: bool = True) -> list[System]:
  """The four systems over one corpus (codes in ``corpus``, unit embeddings ``docs``), Seismic
  and HNSW tuned over ``grids`` (query_cut:heap_factor settings, efSearch values)."""
  qv, qi, threads = corpus.q_values, corpus.q_indices, args.threads
  index, sparse_build = bi.timed(lambda: SparseIndex.build(
      corpus.values, corpus.indices, corpus.num_latents, idf_power=args.idf_power))
  # Seismic scores plain dot products: it gets the codes as saejax scores them (weighted by the
  # index's own idf, each code at its own norm), so both rank by the same scores.
  weighted = dataclasses.replace(
      corpus, values=weigh_codes(corpus.values, corpus.indices, index.latent_weights),
      q_values=weigh_codes(qv, qi, index.latent_weights))
  adapter, seismic_build = build_seismic(weighted, threads)
  flat, flat_build = bi.timed(lambda: make_flat(docs, threads))
  if log:
    print(f"  {index}; Seismic {seismic_build:.1f}s; flat {flat_build:.1f}s", flush=True)
  seismic_grid, ef_grid = grids
  setting, s_recall = tune("Seismic query_cut:heap_factor vs saejax", seismic_grid,
                           seismic_recall(adapter, weighted, index.search(qv, qi, TOP_K),
                                          threads),
                           args.target, log)
  exact = faiss_search(flat, queries, threads)
  hnsw = min((tuned_hnsw(docs, queries, exact, m, args, ef_grid, log) for m in args.hnsw_m),
             key=lambda system: system.one_thread_s)  # HNSW at its fastest M
  if log and len(args.hnsw_m) > 1:
    print(f"  HNSW: the fastest at recall {args.target} is {hnsw.setting}", flush=True)
  return [saejax_system(index, qv, qi, sparse_build),
          seismic_system(adapter, weighted.q_values, qi, setting, seismic_build,
                         bi.seismic_nbytes(adapter), s_recall),
          faiss_system("flat", flat, queries, "exact", flat_build), hnsw]


def tuned_hnsw(docs: np.ndarray, queries: np.ndarray, exact, m: int, args: argparse.Namespace,
               ef_grid: Sequence[int], log: bool) -> System:
  """HNSW with ``m`` links, efSearch the least reaching the target (`least_reaching`), and the
  one-thread time of a pass over the queries at it (``one_thread_s``: how the M are compared)."""
  hnsw, build_s = bi.timed(lambda: build_hnsw(docs, m, args.ef_construction, args.threads))
  if log:
    print(f"  HNSW (M {m}, efConstruction {args.ef_construction}) {build_s:.1f}s", flush=True)
  ef, recall_ = tune(f"HNSW M {m} efSearch vs flat", ef_grid,
                     hnsw_recall(hnsw, docs, queries, exact, args.threads), args.target, log,
                     refine=True)
  hnsw.hnsw.efSearch = ef
  system = faiss_system("hnsw", hnsw, queries, f"M {m}, efSearch {ef}", build_s, recall_,
                        (m, ef))
  settle()
  start = time.perf_counter()
  system.batch(1)
  system.one_thread_s = time.perf_counter() - start
  return system


# ---------------------------------------------------------------------------------------------
# Timing

def settle() -> None:
  """Let the previous pass's idle pool threads block before the next is timed: OpenMP (faiss)
  and rayon (Seismic) workers spin a while after their work, and on 2 cores a spinning thread
  takes half the machine from whatever is timed next."""
  time.sleep(SETTLE_S)


def time_batch(system: System, threads: int, num_q: int) -> tuple[float, float]:
  """(QPS, process CPU time / wall time) of one pass over every query."""
  settle()
  cpu, start = time.process_time(), time.perf_counter()
  system.batch(threads)
  wall = time.perf_counter() - start
  return num_q / wall, (time.process_time() - cpu) / wall


def time_latency(system: System, rows: np.ndarray, threads: int) -> np.ndarray:
  """Seconds per query, one query per call with ``threads`` threads."""
  settle()
  out = np.empty(len(rows))
  for j, i in enumerate(rows):
    start = time.perf_counter()
    system.one(int(i), threads)
    out[j] = time.perf_counter() - start
  return out


def time_systems(systems: list[System], settings: tuple[int, ...], num_q: int,
            args: argparse.Namespace) -> list[dict]:
  """Warm-up, then rounds taking turns over systems and settings; one result row per system."""
  rows = bi.query_rows(num_q, args.latency_queries)
  for system in systems:  # untimed: numba compiles, caches warm, thread pools start
    for threads in settings:
      system.batch(threads)
      time_latency(system, rows[:10], threads)
  qps = {(s.name, t): [] for s in systems for t in settings}
  ratio = {key: [] for key in qps}
  latency = {key: [] for key in qps}
  for round_ in range(args.rounds):
    for threads in settings:
      for system in systems:
        q, r = time_batch(system, threads, num_q)
        qps[system.name, threads].append(q)
        ratio[system.name, threads].append(r)
    for threads in settings:
      for system in systems:
        latency[system.name, threads].append(time_latency(system, rows, threads))
    print(f"  round {round_}: " + ", ".join(
        f"{name} {t}t {v[-1]:,.0f}" for (name, t), v in qps.items()) + " QPS; p50 " + ", ".join(
            f"{name} {t}t {np.median(v[-1]) * 1e3:.3f}" for (name, t), v in latency.items()) +
          " ms", flush=True)
  return [result_row(s, settings, qps, ratio, latency) for s in systems]


def result_row(system: System, settings, qps, ratio, latency) -> dict:
  """One table row, per thread setting: best-round QPS (range, CPU/wall), and the p50 and p99
  of the round with the best p50 (and the p50 range)."""
  row = dict(system=system.name, setting=system.setting, recall=system.recall,
             build_s=system.build_s, mib=system.nbytes / 2**20)
  for t in settings:
    values = qps[system.name, t]
    best_round = int(np.argmax(values))
    row[f"qps_{t}"] = (max(values), min(values), ratio[system.name, t][best_round])
    best = min(latency[system.name, t], key=np.median)
    row[f"latency_{t}"] = (float(np.median(best)) * 1e3, float(np.percentile(best, 99)) * 1e3,
                           [float(np.median(x)) * 1e3 for x in latency[system.name, t]])
  return row


# ---------------------------------------------------------------------------------------------
# Quality

def quality(arrays: dict, embeddings: dict, chosen: tuple[str, tuple[int, int]],
            args: argparse.Namespace) -> dict:
  """{system: {set: (nDCG@10, recall@10)}} on each labelled set's own documents and queries,
  Seismic and HNSW at the ``chosen`` (setting, (M, efSearch))."""
  (m, ef), out = chosen[1], {}
  args = argparse.Namespace(**{**vars(args), "hnsw_m": [m]})
  for name, split in QUALITY_SETS.items():
    info = json.loads((Path(args.cache) / f"eval_{name}.json").read_text())
    corpus = bi.Corpus(f"real:{name}", arrays[f"{name}_docs_values"],
                       arrays[f"{name}_docs_indices"], arrays[f"{name}_queries_values"],
                       arrays[f"{name}_queries_indices"], int(arrays["num_latents"]), name)
    docs, queries = unit(embeddings[f"{name}_docs"]), unit(embeddings[f"{name}_queries"])
    print(f"  {name} ({split}): {len(docs):,} documents, {len(queries):,} queries", flush=True)
    for system in build_systems(corpus, docs, queries, args, ([chosen[0]], [ef]), log=False):
      scores, ids = system.answers()
      run = {qid: {info["doc_ids"][d]: float(s) for d, s in zip(row_ids, row_scores) if d >= 0}
             for qid, row_ids, row_scores in zip(info["query_ids"], ids, scores)}
      ndcg = float(ir_measures.calc_aggregate([nDCG @ 10], info["qrels"], run)[nDCG @ 10])
      out.setdefault(system.name, {})[name] = (ndcg, system.recall)
      print(f"    {system.name} ({system.setting}): nDCG@10 {ndcg:.4f}, recall@10 "
            f"{system.recall:.3f}", flush=True)
  return out


# ---------------------------------------------------------------------------------------------
# Report

def markdown(rows: list[dict], settings: tuple[int, ...], scores: dict) -> str:
  """The results table: one row per system (nDCG@10 columns when the quality section ran)."""
  sets = list(QUALITY_SETS) if scores else []
  head = (["system", "setting", "recall@10", "build (s)", "index MiB"] +
          [f"QPS {t} thread{'s' * (t > 1)} (range; cpu/wall)" for t in settings] +
          [f"one query, {t} thread{'s' * (t > 1)}: p50 ms (range) / p99 ms" for t in settings] +
          [f"nDCG@10 {n}" for n in sets])
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    qps = [r[f"qps_{t}"] for t in settings]
    cells = ([r["system"], r["setting"], f"{r['recall']:.3f}", f"{r['build_s']:.1f}",
              f"{r['mib']:,.1f}"] +
             [f"{q[0]:,.0f} ({q[1]:,.0f}-{q[0]:,.0f}; {q[2]:.2f})" for q in qps] +
             [f"{p50:.3f} ({min(rng):.3f}-{max(rng):.3f}) / {p99:.3f}"
              for p50, p99, rng in (r[f"latency_{t}"] for t in settings)] +
             [f"{scores[r['system']][n][0]:.4f}" for n in sets])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--docs", type=int, default=100_000, help="N documents (real:1m corpus)")
  parser.add_argument("--k", type=int, default=64, help="latents per code")
  parser.add_argument("--model", default="runs/quality/frozen",
                      help="training run (frozen encoder) whose codes are indexed")
  parser.add_argument("--cache", default="runs/cache",
                      help="embed_cache.py's output (runs/cache_full: ~120k distinct texts)")
  parser.add_argument("--queries", type=int, default=None, help="cap on the queries (all 3,394)")
  parser.add_argument("--latency-queries", type=int, default=1000,
                      help="queries timed one at a time (a seeded subset)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="the all-core setting's threads")
  parser.add_argument("--target", type=float, default=0.99, help="recall@10 the tuning aims at")
  parser.add_argument("--hnsw-m", type=int, nargs="+", default=[16, 32, 48],
                      help="HNSW links per node: each is built and tuned, the fastest at the "
                           "target recall is reported")
  parser.add_argument("--ef-construction", type=int, default=200)
  parser.add_argument("--ef-search", type=int, nargs="+",
                      default=[16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024],
                      help="efSearch candidates, ascending")
  parser.add_argument("--seismic", nargs="+",
                      default=["3:0.7", "5:0.7", "10:0.8", "20:0.9", "40:1.0"],
                      help="query_cut:heap_factor candidates, cheapest first")
  parser.add_argument("--idf-power", type=float, default=IDF_POWER,
                      help="the sparse systems' idf weighting (default: what saejax searches "
                           "with; 0: plain dot products of the codes)")
  parser.add_argument("--jitter-cosine", type=float, default=None,
                      help="move each repeat of a tiled text to this cosine of its original "
                           "(a sensitivity check: no exact copies; see jitter_repeats)")
  parser.add_argument("--no-quality", action="store_true", help="skip the nDCG@10 section")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  settings = (1, args.threads) if args.threads > 1 else (1,)
  print(f"# bench_ann: {cpu_model()}, {os.cpu_count()} cores, {datetime.date.today()}, faiss "
        f"{faiss.__version__}, numpy {np.__version__}\n# command: {' '.join(sys.argv)}",
        flush=True)
  SparseIndex.build(np.ones((2, 2), np.float32), np.array([[0, 1], [1, 2]], np.int32), 3)
  arrays, about = bi.real_codes(args, args.k)
  corpus = bi.real_corpus("real:1m", args.docs, args, arrays, about)
  embeddings = bi.cached_embeddings(Path(args.cache))
  raw = np.concatenate([embeddings[x] for x in bi.TILED_SOURCES])[corpus.rows]
  if args.jitter_cosine is not None:
    corpus, raw = jitter_repeats(corpus, raw, args.jitter_cosine,
                                 lambda v: bi.codes_of(args.model, v, args.k))
  docs = unit(raw)
  del raw
  queries = unit(np.concatenate([embeddings[f"{e}_queries"] for e in bi.EVAL_SETS]))[
      corpus.q_rows]
  num_q = len(queries)
  print(f"\n## N={args.docs:,} k={args.k}, {num_q:,} queries, dense D={docs.shape[1]}\n  codes: "
        f"{corpus.about}", flush=True)
  systems = build_systems(corpus, docs, queries, args, (args.seismic, args.ef_search))
  del corpus, docs
  rows = time_systems(systems, settings, num_q, args)
  chosen = (systems[1].knob, systems[3].knob)
  del systems
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  scores = {}
  if not args.no_quality:
    print("\n## Quality on the labelled sets' own documents, at the settings chosen above",
          flush=True)
    scores = quality(arrays, embeddings, chosen, args)
  print(f"\nPeak RSS {peak:.1f} GiB (before the quality section)\n\n" +
        markdown(rows, settings, scores))


if __name__ == "__main__":
  main()
