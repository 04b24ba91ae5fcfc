"""Where `index_kernels.search_kernel`'s time goes, read from the CPU's cycle counter, and the
kernel of another git revision timed against the working tree's, on the same index.

1. Phases: a copy of the kernel with `llvm.readcyclecounter` around each phase of each (query,
   block) pass - zeroing the accumulator, the dense columns' axpy, the postings' scatter, the heap
   collection - summed over all queries (the counter reads cost ~0.1% of the time).
2. Before / after: the kernels module of ``--before`` (a git revision) and of the working tree,
   timed on one thread in alternating rounds over the same arrays, all queries in one call and a
   seeded 200 of them one per call (p50); the results must be equal. The phases of both.

Documents: ``--docs`` rows drawn (with replacement above the number of distinct codes) from the
cached codes' documents, indexed with idf 0.5 as saejax searches; queries: the first 1,000
evaluation queries, one batch per call (`SparseIndex.search`'s way).

    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/results/ann_amd_2026-12-04b/kernel_phases.py \\
        runs/cache_full/codes_FINGERPRINT_k64.npz --docs 1000000 --before 85d21a5
"""

import argparse
import importlib.util
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from saejax.retrieval import index_kernels
from saejax.retrieval.index import SparseIndex

DOCS = ("train_d", "scifact_docs", "cranfield_docs", "debian_docs", "train_q")
QUERIES = ("scifact_queries", "cranfield_queries", "debian_queries")
KERNEL = Path(index_kernels.__file__)
COUNTER = '''

@intrinsic
def cycles(typingctx):
  def codegen(context, builder, signature, args):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.IntType(64), []), "llvm.readcyclecounter")
    return builder.call(fn, [])
  return types.int64(), codegen
'''
PASS = """      for a in range(m):
        acc[:b1 - b0] = 0.0
        _add_dense(acc, dense_cols, d_slot[a], d_val[a], n_dense[a], b0, b1)
        _add_sparse(acc, skips, b, docs, weights, lut, s_lat[a], s_val[a], n_sparse[a], b0,
                    starts, stops, lines)
        sizes[q0 + a] = _collect(acc, b1 - b0, b0, out_s[q0 + a], out_r[q0 + a], sizes[q0 + a])"""
TIMED_PASS = """      for a in range(m):
        t0 = cycles()
        acc[:b1 - b0] = 0.0
        t1 = cycles()
        _add_dense(acc, dense_cols, d_slot[a], d_val[a], n_dense[a], b0, b1)
        t2 = cycles()
        _add_sparse(acc, skips, b, docs, weights, lut, s_lat[a], s_val[a], n_sparse[a], b0,
                    starts, stops, lines)
        t3 = cycles()
        sizes[q0 + a] = _collect(acc, b1 - b0, b0, out_s[q0 + a], out_r[q0 + a], sizes[q0 + a])
        t4 = cycles()
        spent[0] += t1 - t0
        spent[1] += t2 - t1
        spent[2] += t3 - t2
        spent[3] += t4 - t3"""
SIGNATURE = "q_indices, q_values, top_k, batch):"


