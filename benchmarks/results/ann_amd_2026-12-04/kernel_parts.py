"""Where `SparseIndex.search`'s time goes at 1M documents: the kernel with one part switched off.

Copies of saejax/retrieval/index_kernels.py without the sparse postings' scatter, the dense
columns' axpy, or the heap collection (replaced by a read of one accumulator entry, so that the
compiler keeps the accumulation), timed on one thread against the unchanged kernel: 1M documents
drawn from the cached codes (idf 0.5), 1,000 evaluation queries, best of three passes. The
difference to the unchanged kernel is that part's cost.

    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/results/ann_amd_2026-12-04/kernel_parts.py \\
        runs/cache_full/codes_FINGERPRINT_k64.npz
"""

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from saejax.retrieval import index_kernels
from saejax.retrieval.index import SparseIndex

DOCS = ("train_d", "scifact_docs", "cranfield_docs", "debian_docs", "train_q")
QUERIES = ("scifact_queries", "cranfield_queries", "debian_queries")
SPARSE = "        _add_sparse(acc, skips"
DENSE = "        _add_dense(acc, dense_cols"
COLLECT = ("        sizes[q0 + a] = _collect(acc, b1 - b0, b0, out_s[q0 + a], out_r[q0 + a], "
           "sizes[q0 + a])")
VARIANTS = {"unchanged": (None, None),
            "no sparse scatter": (SPARSE, "        if False: " + SPARSE[8:]),
            "no dense columns": (DENSE, "        if False: " + DENSE[8:]),
            "no collection": (COLLECT, "        sizes[q0 + a] += acc[0] > np.float32(1e30)")}


def variant(source: str, name: str, old: str | None, new: str | None, folder: Path):
  """The kernels module with ``old`` replaced by ``new``, imported from ``folder``."""
  if old is not None:
    assert source.count(old) == 1, f"{name}: the kernel source changed; update this script"
    source = source.replace(old, new)
  path = folder / f"kernels_{len(list(folder.iterdir()))}.py"
  path.write_text(source.replace("cache=True, ", ""))
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(path: str) -> None:
  codes = np.load(path)
  values = np.concatenate([codes[f"{name}_values"] for name in DOCS])
  indices = np.concatenate([codes[f"{name}_indices"] for name in DOCS])
  rows = np.random.default_rng(0).integers(0, len(values), 1_000_000)
  index = SparseIndex.build(values[rows], indices[rows], 16_384, idf_power=0.5)
  # pylint: disable=protected-access  (the kernel's own arguments, as SparseIndex.search passes)
  q_values, q_indices = index._queries(
      np.concatenate([codes[f"{name}_values"] for name in QUERIES])[:1000],
      np.concatenate([codes[f"{name}_indices"] for name in QUERIES])[:1000])
  arrays = (index._skips, index.docs, index._kernel_weights, index_kernels.HALF_TO_FLOAT,
            index._dense_slot, index._dense_cols, index.num_docs, index_kernels.BLOCK)
  source = Path(index_kernels.__file__).read_text()
  with tempfile.TemporaryDirectory() as folder:
    times = {}
    for name, (old, new) in VARIANTS.items():
      kernels = variant(source, name, old, new, Path(folder))
      kernels.search_kernel(*arrays, q_indices[:10], q_values[:10], 10, kernels.QUERY_BATCH)
      best = np.inf
      for _ in range(3):
        start = time.perf_counter()
        kernels.search_kernel(*arrays, q_indices, q_values, 10, kernels.QUERY_BATCH)
        best = min(best, time.perf_counter() - start)
      times[name] = best / len(q_values) * 1e3
      print(f"{name}: {times[name]:.3f} ms a query ({1 / times[name] * 1e3:,.0f} QPS)", flush=True)
  base = times["unchanged"]
  sparse, dense = base - times["no sparse scatter"], base - times["no dense columns"]
  collection = base - times["no collection"]
  print(f"sparse scatter {sparse:.3f} ms, dense columns {dense:.3f} ms, collection "
        f"{collection:.3f} ms, the rest (zeroing, splitting the query) "
        f"{base - sparse - dense - collection:.3f} ms")


if __name__ == "__main__":
  main(sys.argv[1])
