"""What the benchmark scripts print about the machine they ran on (RESULTS.md asks for it)."""

import os
import platform
import subprocess
from collections.abc import Sequence


def cpu_model() -> str:
  """lscpu's "Model name", else what Python knows about the processor."""
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def like_for_like(threads: Sequence[int]) -> str:
  """"" when this process sees no more cores than the most PyTorch threads timed, else a warning
  for the saejax / PyTorch ratio: XLA:CPU uses every core it sees, so the two sides did not run
  on the same cores (the withdrawn headlines of RESULTS.md were such ratios)."""
  cores, most = len(os.sched_getaffinity(0)), max(threads)
  if cores <= most:
    return ""
  return (f" -- NOT like for like: XLA sees {cores} cores, PyTorch ran at most {most} threads; "
          f"pin the process (taskset -c 0-{most - 1}) for a ratio")
