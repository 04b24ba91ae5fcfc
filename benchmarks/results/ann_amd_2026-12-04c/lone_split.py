"""A lone query's latency with `SparseIndex.search`'s document split: one thread vs two, by index size.

Codes (k = 64, S = 16,384):
  --codes real  the cached real codes of the frozen arm (runs/cache_full; needs that cache),
                documents drawn with replacement (seed 0) from its 120k document and training
                texts' codes, queries the
                200 of bench_ann.py's latency subset (the evaluation queries, --queries 1000);
  --codes zipf  bench_index.py's synthetic codes (latent popularity ~ rank^-1, values |N(0,1)|),
                documents seed 1, 200 queries seed 2 -- runs on a fresh checkout.
Each index (idf 0.5) is built in this process and searched on one thread, on two with every query
split (`MIN_SHARE_NS` lowered to 1 ns) and on two as shipped (split where a query's estimated work,
`index_kernels.search_cost_ns`, reaches 2 x `MIN_SHARE_NS`). Two-thread results are checked equal
to one thread's. Three rounds, one query a call; p50 of the best round (range over rounds), its
p99; and the share of queries split as shipped.

    .venv/bin/python benchmarks/results/ann_amd_2026-12-04c/lone_split.py --codes zipf
"""
import argparse
import sys
import time

import numpy as np

sys.path.insert(0, "benchmarks")
import bench_index as bi  # noqa: E402
from saejax.retrieval import index as index_module  # noqa: E402
from saejax.retrieval import index_kernels as kernels  # noqa: E402
from saejax.retrieval.index import SparseIndex  # noqa: E402

SIZES = (100_000, 150_000, 300_000, 500_000, 1_000_000)
parser = argparse.ArgumentParser()
parser.add_argument("--codes", choices=("real", "zipf"), default="zipf")
args = parser.parse_args()

if args.codes == "real":
  DOCS = ("train_d", "scifact_docs", "cranfield_docs", "debian_docs", "train_q")
  codes = dict(np.load("runs/cache_full/codes_4d2e84efba5ae893_k64.npz"))
  bench = bi.real_corpus("real:1m", 100_000, argparse.Namespace(queries=1000), codes, "")
  rows = bi.query_rows(len(bench.q_values), 200)
  qv, qi = bench.q_values[rows], bench.q_indices[rows]
  values = np.concatenate([codes[f"{n}_values"] for n in DOCS])
  indices = np.concatenate([codes[f"{n}_indices"] for n in DOCS])
  draw = lambda n: np.random.default_rng(0).integers(0, len(values), n)  # noqa: E731
  corpus = lambda n: (values[draw(n)], indices[draw(n)])  # noqa: E731
else:
  qv, qi = bi.zipf_codes(200, 64, 16_384, 1.0, seed=2)
  corpus = lambda n: bi.zipf_codes(n, 64, 16_384, 1.0, seed=1)  # noqa: E731

SHIPPED = index_module.MIN_SHARE_NS
print(f"codes: {args.codes}", flush=True)
for n in SIZES:
  index = SparseIndex.build(*corpus(n), 16_384, idf_power=0.5)
  weighted = [index._queries(qv[j:j + 1], qi[j:j + 1]) for j in range(len(qv))]
  cost = np.array([kernels.search_cost_ns(index.offsets, index._dense_slot, i, v, n)
                   for v, i in weighted])
  want = index.search(qv, qi)
  index_module.MIN_SHARE_NS = 1.0
  for j in range(len(qv)):
    got = index.search(qv[j:j + 1], qi[j:j + 1], num_threads=2)
    assert (got[1][0] == want[1][j]).all() and (got[0][0] == want[0][j]).all(), (n, j)
  line = [f"N={n:>9,} (estimated work p50 {np.median(cost) / 1e6:.3f} ms, "
          f"{(cost >= 2 * SHIPPED).mean():.0%} of queries split as shipped)"]
  for threads, label, min_share in ((1, "1 thread", SHIPPED), (2, "2 threads, all split", 1.0),
                                    (2, "2 threads as shipped", SHIPPED)):
    index_module.MIN_SHARE_NS = min_share
    p50, p99 = [], []
    for _ in range(3):
      times = []
      for j in range(len(qv)):
        start = time.perf_counter()
        index.search(qv[j:j + 1], qi[j:j + 1], num_threads=threads)
        times.append(time.perf_counter() - start)
      p50.append(np.median(times) * 1e3)
      p99.append(np.percentile(times, 99) * 1e3)
    best = int(np.argmin(p50))
    line.append(f"{label}: p50 {p50[best]:.3f} ms ({min(p50):.3f}-{max(p50):.3f}), "
                f"p99 {p99[best]:.3f}")
  index_module.MIN_SHARE_NS = SHIPPED
  print("; ".join(line), flush=True)
  del index
