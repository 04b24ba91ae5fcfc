"""GPU time of one train step by phase, and each cuDNN attention call's duration, from a
jax.profiler trace of 3 steps (bench_gpu.py --profile). Kernels run inside XLA's command buffers
(CUDA graphs), so they carry no HLO name; the cuDNN attention calls anchor the phases instead:
per step 22 query-pass forward calls, 22 document-pass forward calls, then 22 + 22 backward ones.

    python phases.py run5_trace_new.json.gz     # prints; writes nothing
"""

import gzip
import json
import sys


def main(trace_path: str) -> None:
  events = json.load(gzip.open(trace_path))["traceEvents"]
  gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
         and "GPU" in e["args"]["name"]}
  kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu),
                   key=lambda e: e["ts"])
  attention = [e for e in kernels if "sdpa" in e["name"]]
  per_step = 88
  assert len(attention) % per_step == 0, len(attention)

  def busy(t0, t1):  # ms of kernel time inside [t0, t1)
    return sum(min(e["ts"] + e["dur"], t1) - max(e["ts"], t0) for e in kernels
               if e["ts"] < t1 and e["ts"] + e["dur"] > t0) / 1e3

  step = attention[per_step:2 * per_step]          # the middle step: whole neighbours on both sides
  print("cuDNN attention, us per call (query fwd | doc fwd | query bwd | doc bwd):")
  for i in range(4):
    print("  " + " ".join(f"{e['dur']:.0f}" for e in step[22 * i:22 * (i + 1)]))
  prev_last = attention[per_step - 1]
  gaps = [(b["ts"] - (a["ts"] + a["dur"]), b["ts"]) for a, b in zip(kernels, kernels[1:])
          if a["ts"] > prev_last["ts"] and b["ts"] <= step[0]["ts"]]
  start = max(gaps)[1]                            # after the longest idle gap: the step's start
  next_start = max((b["ts"] - (a["ts"] + a["dur"]), b["ts"]) for a, b in zip(kernels, kernels[1:])
                   if a["ts"] > step[-1]["ts"] and b["ts"] <= attention[2 * per_step]["ts"])[1]
  marks = [("embeddings, first layers' norms", start, step[0]["ts"]),
           ("query pass forward", step[0]["ts"], step[22]["ts"]),
           ("document pass forward, SAE, losses", step[22]["ts"], step[44]["ts"]),
           ("query pass backward (and the loss's)", step[44]["ts"], step[66]["ts"]),
           ("document pass backward", step[66]["ts"], step[-1]["ts"] + step[-1]["dur"]),
           ("embedding gradients, AdamW", step[-1]["ts"] + step[-1]["dur"], next_start)]
  print(f"{'phase':40s} {'span ms':>8s} {'GPU busy ms':>12s}")
  for name, t0, t1 in marks:
    print(f"{name:40s} {(t1 - t0) / 1e3:8.2f} {busy(t0, t1):12.2f}")
  print(f"{'idle between steps (longest gap)':40s} {max(gaps)[0] / 1e3:8.2f}")
  print(f"{'step start to next step start':40s} {(next_start - start) / 1e3:8.2f} "
        f"{busy(start, next_start):12.2f}")


if __name__ == "__main__":
  main(sys.argv[1])
