"""Median cosine of a distinct cached text to its nearest other distinct text (the scale for
bench_ann's --jitter-cosine)."""
import os, sys
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, "benchmarks")
import numpy as np, faiss
import bench_index as bi
from pathlib import Path
emb = bi.cached_embeddings(Path("runs/cache_full"))
raw = np.concatenate([emb[x] for x in bi.TILED_SOURCES]).astype(np.float32)
u = raw / np.linalg.norm(raw, axis=1, keepdims=True)
_, keep = np.unique(np.round(u * 1e5).astype(np.int64), axis=0, return_index=True)
u = u[np.sort(keep)]
print("distinct texts", len(u), "norms", np.percentile(np.linalg.norm(raw, axis=1), [1, 50, 99]))
idx = faiss.IndexFlatIP(u.shape[1]); idx.add(u)
rows = np.random.default_rng(0).choice(len(u), 3000, replace=False)
s, i = idx.search(u[rows], 11)
nn = s[:, 1]
print("NN cosine percentiles 10/25/50/75/90:", np.percentile(nn, [10, 25, 50, 75, 90]).round(4))
print("10th-NN cosine median:", np.median(s[:, 10]).round(4))
