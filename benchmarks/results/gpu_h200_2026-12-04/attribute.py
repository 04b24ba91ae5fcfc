"""GPU kernel time of one jitted step, by the saejax source line each kernel came from.

Joins a jax.profiler perfetto trace (kernel name = XLA instruction name, GPU time) with the
compiled HLO text of the same step (each instruction's op_name and stack frame), so a fusion such
as `input_transpose_fusion.44` reads as `models/params.py:45 layer_norm, bwd`. Library kernels
(cuBLAS nvjet, cuDNN attention) have no HLO instruction of their own name and are listed as such.

    python attribute.py run1_hlo_old.txt.gz run1_trace_old.json.gz   # writes nothing, prints
"""

import collections
import gzip
import json
import re
import sys


def stack_tables(lines):
  sec, files, funcs, locs, frames = None, {}, {}, {}, {}
  for line in lines:
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      sec = line
      continue
    m = re.match(r"^(\d+) (.*)$", line)
    if not m or sec is None:
      continue
    i, rest = int(m.group(1)), m.group(2)
    if sec == "FileNames":
      files[i] = rest.strip('"')
    elif sec == "FunctionNames":
      funcs[i] = rest.strip('"')
    else:
      d = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
      if sec == "FileLocations":
        locs[i] = (d["file_name_id"], d["function_name_id"], d["line"])
      else:
        frames[i] = (d["file_location_id"], d["parent_frame_id"])
  return files, funcs, locs, frames


def main(hlo_path: str, trace_path: str, steps: int = 3) -> None:
  lines = gzip.open(hlo_path).read().decode().splitlines()
  files, funcs, locs, frames = stack_tables(lines)

  def where(frame):           # the innermost saejax frame of a stack
    seen = set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      loc, frame = frames[frame]
      f, fn, line = locs[loc]
      if "saejax/" in files[f] and "benchmarks" not in files[f]:
        return f"{files[f].split('saejax/')[-1]}:{line} {funcs[fn]}"
    return "?"

  source = {}
  for line in lines:
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', m.group(2))
      frame = re.search(r"stack_frame_id=(\d+)", m.group(2))
      source[re.sub(r"[.\-]", "_", m.group(1))] = (
          "bwd" if op and "transpose(jvp" in op.group(1) else "fwd",
          where(int(frame.group(1))) if frame else "?")
  events = json.load(gzip.open(trace_path))["traceEvents"]
  gpu = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
         and "GPU" in e["args"]["name"]}
  total, kernels = collections.Counter(), collections.defaultdict(collections.Counter)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu:
      key = source.get(e["name"], ("lib", e["name"][:60]))
      total[key] += e["dur"] / 1e3 / steps
      kernels[key][e["name"][:40]] += e["dur"] / 1e3 / steps
  print(f"GPU busy {sum(total.values()):.1f} ms/step")
  for (phase, src), ms in total.most_common(40):
    top = ", ".join(f"{k} {v:.1f}" for k, v in kernels[(phase, src)].most_common(3))
    print(f"{ms:6.2f} ms  {phase:3s}  {src[:58]:58s} | {top[:100]}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
