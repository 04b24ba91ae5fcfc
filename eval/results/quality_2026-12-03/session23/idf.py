"""IDF weighting of a run's codes at index time, on a cache of its encoder (experiment)."""
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import sweep
from saejax.retrieval.index import sparse_matrix
from saejax.eval import quickeval

cache, run = Path(sys.argv[1]), sys.argv[2]
sae = sweep.run_sae(run, cache)
codes = sweep.codes_fn(sae)
S = sae.config.num_latents
evals = {n: sweep.load_eval(cache, n) for n in sweep.EVAL_SETS}
evals[sweep.UNSEEN] = sweep.unseen_eval(*evals["scifact"])

def weigh(values, indices, w):
  out = values * w[indices]
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

for kq, kd in ((64, 64), (512, 64)):
  base = {}
  for name, (data, q, d) in evals.items():
    base[name] = (codes(q, kq, True), codes(d, kd, True))
  for mode in ("docs", "both"):
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
      if a == 0 and mode == "both": continue
      row = {}
      for name, (data, q, d) in evals.items():
        (qv, qi), (dv, di) = base[name]
        df = np.bincount(di[dv > 0], minlength=S)
        idf = np.log((len(dv) + 1) / (df + 0.5)) ** a
        dvw = weigh(dv, di, idf)
        qvw = weigh(qv, qi, idf) if mode == "both" else qv
        docs, scores = quickeval.search_sparse(sparse_matrix(qvw, qi, S), sparse_matrix(dvw, di, S))
        row[name] = quickeval.evaluate(data.qrels, quickeval.to_run(data, docs, scores))["ndcg@10"]
      mean = np.mean([row[n] for n in sweep.EVAL_SETS])
      print(f"q{kq} d{kd} {mode:5s} a={a:.2f}  mean {mean:.4f}  " +
            "  ".join(f"{n} {row[n]:.4f}" for n in row), flush=True)
