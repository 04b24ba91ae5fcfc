"""Top-10 sparse search over synthetic TopK SAE codes: saejax's SparseIndex vs scipy vs Seismic.

Codes (the generator): S latents ranked by popularity; each text draws its k distinct latents one at
a time with probability ~ rank^-a (``--zipf``, default 1.0), a draw that repeats a latent already
taken being redrawn (successive sampling without replacement), and gives each a value |N(0, 1)|.
With a = 1 and S = 16,384 this is head-heavy like a trained TopK SAE's codes: the most popular
latent is in ~100% of documents, the 10th in ~55%, the 100th in ~7%, and a k=64 query's posting
lists hold ~10 N postings. Queries come from the same generator (another seed) with the same k.

Systems, each asked for the top 10 of every query, single-threaded (NUMBA_NUM_THREADS, OMP, MKL and
OpenBLAS threads set to 1 before anything is imported; Seismic's num_threads=1):
  saejax   `SparseIndex.search`, exact (the reference for recall);
  scipy    the plain baseline: `q_csr @ D_csr.T` (D.T converted to CSR once, outside the timing)
           for blocks of 64 queries, `.toarray()`, `np.argpartition` top 10, sorted. Exact: its
           scores are checked against saejax's;
  seismic  pyseismic-lsr built from the same codes with its default build parameters, searched at
           each ``--seismic`` (query_cut:heap_factor) setting; approximate, so recall@10 vs saejax.

Timing: every system searches all queries once untimed (numba compiles, caches warm), then
``--rounds`` rounds take turns over the systems so that load from other processes falls on all of
them; QPS = queries / wall time of a round, best round reported with the range over rounds.
Memory: the index structures' own bytes (saejax `nbytes`; scipy D + D.T) and the process' peak RSS.

    .venv/bin/python benchmarks/bench_index.py --docs 100000 --k 64
    .venv/bin/python benchmarks/bench_index.py --docs 10000 100000 --k 32 64 128
"""

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ[_var] = "1"  # before numpy, scipy and numba start their thread pools

import argparse  # noqa: E402  (the thread settings above must come first)
import contextlib  # noqa: E402
import datetime  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from saejax.retrieval.index import SeismicAdapter, SparseIndex, recall  # noqa: E402

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py; scripts run from this folder)

TOP_K = 10
SCIPY_BLOCK = 64  # queries per scipy product: a [64, N] dense score block


@numba.njit(cache=True)
def _draw_latents(cdf, n, k, seed):
  """[n, k] distinct latents per row, each drawn from ``cdf`` and redrawn on a repeat."""
  np.random.seed(seed)
  s = cdf.shape[0]
  out = np.empty((n, k), dtype=np.int32)
  taken_by = np.full(s, -1, dtype=np.int64)  # the last row that took each latent
  for row in range(n):
    j = 0
    while j < k:
      t = min(np.searchsorted(cdf, np.random.random(), side="right"), s - 1)
      if taken_by[t] != row:
        taken_by[t] = row
        out[row, j] = t
        j += 1
  return out


