"""Does splitting pay for a lone query near the threshold? Real codes (as lone_split.py --codes real),
150k and 200k documents; queries of the 1,000 evaluation queries binned by estimated work
(`search_cost_ns`), up to 150 a bin; one query a call, every query split on two threads vs one,
p50 over the bin, best of three rounds.

    .venv/bin/python benchmarks/results/ann_amd_2026-12-04c/split_by_work.py
"""
import argparse, sys, time, numpy as np
sys.path.insert(0, "benchmarks")
import bench_index as bi
from saejax.retrieval import index as index_module, index_kernels as K
from saejax.retrieval.index import SparseIndex
DOCS = ("train_d", "scifact_docs", "cranfield_docs", "debian_docs", "train_q")
codes = dict(np.load("runs/cache_full/codes_4d2e84efba5ae893_k64.npz"))
bench = bi.real_corpus("real:1m", 100_000, argparse.Namespace(queries=1000), codes, "")
qv, qi = bench.q_values, bench.q_indices
values = np.concatenate([codes[f"{n}_values"] for n in DOCS]); indices = np.concatenate([codes[f"{n}_indices"] for n in DOCS])
for n in (150_000, 200_000):
  pick = np.random.default_rng(0).integers(0, len(values), n)
  index = SparseIndex.build(values[pick], indices[pick], 16_384, idf_power=0.5)
  cost = np.array([K.search_cost_ns(index.offsets, index._dense_slot, *index._queries(qv[j:j+1], qi[j:j+1])[::-1], n) for j in range(len(qv))])
  for lo, hi in ((0.2e6, 0.3e6), (0.3e6, 0.4e6), (0.4e6, 1e9)):
    sel = np.flatnonzero((cost >= lo) & (cost < hi))[:150]
    index_module.MIN_SHARE_NS = 1.0
    res = {}
    for r in range(3):
      for th in (1, 2):
        t = []
        for j in sel:
          s = time.perf_counter(); index.search(qv[j:j+1], qi[j:j+1], num_threads=th); t.append(time.perf_counter() - s)
        res.setdefault(th, []).append(np.median(t) * 1e3)
    print(f"N={n} est {lo/1e6:.1f}-{hi/1e6:.1f} ms: {len(sel)} queries, p50 1t {min(res[1]):.3f} 2t {min(res[2]):.3f}", flush=True)
