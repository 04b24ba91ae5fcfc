"""The evaluation report: results.json, report.md and PNG plots from `harness.evaluate`'s result.

Files written to the output directory (`write`):
  * ``results.json``: everything measured, plus when, where and by which command.
  * ``report.md``: per dataset, one table of every system (nDCG@10, Recall@100, MRR@10, active
    dimensions, expected FLOPs per query, dead / hot latents, times), the quality-vs-k table of
    each sparse system, and the plots.
  * ``quality_vs_k_<dataset>.png``: nDCG@10 of each sparse system against k (log2 axis), the
    other systems as horizontal lines.
  * ``latent_frequency_<dataset>.png``: per sparse system, how many latents fire in a given
    fraction of the documents (log-log; dead latents are counted in the legend, since a zero
    frequency has no place on a log axis).

matplotlib draws with the Agg backend (no display needed); it is imported only here.
"""

import datetime
import json
import os
import platform
from pathlib import Path

from saejax.errors import ConfigError
from saejax.eval.harness import file_stem

RESULTS = "results.json"
REPORT = "report.md"


def machine() -> dict:
  """Where the evaluation ran: host CPU and the JAX device."""
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
          "jax_device": getattr(device, "device_kind", str(device)), "jax_version": jax.__version__}


def out_directory(out_dir: str | Path) -> Path:
  """``out_dir``, created with its parents (``python -m saejax.eval`` calls it before any work).

  Raises:
    ConfigError: ``out_dir`` or one of its parents exists as a file.
  """
  out = Path(out_dir)
  blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
  if blocking is not None:
    raise ConfigError(f"cannot write the report to {out}: {blocking} is a file, not a directory")
  out.mkdir(parents=True, exist_ok=True)
  return out


