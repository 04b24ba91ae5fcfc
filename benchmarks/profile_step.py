"""Where the train step's time goes: saejax per XLA:CPU thunk against PyTorch per aten op.

The same batches and both trainers as `bench_train_step.py` (its flags, its runners). saejax is
traced with `jax.profiler`; every thunk of the trace is mapped through the compiled HLO to its
opcode, output shape and JAX source op (``op_name`` metadata), then summed per step by

  * phase: forward (``jvp(...)``), backward (``transpose(...)``), optimiser (the update's
    ``lax.cond`` branch), other;
  * (opcode, output shape, JAX primitive): e.g. every ``[2048, 384]`` matmul fusion together,
    which separates the encoder's GEMMs, the attention's softmax and the elementwise work.

The last line splits both sides' time into the dense layers' GEMMs (saejax: dot thunks and dot
fusions with a 2-D output; PyTorch: ``aten::mm`` + ``aten::addmm``) and everything else, so the
step's ratio can be read against the ratio of the GEMMs alone: the ceiling that the project's own
code cannot move (XLA:CPU's GEMM library against PyTorch's).

PyTorch runs the same timed steps under `torch.profiler`, printed as its per-op table. Thunk names
repeat across executables, so every batch must have one shape: the default here is
``--padding fixed``. One core each is the like-for-like setting:

    taskset -c 0 .venv/bin/python benchmarks/profile_step.py --threads 1 --steps 3

``--out DIR`` also writes DIR/saejax_ops.tsv (ms per step, thunk, opcode, shape, JAX op name; every
thunk) and DIR/saejax_hlo.txt (the compiled module) for reading a fusion's body.
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bench  # noqa: E402  (the runners and batches being profiled)


def hlo_index(text: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (opcode[/fusion kind], output shape, JAX op_name) from HLO text."""
  out = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
    if m:
      name, shape, opcode = m.groups()
      kind = re.search(r"kind=(\w+)", line)
      meta = re.search(r'op_name="([^"]+)"', line)
      out[name] = (opcode + (f"/{kind.group(1)}" if kind else ""), shape.split("{")[0],
                   meta.group(1) if meta else "")
  return out


def phase(op_name: str) -> str:
  """forward / backward / optimiser / other, from a JAX op_name."""
  if "transpose(" not in op_name and "jvp(" not in op_name and "cond/" in op_name:
    return "optimiser"  # the update's lax.cond branch (metric branches are off on timed steps)
  return "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "other"


def thunk_times(trace_dir: str, index: dict) -> tuple[collections.Counter, collections.Counter]:
  """Total ms per profiled thunk name found in ``index`` (the XLA:CPU executor's trace events),
  and per name of every other timed event (the runtime's own work around the thunks: input
  handling, output allocation, the Python dispatch; these may nest)."""
  path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  data = json.load(gzip.open(path))
  times, other = collections.Counter(), collections.Counter()
  for event in data["traceEvents"] if isinstance(data, dict) else data:
    if event.get("ph") == "X":
      name = event["name"]
      if name in index:
        times[name] += event["dur"] / 1e3
      elif not name.startswith("end: ") and not name.startswith("ThreadpoolListener"):
        other[name] += event["dur"] / 1e3
  return times, other


