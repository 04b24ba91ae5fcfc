"""PNG plots of a training run, for people who would rather look than read metrics.jsonl.

    python -m saejax.plots WORKDIR        # writes WORKDIR/curves.png

`saejax.train` calls `training_curves` when a run ends; evaluation plots live in
`saejax.eval.report`.
"""

import json
import sys
from pathlib import Path

from saejax.errors import DataError

# (metric key, panel title, log scale): the panels of `training_curves`, when the run logged them.
PANELS = (("loss", "total loss", True), ("info_nce", "InfoNCE", False),
          ("accuracy", "in-batch accuracy", False), ("fvu", "FVU (reconstruction)", True),
          ("dead_fraction", "dead latents (fraction)", False), ("l0", "active latents (L0)", False),
          ("tokens_per_s", "tokens / s", False))


def read_metrics(path: str | Path) -> list[dict]:
  """The records of a metrics.jsonl; for a resumed run the last record of each step wins."""
  by_step = {}
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not JSON ({e.msg})") from e
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
  """One panel per logged metric against the step; None when nothing was logged."""
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  records = read_metrics(metrics_jsonl)
  panels = [p for p in PANELS if any(p[0] in r for r in records)]
  if not records or not panels:
    return None
  cols = min(4, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, (key, title, log) in zip(axes.flat, panels):
    points = [(r["step"], r[key]) for r in records if key in r]
    ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2)
    ax.set_title(title)
    ax.set_xlabel("step")
    if log and all(v > 0 for _, v in points):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.tight_layout()
  out_png = Path(out_png)
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return out_png


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m saejax.plots WORKDIR")
  written = training_curves(Path(sys.argv[1]) / "metrics.jsonl", Path(sys.argv[1]) / "curves.png")
  print(written or "no metrics logged")
