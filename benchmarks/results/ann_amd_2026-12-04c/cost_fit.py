"""Fit of `index_kernels.COST_*_NS`: one thread's time for a lone query against its work.

Indexes (idf 0.5) of bench_index.py's synthetic codes (k = 64, S = 16,384, latent popularity ~
rank^-a, documents seed 1) for a = 1.0, 0.7, 0.0, 1.2 at N = 100k, 300k, 1M; 200 queries (seed 2)
each, one query a call, three rounds (each query's median of the three). Least squares of the time
on (rows, postings of the query's sparse terms, rows x the query's dense-column terms).

    .venv/bin/python benchmarks/results/ann_amd_2026-12-04c/cost_fit.py
"""
import sys, time, numpy as np
sys.path.insert(0, "benchmarks")
import bench_index as bi
from saejax.retrieval.index import SparseIndex
rows = []
for a in (1.0, 0.7, 0.0, 1.2):
  qv, qi = bi.zipf_codes(200, 64, 16_384, a, seed=2)
  for n in (100_000, 300_000, 1_000_000):
    index = SparseIndex.build(*bi.zipf_codes(n, 64, 16_384, a, seed=1), 16_384, idf_power=0.5)
    lens = np.diff(index.offsets)
    isd = index._dense_slot[qi] >= 0
    sparse = np.where(isd, 0, lens[qi]).sum(1)
    dense = isd.sum(1)
    T = np.full((3, len(qv)), np.inf)
    for r in range(3):
      for j in range(len(qv)):
        s = time.perf_counter(); index.search(qv[j:j+1], qi[j:j+1]); T[r, j] = time.perf_counter() - s
    t = np.median(T, 0) * 1e3
    print(f"a={a} N={n:,} sparse/N {sparse.mean()/n:.2f} dense/q {dense.mean():.1f} p50 ms {np.median(t):.3f}", flush=True)
    for j in range(len(qv)): rows.append((n, sparse[j], dense[j] * n, t[j]))
    del index
R = np.array(rows, float)
X = R[:, :3]; y = R[:, 3]
c, *_ = np.linalg.lstsq(X, y, rcond=None)
print("ns per row, per sparse posting, per dense entry:", c * 1e6)
pred = X @ c
print("rel err p50/p90:", np.percentile(np.abs(pred - y) / y, [50, 90]))

