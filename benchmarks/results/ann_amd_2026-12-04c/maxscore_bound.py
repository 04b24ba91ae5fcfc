"""How much could safe dynamic pruning (MaxScore: skip the postings of the terms whose summed
upper bounds q_t * max_w_t stay under the k-th score) save on the real codes at 1M? Given the
final 10th score as an oracle threshold (a real search only approaches it), the terms still
essential and their share of the query's postings, over the bench's 200 latency queries.

    .venv/bin/python benchmarks/results/ann_amd_2026-12-04c/maxscore_bound.py
"""
import argparse, sys, numpy as np
sys.path.insert(0, "benchmarks")
import bench_index as bi
from saejax.retrieval.index import SparseIndex
codes = dict(np.load("runs/cache_full/codes_4d2e84efba5ae893_k64.npz"))
bench = bi.real_corpus("real:1m", 1_000_000, argparse.Namespace(queries=1000), codes, "")
index = SparseIndex.build(bench.values, bench.indices, 16_384, idf_power=0.5)
rows = bi.query_rows(len(bench.q_values), 200)
qv, qi = bench.q_values[rows], bench.q_indices[rows]
scores, _ = index.search(qv, qi, 10)
theta = scores[:, -1]
lens = np.diff(index.offsets)
w = index.weights.astype(np.float32)
maxw = np.maximum.reduceat(w, index.offsets[:-1].clip(max=len(w) - 1)) * (lens > 0)
wq, iq = index._queries(qv, qi)
fr = []
for j in range(len(qv)):
  ub = np.abs(wq[j]) * maxw[iq[j]] * (wq[j] > 0)
  order = np.argsort(-ub)
  tail = np.cumsum(ub[order][::-1])[::-1]  # tail[m] = sum of bounds of terms m.. end
  m = int(np.argmax(tail < theta[j])) if (tail < theta[j]).any() else len(order)
  ess = lens[iq[j][order[:m]]].sum(); tot = lens[iq[j]].sum()
  fr.append((m, ess / max(tot, 1)))
fr = np.array(fr)
print("essential terms mean", fr[:, 0].mean(), "of", qi.shape[1], "; essential postings share mean", fr[:, 1].mean(), "p50", np.median(fr[:, 1]))
print("theta p50", np.median(theta))
