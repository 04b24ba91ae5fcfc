"""Peak host memory of indexing and encoding, measured against stated bounds.

Part 1, index (synthetic, N up to 1M documents): TopK codes with S = 16,384 latents and k = 64,
latents drawn Zipf(a = 1) as in bench_index.py (head-heavy, like a trained TopK SAE: the most
popular latent in ~100% of documents). The codes are generated in chunks of 65,536 documents (as an
encoder emits them) into preallocated [N, k] arrays, indexed with `SparseIndex.build`, saved, and
loaded back in the same child process after everything else is freed; the index is idf-weighted
as saejax builds corpus indexes (``--idf-power``, default `IDF_POWER`; 0: plain). Bounds, with
C = N k 8 bytes (the float32 values + int32 indices of the codes) and base = RSS after imports:

  build:  peak - base <= 4 C + index.nbytes + 64 MiB   (the codes, their copy in doc-id order,
          scipy's CSR -> CSC conversion with its duplicate summing, the final int32 / float32
          posting arrays, and the index's dense columns and skips: all linear in N, no N^2 term)
  serve:  peak - base <= index.nbytes + 64 MiB   (SparseIndex.load holds the index and nothing else)

Part 2, encode (real text): documents of data/debian-quickstart/train.jsonl through
`saejax.retrieval.encode.encode_sparse` with all-MiniLM-L6-v2 + a TopK SAE (S = 16,384, k = 64,
random init), batch 64, max 128 tokens. Bound: memory does not grow with N beyond the outputs
themselves,

  peak(N) - peak(N_0) <= (N - N_0) x k x 8 bytes + 64 MiB

(activations are one batch at a time; each batch's codes go to host numpy before the next).

Every (part, N) runs in a fresh child process so that each peak is its own (VmHWM from
/proc/self/status, reset between phases through /proc/self/clear_refs; ru_maxrss where that is
unavailable).

    .venv/bin/python benchmarks/bench_memory.py   # N = 100k, 300k, 1M docs; 256, 1024 texts
    .venv/bin/python benchmarks/bench_memory.py --docs 1000000 --texts 256 1024
"""

import argparse
import ctypes
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from this folder)
from saejax.retrieval.index import IDF_POWER

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
SLACK = 64 * MIB
CHUNK = 65_536


