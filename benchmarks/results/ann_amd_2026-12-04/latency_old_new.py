"""One-query latency of `SparseIndex.search` (idf 0 and 0.5) on real codes, for comparing two
versions of saejax.retrieval.index: run it once from each checkout.

A random 100k of the cached documents' codes (bench_index.py's codes file), the 3,394 evaluation
queries; p50 over the first 1,000 queries, one per call, best of three rounds; then all queries
in one call (QPS).

    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH=CHECKOUT .venv/bin/python \\
        benchmarks/results/ann_amd_2026-12-04/latency_old_new.py \\
        runs/cache_full/codes_FINGERPRINT_k64.npz
"""

import sys
import time

import numpy as np

from saejax.retrieval import index as saejax_index

DOCS = ("train_d", "scifact_docs", "cranfield_docs", "debian_docs", "train_q")
QUERIES = ("scifact_queries", "cranfield_queries", "debian_queries")


def main(path: str) -> None:
  print(saejax_index.__file__)
  codes = np.load(path)
  values = np.concatenate([codes[f"{name}_values"] for name in DOCS])
  indices = np.concatenate([codes[f"{name}_indices"] for name in DOCS])
  rows = np.random.default_rng(0).permutation(len(values))[:100_000]
  q_values = np.concatenate([codes[f"{name}_values"] for name in QUERIES])
  q_indices = np.concatenate([codes[f"{name}_indices"] for name in QUERIES])
  for power in (0.0, 0.5):
    index = saejax_index.SparseIndex.build(values[rows], indices[rows], 16_384, idf_power=power)
    index.search(q_values, q_indices, 10)  # numba compiles
    medians = []
    for _ in range(3):
      seconds = []
      for q in range(1000):
        start = time.perf_counter()
        index.search(q_values[q:q + 1], q_indices[q:q + 1], 10)
        seconds.append(time.perf_counter() - start)
      medians.append(float(np.median(seconds)) * 1e3)
    start = time.perf_counter()
    index.search(q_values, q_indices, 10)
    qps = len(q_values) / (time.perf_counter() - start)
    print(f"idf {power}: p50 {min(medians):.3f} ms (rounds "
          f"{', '.join(f'{m:.3f}' for m in medians)}), batch QPS {qps:,.0f}")


if __name__ == "__main__":
  main(sys.argv[1])
