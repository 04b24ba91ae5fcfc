"""PNG plots of a training run, for people who would rather look than read metrics.jsonl.

    python -m saejax.train.curves WORKDIR        # writes WORKDIR/curves.png

`saejax.train` calls `training_curves` when a run ends; evaluation plots live in
`saejax.eval.report`. WORKDIR may be a gs:// URL (`saejax.paths`).
"""

import io
import json
import os
from collections.abc import Sequence

from etils import epath

from saejax import cli, paths
from saejax.errors import DataError

# (metric keys, panel title, log scale): the panels of `training_curves`, when the run logged them.
# Several keys share a panel (one line each). The latent-health panels make a collapsing dictionary
# visible while it happens: dead (no firing in 10 x S/k texts) and hot (> 10% of texts) fractions,
# the median / max firing rate, encoder column-norm and latent-bias percentiles.
PANELS = ((("loss",), "total loss", True), (("info_nce", "dense/info_nce", "distill_kl"),
           "InfoNCE / distillation", False),
          (("accuracy",), "in-batch accuracy", False), (("fvu",), "FVU (reconstruction)", True),
          (("pos_score", "neg_score"), "positive / negative scores", False),
          (("dead_fraction_window", "dead_fraction", "hot_fraction"),
           "dead (10 S/k texts), AuxK-dead, hot", False),
          (("freq_median", "freq_max"), "latent firing rate: median, max", True),
          (("enc_norm_p5", "enc_norm_p50", "enc_norm_p95"), "encoder column norm p5/50/95", False),
          (("b_lat_p5", "b_lat_p50", "b_lat_p95"), "latent bias p5/50/95", False),
          (("v_norm",), "norm of pooled v", False), (("l0",), "active latents (L0)", False),
          (("tokens_per_s",), "tokens / s", False))


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl; for a resumed run the last record of each step wins."""
  by_step = {}
  with paths.resolve(path, "metrics file").open() as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not JSON ({e.msg})") from e
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def training_curves(metrics_jsonl: str | os.PathLike,
                    out_png: str | os.PathLike) -> epath.Path | None:
  """One panel per logged metric against the step; None when nothing was logged."""
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt
  records = read_metrics(metrics_jsonl)
  panels = [p for p in PANELS if any(key in r for key in p[0] for r in records)]
  if not records or not panels:
    return None
  cols = min(4, len(panels))
  rows = -(-len(panels) // cols)
  # Fixed margins (inches turned into fractions) rather than tight_layout, which draws the whole
  # figure once more to measure it: that was a third of the plot's time, paid by every run.
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  fig.subplots_adjust(left=0.8 / (4 * cols), right=1 - 0.15 / (4 * cols), bottom=0.5 / (3 * rows),
                      top=1 - 0.3 / (3 * rows), wspace=0.35, hspace=0.5)
  for ax, (keys, title, log) in zip(axes.flat, panels):
    values = []
    for key in keys:
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        ax.plot([s for s, _ in points], [v for _, v in points], lw=1.2, label=key)
        values += [v for _, v in points]
    ax.set_title(title)
    ax.set_xlabel("step")
    if log and all(v > 0 for v in values):
      ax.set_yscale("log")
    if len(keys) > 1:
      ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  png = io.BytesIO()  # drawn in memory, then written in one go: a file on disk or an object
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  out_png = paths.resolve(out_png, "plot file")
  out_png.write_bytes(png.getvalue())
  return out_png


def main(argv: Sequence[str] | None = None) -> epath.Path | None:
  """``python -m saejax.train.curves WORKDIR``: WORKDIR/metrics.jsonl drawn into
  WORKDIR/curves.png."""
  parser = cli.ArgumentParser(prog="python -m saejax.train.curves", description=main.__doc__)
  parser.add_argument("workdir", help="a training workdir (holds metrics.jsonl), or its gs:// URL")
  workdir = paths.resolve(parser.parse_args(argv).workdir, "workdir")
  written = training_curves(workdir / "metrics.jsonl", workdir / "curves.png")
  print(written or "no metrics logged")
  return written


if __name__ == "__main__":
  cli.run(main)
