"""What the benchmark scripts print about the machine they ran on (RESULTS.md asks for it)."""

import platform
import subprocess


def cpu_model() -> str:
  """lscpu's "Model name", else what Python knows about the processor."""
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"