def write(results: dict, out_dir: str | Path, *, command: str = "", plots: bool = True) -> dict:
  """Write results.json, report.md and (with ``plots``) the PNGs to ``out_dir``.

  Args:
    results: `harness.evaluate`'s result.
    out_dir: output directory (created).
    command: the command line that produced the results, for the record.
    plots: draw the PNG plots.

  Returns:
    The results with the run information (``created``, ``command``, ``machine``, ``files``)
    added, as written to results.json.
  """
  out = out_directory(out_dir)
  results = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "command": command, "machine": machine(), **results}
  files = {}
  if plots:
    for name, dataset in results["datasets"].items():
      files[name] = _plots(name, dataset, out, results["config"]["hot_frequency"])
  results["files"] = files
  (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
  (out / REPORT).write_text(markdown(results))
  return results


# ---------------------------------------------------------------------------------------------
# Markdown

def _num(value, digits: int = 4) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _flops(m: dict) -> str:
  if "flops_per_query" not in m:
    return "-"
  return f"{m['flops_per_query']:,.0f} ({m['flops_per_doc']:.3g} x N)"


def _dims(m: dict) -> str:
  if "active_dims_query" not in m:
    return "-"
  return f"{m['active_dims_query']:.1f} / {m['active_dims_doc']:.1f}"


def _pct(m: dict, key: str) -> str:
  return f"{100 * m[key]:.1f}%" if key in m else "-"


def dataset_table(dataset: dict) -> str:
  """The markdown table of every system on one dataset."""
  lines = ["| system | kind | nDCG@10 | Recall@100 | MRR@10 | active dims q / d | "
           "FLOPs / query | dead | hot | encode q + d (s) | index (s) | search (s) | QPS |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, m in dataset["systems"].items():
    k = f" (k {m['k_query']} / {m['k_doc']})" if m["kind"] == "sparse" else ""
    lines.append(
        f"| {name}{k} | {m['kind']} | {_num(m['ndcg@10'])} | {_num(m['recall@100'])} | "
        f"{_num(m['mrr@10'])} | {_dims(m)} | {_flops(m)} | {_pct(m, 'dead_fraction')} | "
        f"{_pct(m, 'hot_fraction')} | {m['encode_queries_s']:.1f} + {m['encode_docs_s']:.1f} | "
        f"{m['index_s']:.2f} | {m['search_s']:.3f} | {m['queries_per_s']:,.0f} |")
  return "\n".join(lines)


def truncation_line(dataset: dict) -> str:
  """Texts each tokenising system cut at its budget ("" when no system tokenises)."""
  counts = [f"{name} {m['truncated_queries']:,} / {m['truncated_docs']:,} (at {m['max_query_len']}"
            f" / {m['max_doc_len']} tokens)"
            for name, m in dataset["systems"].items() if "truncated_docs" in m]
  if not counts:
    return ""
  return (f"Texts cut at the token budget, queries / documents (of {dataset['num_queries']:,} / "
          f"{dataset['num_docs']:,}): " + "; ".join(counts) + ".")


_SWEEP_COLUMNS = "nDCG@10 | Recall@100 | MRR@10 | active dims q / d | FLOPs / query"


def _sweep_cells(row: dict) -> str:
  """The `_SWEEP_COLUMNS` cells of one sweep row."""
  return (f"{_num(row['ndcg@10'])} | {_num(row['recall@100'])} | {_num(row['mrr@10'])} | "
          f"{_dims(row)} | {_flops(row)}")


def sweep_table(name: str, m: dict) -> str:
  """The quality-vs-k table of one sparse system."""
  lines = [f"`{name}` (trained k = {m['k_train']}, S = {m['num_latents']:,}):", "",
           f"| k | {_SWEEP_COLUMNS} |", "|---|---|---|---|---|---|"]
  for row in m["k_sweep"]:
    lines.append(f"| {row['k']} | {_sweep_cells(row)} |")
  return "\n".join(lines)


def query_sweep_table(name: str, m: dict) -> str:
  """Queries at several k against one sparse system's documents as indexed ("" without rows)."""
  rows = m.get("k_query_sweep") or []
  if not rows:
    return ""
  lines = [f"`{name}`, documents at k = {rows[0]['k_doc']} (the index unchanged), queries at:", "",
           f"| query k | {_SWEEP_COLUMNS} | QPS |", "|---|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['k_query']} | {_sweep_cells(row)} | {row['queries_per_s']:,.0f} |")
  return "\n".join(lines)


def markdown(results: dict) -> str:
  """The whole report as markdown."""
  cfg = results["config"]
  mach = results["machine"]
  parts = [
      "# Retrieval evaluation", "",
      f"- created: {results['created']}",
      f"- command: `{results['command']}`" if results.get("command") else "- command: (library)",
      f"- machine: {mach['processor']}, {mach['cpu_count']} CPUs, JAX {mach['jax_version']} on "
      f"{mach['jax_backend']} ({mach['jax_device']})",
      f"- token budgets: queries {cfg['max_query_len']}, documents {cfg['max_doc_len']}"
      + (f" ({results['token_budgets']['from']})" if results.get("token_budgets") else "")
      + f"; batch {cfg['batch_size']}; {cfg['depth']} documents ranked per query",
      "- sparse scoring: " + (f"idf-weighted cosine of the codes, idf^{cfg['idf_power']:g} "
                              "(saejax.retrieval.index)" if cfg.get("idf_power") else
                              "cosine of the codes (no idf weighting)"),
      "",
      "Metrics: ir-measures (trec_eval definitions). FLOPs / query: the summed posting-list "
      "lengths of a query's active latents, averaged over queries (N x D for dense systems), "
      "and the same divided by the number of documents N. Dead: latents firing in no document; "
      f"hot: latents firing in more than {cfg['hot_frequency']:.0%} of documents. Encoding times "
      "include JIT compilation; systems on one encoder (a model and its encoder read densely, "
      "the untouched encoder and random TopK on it) and datasets with the same texts share one "
      "encoding, whose time each of them reports.",
  ]
  for name, d in results["datasets"].items():
    parts += ["", f"## {name}", "",
              f"`{d['path']}` split `{d['split']}`: {d['num_queries']:,} queries x "
              f"{d['num_docs']:,} documents"
              + (f" (corpus subsampled to {d['max_docs']:,})" if d["max_docs"] else "") + "."]
    if d["skipped_empty_queries"]:
      parts += ["", f"**Warning**: {d['skipped_empty_queries']} judged queries with empty text "
                    "were skipped."]
    parts += ["", dataset_table(d)]
    cut = truncation_line(d)
    if cut:
      parts += ["", cut]
    sparse = {n: m for n, m in d["systems"].items() if m["kind"] == "sparse"}
    if sparse:
      parts += ["", "### Quality vs k", ""]
      for system, m in sparse.items():
        parts += [sweep_table(system, m), ""]
      queries = [query_sweep_table(system, m) for system, m in sparse.items()]
      if any(queries):
        parts += ["### Denser queries, same index", ""]
        parts += [x for table in queries if table for x in (table, "")]
      files = results.get("files", {}).get(name, {})
      for key, title in (("quality_vs_k", "nDCG@10 vs k"),
                         ("latent_frequency", "latent document frequencies")):
        if key in files:
          parts += [f"![{title}]({files[key]})", ""]
  return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Plots

def _plots(name: str, dataset: dict, out: Path, hot_frequency: float) -> dict[str, str]:
  """Draw the dataset's plots; returns {plot kind: file name}."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  systems = dataset["systems"]
  sparse = {n: m for n, m in systems.items() if m["kind"] == "sparse"}
  if not sparse:
    return {}
  files = {}
  stem = file_stem(name)

  fig, ax = plt.subplots(figsize=(6, 4))
  for system, m in sparse.items():
    ks = [row["k"] for row in m["k_sweep"]]
    ax.plot(ks, [row["ndcg@10"] for row in m["k_sweep"]], marker="o", label=system)
  for i, (system, m) in enumerate(n for n in systems.items() if n[1]["kind"] != "sparse"):
    ax.axhline(m["ndcg@10"], linestyle="--", color=f"C{len(sparse) + i}", label=system)
  ax.set_xscale("log", base=2)
  ks = sorted({row["k"] for m in sparse.values() for row in m["k_sweep"]})
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("k (active latents per query and document)")
  ax.set_ylabel("nDCG@10")
  ax.set_title(f"{name}: quality vs k")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  files["quality_vs_k"] = f"quality_vs_k_{stem}.png"
  fig.tight_layout()
  fig.savefig(out / files["quality_vs_k"], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for system, m in sparse.items():
    h = m["latent_frequency"]
    ax.stairs(h["counts"], h["edges"], label=f"{system} ({h['dead']:,} dead)")
  ax.set_xscale("log")
  ax.set_yscale("symlog", linthresh=1)
  ax.axvline(hot_frequency, color="grey", linestyle=":", label="hot threshold")
  ax.set_xlabel("fraction of documents the latent fires in")
  ax.set_ylabel("latents")
  ax.set_title(f"{name}: latent document frequency (k = doc k)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  files["latent_frequency"] = f"latent_frequency_{stem}.png"
  fig.tight_layout()
  fig.savefig(out / files["latent_frequency"], dpi=100)
  plt.close(fig)
  return files
