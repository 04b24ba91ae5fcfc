"""`SparseIndex.search` one query per call (p50) and all queries in one call, on the real codes of
SciFact's, Debian's and a 100k mix's documents (idf 0.5, as saejax searches), for comparing two
versions of saejax.retrieval: run it once from each checkout, alternating.

    NUMBA_NUM_THREADS=1 PYTHONPATH=CHECKOUT .venv/bin/python \\
        benchmarks/results/ann_amd_2026-12-04b/lone_query.py runs/cache_full/codes_FINGERPRINT_k64.npz
"""

import sys
import time

import numpy as np

from saejax.retrieval import index as saejax_index

MIX = ("train_d", "scifact_docs", "cranfield_docs", "debian_docs", "train_q")
QUERIES = ("scifact_queries", "cranfield_queries", "debian_queries")


def main(path: str) -> None:
  print(saejax_index.__file__)
  codes = np.load(path)
  mix_v = np.concatenate([codes[f"{name}_values"] for name in MIX])
  mix_i = np.concatenate([codes[f"{name}_indices"] for name in MIX])
  rows = np.random.default_rng(0).permutation(len(mix_v))[:100_000]
  corpora = {"scifact": (codes["scifact_docs_values"], codes["scifact_docs_indices"],
                         codes["scifact_queries_values"], codes["scifact_queries_indices"]),
             "debian": (codes["debian_docs_values"], codes["debian_docs_indices"],
                        codes["debian_queries_values"], codes["debian_queries_indices"]),
             "mix 100k": (mix_v[rows], mix_i[rows],
                          np.concatenate([codes[f"{name}_values"] for name in QUERIES]),
                          np.concatenate([codes[f"{name}_indices"] for name in QUERIES]))}
  for name, (values, indices, q_values, q_indices) in corpora.items():
    index = saejax_index.SparseIndex.build(values, indices, 16_384, idf_power=0.5)
    index.search(q_values, q_indices, 10)  # numba compiles
    p50, qps = [], []
    for _ in range(3):
      seconds = []
      for q in range(min(1000, len(q_values))):
        start = time.perf_counter()
        index.search(q_values[q:q + 1], q_indices[q:q + 1], 10)
        seconds.append(time.perf_counter() - start)
      p50.append(np.median(seconds) * 1e6)
      start = time.perf_counter()
      index.search(q_values, q_indices, 10)
      qps.append(len(q_values) / (time.perf_counter() - start))
    print(f"{name} ({index.num_docs:,} docs): one query a call p50 {min(p50):.1f} us (rounds "
          f"{', '.join(f'{x:.1f}' for x in p50)}); all {len(q_values):,} in one call "
          f"{max(qps):,.0f} QPS")


if __name__ == "__main__":
  main(sys.argv[1])