def zipf_codes(n: int, k: int, s: int, a: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(values float32 [n, k], indices int32 [n, k]): see the module docstring."""
  p = np.arange(1, s + 1, dtype=np.float64) ** -a
  indices = _draw_latents(np.cumsum(p / p.sum()), n, k, seed)
  values = np.abs(np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32))
  return values, indices


def codes_csr(values: np.ndarray, indices: np.ndarray, s: int) -> sp.csr_matrix:
  n, k = values.shape
  return sp.csr_matrix((values.reshape(-1), indices.reshape(-1), np.arange(0, n * k + 1, k)),
                       shape=(n, s))


def scipy_search(q: sp.csr_matrix, dt: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
  """The plain baseline: exact top-10 per query by sparse product, argpartition and sort."""
  scores, ids = [], []
  for start in range(0, q.shape[0], SCIPY_BLOCK):
    block = (q[start:start + SCIPY_BLOCK] @ dt).toarray()
    part = np.argpartition(-block, TOP_K - 1, axis=1)[:, :TOP_K]
    part_scores = np.take_along_axis(block, part, 1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    scores.append(np.take_along_axis(part_scores, order, 1))
    ids.append(np.take_along_axis(part, order, 1))
  return np.concatenate(scores), np.concatenate(ids)


@contextlib.contextmanager
def quiet_stdout():
  """Silence writes to file descriptor 1 (Seismic's Rust code prints build progress there)."""
  sys.stdout.flush()
  saved = os.dup(1)
  with open(os.devnull, "wb") as null:
    os.dup2(null.fileno(), 1)
    try:
      yield
    finally:
      os.dup2(saved, 1)
      os.close(saved)


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def run_config(n: int, k: int, args: argparse.Namespace) -> list[dict]:
  """Rows of the results table for N = n documents of k latents."""
  s = args.num_latents
  (values, indices), gen_s = timed(lambda: zipf_codes(n, k, s, args.zipf, seed=1))
  q_values, q_indices = zipf_codes(args.queries, k, s, args.zipf, seed=2)
  print(f"\n## N={n:,} k={k}: codes generated in {gen_s:.1f}s", flush=True)
  index, saejax_build = timed(lambda: SparseIndex.build(values, indices, s))
  print(f"  {index}", flush=True)
  d = codes_csr(values, indices, s)
  dt, scipy_build = timed(lambda: d.T.tocsr())
  q = codes_csr(q_values, q_indices, s)
  systems = {"saejax": lambda: index.search(q_values, q_indices, TOP_K),
             "scipy": lambda: scipy_search(q, dt)}
  seismic, seismic_build = None, 0.0
  if args.seismic and n <= args.seismic_max_docs:
    with quiet_stdout():
      seismic, seismic_build = timed(lambda: SeismicAdapter.build(values, indices, s))
    for setting in args.seismic:
      cut, heap = setting.split(":")
      systems[f"seismic {setting}"] = (
          lambda c=int(cut), h=float(heap): seismic.search(q_values, q_indices, TOP_K,
                                                           query_cut=c, heap_factor=h))
  del values, indices
  results = {name: fn() for name, fn in systems.items()}  # untimed warm-up, and the answers
  exact_scores, exact_ids = results["saejax"]
  scipy_scores = results["scipy"][0]
  agree = np.allclose(np.where(exact_ids >= 0, exact_scores, 0), scipy_scores, rtol=1e-5)
  print(f"  saejax scores == scipy scores (rtol 1e-5): {agree}", flush=True)
  qps = {name: [] for name in systems}
  for round_ in range(args.rounds):
    for name, fn in systems.items():
      qps[name].append(args.queries / timed(fn)[1])
    print(f"  round {round_}: " + ", ".join(f"{name} {v[-1]:,.0f}" for name, v in qps.items()),
          flush=True)
  memory = {"saejax": index.nbytes, "scipy": d.data.nbytes * 2 + d.indices.nbytes * 2}
  build = {"saejax": saejax_build, "scipy": scipy_build}
  rows = []
  for name, values_ in qps.items():
    base = name.split()[0]
    rows.append(dict(
        docs=n, k=k, system=name, build_s=build.get(base, seismic_build),
        mib=memory.get(base, float("nan")) / 2**20, qps=max(values_), lo=min(values_),
        recall=recall(results[name][1], exact_ids) if base == "seismic" else 1.0,
        speedup=max(values_) / max(qps["scipy"])))
  rows[-1]["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| N | k | system | build (s) | index MiB | QPS (best) | QPS range | recall@10 | "
           "x scipy |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mib = "-" if np.isnan(r["mib"]) else f"{r['mib']:,.0f}"
    lines.append(f"| {r['docs']:,} | {r['k']} | {r['system']} | {r['build_s']:.1f} | {mib} | "
                 f"{r['qps']:,.0f} | {r['lo']:,.0f}-{r['qps']:,.0f} | {r['recall']:.3f} | "
                 f"{r['speedup']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--docs", type=int, nargs="+", default=[100_000], help="N values")
  parser.add_argument("--k", type=int, nargs="+", default=[64], help="latents per code")
  parser.add_argument("--num-latents", type=int, default=16_384, help="S")
  parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent a")
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seismic", nargs="*",
                      default=["3:0.7", "5:0.7", "10:0.8", "20:0.9", "40:1.0"],
                      help="query_cut:heap_factor settings (none: skip Seismic)")
  parser.add_argument("--seismic-max-docs", type=int, default=1_000_000,
                      help="skip Seismic above this many documents (its build is slow)")
  args = parser.parse_args(argv)
  print(f"# bench_index: {cpu_model()}, {datetime.date.today()}, numba {numba.__version__}, "
        f"numpy {np.__version__}\n# command: {' '.join(sys.argv)}", flush=True)
  rows = []
  for n in args.docs:
    for k in args.k:
      rows += run_config(n, k, args)
      print(f"  peak RSS so far {rows[-1]['peak_rss_gib']:.1f} GiB", flush=True)
  print("\n" + markdown(rows))


if __name__ == "__main__":
  main()