def is_dense_gemm(opcode: str, shape: str, prim: str) -> bool:
  """A dense layer's matmul: a dot thunk, or a dot fusion, with a 2-D [rows, features] output."""
  two_d = re.fullmatch(r"\w+\[\d+,\d+\]", shape) is not None
  return two_d and (opcode == "dot" or (opcode.startswith("fusion") and prim == "dot_general"))


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  out = None
  if "--out" in argv:
    i = argv.index("--out")
    out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
  if "--padding" not in argv:
    argv += ["--padding", "fixed"]
  args = bench.parse_args(argv)
  import jax
  import torch

  records = bench.load_pairs(args.data, args.batch_size * (1 + args.steps), args.seed)
  warm, timed = records[:args.batch_size], records[args.batch_size:]
  sx = bench.SaejaxRunner.build(args)
  sx_warm, sx_timed = bench.saejax_batches(warm, args), bench.saejax_batches(timed, args)
  sx.compile_for(sx_warm + sx_timed)
  if len(sx.compiled) != 1:
    raise SystemExit(f"{len(sx.compiled)} compiled shapes: thunk names repeat across executables, "
                     "so profile one shape (--padding fixed)")
  hlo = next(iter(sx.compiled.values())).as_text()
  index = hlo_index(hlo)
  bench.time_steps(sx.step, sx_warm)
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      bench.time_steps(sx.step, sx_timed)
    wall_sx = time.perf_counter() - start
    times, other = thunk_times(trace_dir, index)

  per_step = {name: t / args.steps for name, t in times.items()}
  total = sum(per_step.values())
  print(f"saejax: {args.steps} steps, wall {wall_sx / args.steps * 1e3:.0f} ms per step, "
        f"thunks {total:.0f} ms per step")
  by_phase, by_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
  for name, t in per_step.items():
    opcode, shape, op_name = index[name]
    by_phase[phase(op_name)] += t
    key = (opcode, shape, op_name.split("/")[-1] if op_name else "?")
    by_kind[key] += t
    count[key] += 1
  for label, t in by_phase.most_common():
    print(f"  {t:8.1f} ms {t / total:6.1%}  {label}")
  print("by (opcode, output shape, JAX primitive), ms per step, thunks:")
  for (opcode, shape, prim), t in by_kind.most_common(40):
    print(f"  {t:8.1f} ms {t / total:6.1%} x{count[(opcode, shape, prim)]:<4d} {opcode:16s} "
          f"{shape:30s} {prim}")
  print("other trace events (outside the thunks; they may nest), ms per step:")
  for name, t in other.most_common(8):
    print(f"  {t / args.steps:8.1f} ms  {name[:90]}")
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "saejax_hlo.txt").write_text(hlo)
    with open(out / "saejax_ops.tsv", "w") as f:
      for name, t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        f.write("\t".join([f"{t:.3f}", name, *index[name]]) + "\n")

  pt = bench.TorchRunner.build(args)
  pt_warm = bench.torch_batches(pt, warm, args.batch_size)
  pt_timed = bench.torch_batches(pt, timed, args.batch_size)
  step = functools.partial(bench.torch_step, pt, args.threads[0])
  bench.time_steps(step, pt_warm)
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    bench.time_steps(step, pt_timed)
  wall_pt = time.perf_counter() - start
  print(f"pytorch@{args.threads[0]}: wall {wall_pt / args.steps * 1e3:.0f} ms per step "
        f"(saejax / pytorch time {wall_sx / wall_pt:.2f})")
  print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
  gemm_sx = sum(t for key, t in by_kind.items() if is_dense_gemm(*key))
  gemm_pt = sum(e.self_cpu_time_total for e in prof.key_averages()
                if e.key in ("aten::mm", "aten::addmm")) / 1e3 / args.steps
  rest_sx, rest_pt = wall_sx / args.steps * 1e3 - gemm_sx, wall_pt / args.steps * 1e3 - gemm_pt
  print(f"dense-layer GEMMs, ms per step: saejax {gemm_sx:.0f}, pytorch {gemm_pt:.0f} "
        f"(pytorch / saejax {gemm_pt / gemm_sx:.2f}x); the rest of the wall time: saejax "
        f"{rest_sx:.0f}, pytorch {rest_pt:.0f} ({rest_pt / rest_sx:.2f}x); whole step "
        f"{wall_pt / wall_sx:.2f}x")
  # Not the same work: saejax pads every batch to the fixed lengths (one shape to profile),
  # PyTorch to each batch's longest text; per padded token the ratios are these times the factor.
  padded_sx = sum(int(b["q_ids"].size + b["d_ids"].size) for b in sx_timed)
  padded_pt = sum(int(q["input_ids"].numel() + d["input_ids"].numel()) for q, d in pt_timed)
  print(f"padded tokens per step: saejax {padded_sx / args.steps:.0f}, pytorch "
        f"{padded_pt / args.steps:.0f}: per padded token multiply each ratio by "
        f"{padded_sx / padded_pt:.3f}")


if __name__ == "__main__":
  from saejax import hostmem
  hostmem.reexec_with_tunables()
  main()
