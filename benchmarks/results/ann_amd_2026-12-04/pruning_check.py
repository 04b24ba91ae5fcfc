"""Would safe pruning speed up exact search on these codes? A NumPy/scipy model, not a search
engine: it counts what an exact search with upper bounds would still have to score.

Documents: the 120,542 cached codes of bench_ann.py's model, idf-weighted (power 0.5) as saejax
searches (unit codes); 300 random evaluation queries; theta = a query's exact 10th-best score.

1. Query-side bound (MaxScore-like, by Cauchy-Schwarz): score first the query's strongest latents
   holding a fraction f of its squared mass; a document's unscanned part then scores at most the
   norm of the query's unscanned part, so only documents whose partial score reaches the 10th-best
   partial score minus that norm stay candidates. Printed: postings scanned, candidates left.
2. Block-max bounds: documents grouped into blocks of ~B (B = 64, 256), in random order or
   clustered (spherical k-means on a 256-d random projection of the codes, N / B clusters, so
   documents sharing latents share blocks). Each block keeps its largest weight per latent; its
   bound for a query is sum_t q_t * blockmax[t], and a safe search must score every block whose
   bound reaches theta. Printed: the query's postings inside those blocks as a fraction of all its
   postings (1.0 = no pruning), and the cost of the bounds in the same unit (block-max entries of
   the query's latents / its postings).

    .venv/bin/python benchmarks/results/ann_amd_2026-12-04/pruning_check.py \\
        runs/cache_full/codes_FINGERPRINT_k64.npz
"""

import sys

import faiss
import numpy as np
import scipy.sparse as sp

from saejax.retrieval.index import latent_idf, sparse_matrix, weigh_codes

DOCS = ("train_d", "scifact_docs", "cranfield_docs", "debian_docs", "train_q")
QUERIES = ("scifact_queries", "cranfield_queries", "debian_queries")
S = 16_384


def block_max(docs: sp.csr_matrix, labels: np.ndarray) -> sp.csr_matrix:
  """[blocks, S]: each block's largest weight of each latent."""
  coo = docs.tocoo()
  key = labels[coo.row].astype(np.int64) * S + coo.col
  order = np.argsort(key, kind="stable")
  key, val = key[order], coo.data[order]
  starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
  top, cell = np.maximum.reduceat(val, starts), key[starts]
  return sp.csr_matrix((top, (cell // S, cell % S)), shape=(int(labels.max()) + 1, S))


def main(path: str) -> None:
  codes = np.load(path)
  values = np.concatenate([codes[f"{name}_values"] for name in DOCS])
  indices = np.concatenate([codes[f"{name}_indices"] for name in DOCS])
  pick = np.random.default_rng(0).permutation(sum(len(codes[f"{n}_values"]) for n in QUERIES))
  q_values = np.concatenate([codes[f"{name}_values"] for name in QUERIES])[pick[:300]]
  q_indices = np.concatenate([codes[f"{name}_indices"] for name in QUERIES])[pick[:300]]
  n = len(values)
  weights = latent_idf(np.bincount(indices.ravel(), minlength=S), n, 0.5)
  docs = sparse_matrix(weigh_codes(values, indices, weights), indices, S).tocsr()
  queries = weigh_codes(q_values, q_indices, weights)
  theta = np.sort((sparse_matrix(queries, q_indices, S) @ docs.T).toarray(), axis=1)[:, -10]
  print(f"{n:,} documents, {len(queries)} queries; 10th-best score: median {np.median(theta):.3f}")
  by_latent = docs.tocsc()
  for mass in (0.9, 0.97):
    scanned, candidates = [], []
    for q in range(len(queries)):
      order = np.argsort(-queries[q])
      val, lat = queries[q][order], q_indices[q][order]
      cumulative = np.cumsum(val ** 2)
      m = int(np.searchsorted(cumulative, mass * cumulative[-1])) + 1
      rest = np.sqrt(max(cumulative[-1] - cumulative[m - 1], 0.0))
      partial = np.asarray(by_latent[:, lat[:m]] @ val[:m]).ravel()
      candidates.append(int((partial >= np.sort(partial)[-10] - rest).sum()))
      scanned.append(by_latent[:, lat[:m]].nnz / by_latent[:, lat].nnz)
    print(f"query-side bound, {mass:.0%} of the query's mass scanned first: postings scanned "
          f"{np.median(scanned):.2f}; candidates left median {np.median(candidates):,.0f}, p90 "
          f"{np.percentile(candidates, 90):,.0f} of {n:,}", flush=True)
  projection = np.random.default_rng(2).standard_normal((S, 256)).astype(np.float32) / 16
  points = np.asarray(docs @ projection, dtype=np.float32)
  points /= np.linalg.norm(points, axis=1, keepdims=True) + 1e-9
  for block in (64, 256):
    for grouping in ("random", "clustered"):
      if grouping == "random":
        labels = np.random.default_rng(1).permutation(n) // block
      else:
        kmeans = faiss.Kmeans(256, n // block, niter=10, seed=3, spherical=True)
        kmeans.train(points)
        labels = kmeans.index.search(points, 1)[1].ravel()
      bounds_matrix = block_max(docs, labels)
      by_latent_blocks = bounds_matrix.tocsc()
      scored, bound_cost = [], []
      for q in range(len(queries)):
        live = queries[q] != 0
        lat, val = q_indices[q][live], queries[q][live]
        postings = by_latent[:, lat].nnz
        bound = bounds_matrix[:, lat] @ val
        needed = np.isin(labels, np.flatnonzero(bound >= theta[q] * (1 - 1e-6)))
        scored.append(docs[needed][:, lat].nnz / postings)
        bound_cost.append(by_latent_blocks[:, lat].nnz / postings)
      sizes = np.bincount(labels)
      print(f"blocks of ~{block}, {grouping}: {len(sizes):,} blocks (sizes median "
            f"{np.median(sizes):.0f}, max {sizes.max()}); postings still scored: median "
            f"{np.median(scored):.3f}, p90 {np.percentile(scored, 90):.3f}; bounds cost "
            f"{np.median(bound_cost):.3f}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