def rss() -> int:
  """Current resident set size in bytes."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
  """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak() -> int:
  """RSS high-water mark in bytes since the last `reset_peak` (else since the start)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_heap() -> None:
  """Give freed heap memory back to the OS (glibc's malloc_trim), so that the next phase's peak
  is measured from what is in use: glibc keeps freed blocks below its (adaptive, up to 32 MiB)
  mmap threshold in the heap, where a later phase would reuse them without raising RSS, and the
  100k index's load read 0 MiB over base that way."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: RSS then includes freed blocks, as before
    pass


def child_index(n: int, k: int, s: int, workdir: Path, idf_power: float) -> dict:
  import gc

  import numpy as np
  sys.path.insert(0, str(REPO / "benchmarks"))
  from bench_index import zipf_codes
  from saejax.retrieval.index import SparseIndex
  zipf_codes(10, k, s, 1.0, seed=0)  # numba compiles outside the measurement
  gc.collect()
  base = rss()
  reset_peak()
  start = time.perf_counter()
  values, indices = np.empty((n, k), np.float32), np.empty((n, k), np.int32)
  for lo in range(0, n, CHUNK):
    hi = min(n, lo + CHUNK)
    values[lo:hi], indices[lo:hi] = zipf_codes(hi - lo, k, s, 1.0, seed=lo + 1)
  index = SparseIndex.build(values, indices, num_latents=s, idf_power=idf_power)
  build_s = time.perf_counter() - start
  build_peak = peak()
  index.save(workdir / f"index-{n}", overwrite=True)
  nbytes, nnz, dense = index.nbytes, index.nnz, index.num_dense
  del values, indices, index
  gc.collect()
  release_freed_heap()
  base_serve = rss()
  reset_peak()
  loaded = SparseIndex.load(workdir / f"index-{n}")
  serve_peak = peak()
  assert loaded.nnz == nnz
  return {"part": "index", "n": n, "k": k, "codes_bytes": n * k * 8, "index_bytes": nbytes,
          "nnz": nnz, "dense": dense, "base": base, "build_peak": build_peak,
          "base_serve": base_serve, "serve_peak": serve_peak, "build_s": build_s}


def child_encode(n: int, k: int, s: int) -> dict:
  import gc
  import json as json_

  from flax import nnx

  from saejax.data.tokenizer import load_tokenizer
  from saejax.hub import build
  from saejax.hub.demo import minilm_dir
  from saejax.retrieval import encode
  sys.path.insert(0, str(REPO / "configs"))
  import quickstart
  config = quickstart.get_config()
  config.sae.num_latents, config.sae.k = s, k
  _, model = build.build_model(config, nnx.Rngs(0))
  tokenizer = load_tokenizer(minilm_dir())
  rows = (REPO / "data/debian-quickstart/train.jsonl").read_text().splitlines()
  texts = [json_.loads(r)["document"] for r in rows[:n]]
  assert len(texts) == n, f"only {len(texts)} texts in data/debian-quickstart/train.jsonl"
  cfg = encode.EncodeConfig(max_len=128, batch_size=64, progress=False)
  # Compile every bucket's shape first: a compile is a one-off cost, not growth with N.
  warm = [" ".join(["word"] * (length - 2)) for length in cfg.lengths for _ in range(64)]
  encode.encode_sparse(model, tokenizer, warm, config=cfg)
  gc.collect()
  base = rss()
  reset_peak()
  start = time.perf_counter()
  codes = encode.encode_sparse(model, tokenizer, texts, config=cfg)
  return {"part": "encode", "n": n, "k": k, "base": base, "peak": peak(),
          "out_bytes": codes.values.nbytes + codes.indices.nbytes,
          "truncated": codes.stats.num_truncated, "encode_s": time.perf_counter() - start}


def run_child(args: argparse.Namespace, part: str, n: int) -> dict:
  """One measurement in a fresh process, with this run's settings."""
  settings = ["--k", str(args.k), "--num-latents", str(args.num_latents), "--workdir",
              args.workdir, "--idf-power", repr(args.idf_power)]
  out = subprocess.run([sys.executable, __file__, *settings, "--child", part, str(n)], cwd=REPO,
                       text=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if out.returncode:
    raise SystemExit(f"child {part} {n} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--docs", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
  parser.add_argument("--texts", type=int, nargs="*", default=[256, 1024])
  parser.add_argument("--k", type=int, default=64)
  parser.add_argument("--num-latents", type=int, default=16_384)
  parser.add_argument("--workdir", default="/tmp/saejax-bench-memory")
  parser.add_argument("--idf-power", type=float, default=IDF_POWER,
                      help="the index's idf weighting (default: what saejax builds corpus "
                           "indexes with; 0: plain)")
  parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    part, n = args.child[0], int(args.child[1])
    result = (child_index(n, args.k, args.num_latents, Path(args.workdir), args.idf_power)
              if part == "index"
              else child_encode(n, args.k, args.num_latents))
    print(json.dumps(result))
    return
  Path(args.workdir).mkdir(parents=True, exist_ok=True)
  print(f"# bench_memory: {cpu_model()}, {os.cpu_count()} cores, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
        f"{os.getloadavg()[0]:.1f}\n# command: {' '.join(sys.argv)}", flush=True)
  ok = True
  if args.docs:
    print("\n| N docs | codes C (MiB) | index (MiB) | dense cols | build peak - base (MiB) | "
          "/ C | bound 4 C + index + 64 | serve peak - base (MiB) | bound index + 64 | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
  for n in args.docs:
    r = run_child(args, "index", n)
    build, serve = r["build_peak"] - r["base"], r["serve_peak"] - r["base_serve"]
    build_ok = build <= 4 * r["codes_bytes"] + r["index_bytes"] + SLACK
    serve_ok = serve <= r["index_bytes"] + SLACK
    ok &= build_ok and serve_ok
    print(f"| {n:,} | {r['codes_bytes'] / MIB:,.0f} | {r['index_bytes'] / MIB:,.0f} | "
          f"{r['dense']} | {build / MIB:,.0f} | {build / r['codes_bytes']:.2f} | "
          f"{'met' if build_ok else 'EXCEEDED'} | {serve / MIB:,.0f} | "
          f"{'met' if serve_ok else 'EXCEEDED'} | {r['build_s']:.1f} |", flush=True)
  if args.texts:
    print("\n| N texts | peak - base (MiB) | outputs (MiB) | growth over first N (MiB) | "
          "bound | truncated | encode s |")
    print("|---|---|---|---|---|---|---|")
  first = None
  for n in args.texts:
    r = run_child(args, "encode", n)
    used = r["peak"] - r["base"]
    first = first or (n, used)
    growth = used - first[1]
    bound_ok = growth <= (n - first[0]) * args.k * 8 + SLACK
    ok &= bound_ok
    print(f"| {n:,} | {used / MIB:,.0f} | {r['out_bytes'] / MIB:.1f} | {growth / MIB:+,.0f} | "
          f"{'met' if bound_ok else 'EXCEEDED'} | {r['truncated']} | {r['encode_s']:.1f} |",
          flush=True)
  print("\nall bounds met" if ok else "\nA BOUND WAS EXCEEDED")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