def module(source: str, folder: Path, name: str):
  """``source`` imported as a module (numba's on-disk cache off: it keys on the file)."""
  path = folder / f"{name}.py"
  path.write_text(source.replace("cache=True, ", ""))
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("codes", help="a codes_*.npz of benchmarks/embed_cache.py's cache")
  p.add_argument("--docs", type=int, default=1_000_000)
  p.add_argument("--before", default="", help="git revision whose kernel to time against")
  p.add_argument("--rounds", type=int, default=7)
  args = p.parse_args()
  codes = np.load(args.codes)
  values = np.concatenate([codes[f"{name}_values"] for name in DOCS])
  indices = np.concatenate([codes[f"{name}_indices"] for name in DOCS])
  rng = np.random.default_rng(0)
  rows = (rng.choice(len(values), args.docs, replace=False) if args.docs <= len(values)
          else rng.integers(0, len(values), args.docs))
  index = SparseIndex.build(values[rows], indices[rows], 16_384, idf_power=0.5)
  print(index)
  # pylint: disable=protected-access  (the kernel's own arguments, as SparseIndex.search passes)
  q_values, q_indices = index._queries(
      np.concatenate([codes[f"{name}_values"] for name in QUERIES])[:1000],
      np.concatenate([codes[f"{name}_indices"] for name in QUERIES])[:1000])
  arrays = (index._skips, index.docs, index._kernel_weights, index_kernels.HALF_TO_FLOAT,
            index._dense_slot, index._dense_cols, index.num_docs, index._block)
  source = KERNEL.read_text()
  sources = {"working tree": source}
  if args.before:
    sources = {args.before: subprocess.run(
        ["git", "show", f"{args.before}:saejax/retrieval/index_kernels.py"], capture_output=True,
        text=True, check=True, cwd=KERNEL.parents[2]).stdout, **sources}
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    for i, (name, text) in enumerate(sources.items()):
      this_pass = PASS if PASS in text else PASS.replace(", lines)", ")")  # before 2026-12-04b
      assert text.count(this_pass) == 1 and text.count(SIGNATURE) == 1, f"{name}: update me"
      timed_pass = TIMED_PASS if this_pass == PASS else TIMED_PASS.replace(", lines)", ")")
      timed = module(text.replace(this_pass, timed_pass).replace(
          SIGNATURE, SIGNATURE[:-2] + ", spent):") + COUNTER, folder, f"timed{i}")
      spent = np.zeros(4, dtype=np.int64)
      timed.search_kernel(*arrays, q_indices[:10], q_values[:10], 10, timed.QUERY_BATCH, spent)
      for _ in range(3):
        spent[:] = 0
        start = time.perf_counter()
        timed.search_kernel(*arrays, q_indices, q_values, 10, timed.QUERY_BATCH, spent)
        ms = (time.perf_counter() - start) / len(q_values) * 1e3
        share = spent / spent.sum()
        print(f"phases, {name}: {ms:.3f} ms a query; zeroing {share[0]:.3f}, dense columns "
              f"{share[1]:.3f}, postings' scatter {share[2]:.3f}, collection {share[3]:.3f} of "
              f"the cycles")
    if not args.before:
      return
    old = sources[args.before]
    kernels = {args.before: module(old, folder, "before"), "working tree": module(source, folder,
                                                                                  "after")}
    times = {name: [] for name in kernels}
    latency = {name: [] for name in kernels}
    alone = np.sort(np.random.default_rng(3).choice(len(q_values), 200, replace=False))
    results = {}
    for name, mod in kernels.items():
      mod.search_kernel(*arrays, q_indices[:10], q_values[:10], 10, mod.QUERY_BATCH)
    for _ in range(args.rounds):
      for name, mod in kernels.items():
        start = time.perf_counter()
        scores, found = mod.search_kernel(*arrays, q_indices, q_values, 10, mod.QUERY_BATCH)
        times[name].append((time.perf_counter() - start) / len(q_values) * 1e3)
        results[name] = np.sort(found, axis=1), np.sort(scores, axis=1)
        seconds = []
        for q in alone:
          start = time.perf_counter()
          mod.search_kernel(*arrays, q_indices[q:q + 1], q_values[q:q + 1], 10, mod.QUERY_BATCH)
          seconds.append(time.perf_counter() - start)
        latency[name].append(np.median(seconds) * 1e3)
    (a_rows, a_scores), (b_rows, b_scores) = results.values()
    assert np.array_equal(a_rows, b_rows) and np.array_equal(a_scores, b_scores), "results differ"
    for name, ms in times.items():
      print(f"{name}: batch of {len(q_values):,}: best {min(ms):.3f} ms a query "
            f"({1e3 / min(ms):,.0f} QPS), median {np.median(ms):.3f}; one query a call "
            f"(200 of them): p50 best {min(latency[name]):.3f} ms, median "
            f"{np.median(latency[name]):.3f}; {args.rounds} alternating rounds; results equal")

if __name__ == "__main__":
  main()
