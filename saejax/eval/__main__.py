"""``python -m saejax.eval``: retrieval evaluation of saejax models and baselines on BEIR folders.

    python -m saejax.eval --model runs/quickstart --model dense=runs/dense_ablation \\
        --beir ../shared/data/scifact:test --beir ../shared/data/cranfield \\
        --out runs/eval/quickstart --baselines bm25,dense --dense-encoder "$(python -c \\
        'from saejax.hub.demo import minilm_dir; print(minilm_dir())')"

Writes DIR/results.json, DIR/report.md and DIR/*.png (see `saejax.eval.report`). Each ``--model``
is a training workdir (the dense ablation, ``sae.enabled=False``, is evaluated as a dense model)
or an exported sentence-transformers SparseEncoder directory, optionally named ``NAME=PATH``;
each ``--encoder-of NAME=PATH`` is such a sparse model's own encoder searched densely (cosine of
the pooled v its SAE codes), which splits a sparse model's loss into encoder and code.
Each ``--beir`` is ``[NAME=]FOLDER[:SPLIT]`` (split ``test`` by default); a split ``test~train``
keeps the test queries whose relevant documents no train query has (what a model trained on the
train pairs never saw: ``--beir scifact-unseen=../shared/data/scifact:test~train``). The "dense"
baseline is the untouched encoder of ``--dense-encoder`` (default: the first run's
``model.init_from``).

Token budgets: every system reads queries and documents at the same lengths, by default the ones
the first ``--model`` was trained with (a run's ``data.max_query_len`` / ``data.max_doc_len``, an
export's ``max_seq_length`` for both); baselines get the same. Models trained with other lengths
are named in a warning: one budget for all keeps the table a comparison of models, not of
budgets; pass ``--max-query-len`` / ``--max-doc-len`` to choose. Without a model the budgets are
`harness.HarnessConfig`'s defaults. The budgets used and where they came from are in
results.json (``token_budgets``, and per system ``max_query_len`` / ``max_doc_len`` after capping
at the encoder's position table, with the truncated text counts) and in report.md.

Progress: a line per stage (model loaded, dataset loaded, system started and done) and progress
bars while encoding go to stderr; ``--quiet`` leaves only warnings and errors.

The repository's eval/ folder holds the suites run with this command (``eval/suites.py``: which
BEIR sets, baselines and k) and the quality benchmark (``eval/quality.py``).
"""

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from saejax import cli, paths
from saejax.errors import ConfigError
from saejax.eval import harness, report
from saejax.retrieval.index import IDF_POWER

BASELINES = ("bm25", "dense", "random")
STAGES = logging.getLogger("saejax.eval")  # the harness logs its stages to a child of this


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ints") from None


def _baselines(text: str) -> tuple[str, ...]:
  names = tuple(x.strip() for x in text.split(",") if x.strip() and x.strip() != "none")
  unknown = [n for n in names if n not in BASELINES]
  if unknown:
    raise argparse.ArgumentTypeError(f"unknown baselines {unknown}; choose from {BASELINES}")
  return names


def parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m saejax.eval", description=__doc__.split("\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                 help="a training workdir or an exported SparseEncoder directory (repeatable)")
  p.add_argument("--encoder-of", action="append", default=[], metavar="NAME=DIR",
                 help="a sparse model's own encoder as a dense model (cosine of the pooled v its "
                 "SAE codes): what the code costs against the encoder it codes (repeatable)")
  p.add_argument("--beir", action="append", required=True, metavar="[NAME=]FOLDER[:SPLIT]",
                 help="a BEIR folder and qrels split (repeatable); SPLIT~SEEN: the queries of "
                 "SPLIT whose relevant documents are not relevant in SEEN")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--baselines", type=_baselines, default=BASELINES,
                 help="comma-separated from bm25,dense,random ('none' for none; default all). "
                 "random: random TopK of the untouched encoder at the first model's k (the floor)")
  p.add_argument("--random-latents", type=int, default=0,
                 help="S of the random TopK baseline (0: the first --model's, else 16384)")
  p.add_argument("--dense-encoder", default="",
                 help="Hugging Face directory of the untouched dense encoder")
  p.add_argument("--k-query", type=int, default=0,
                 help="latents per query (0: the model's own, its training k or an export's "
                 "--query-k)")
  p.add_argument("--k-doc", type=int, default=0, help="latents per document (0: training k)")
  p.add_argument("--k-sweep", type=_ints, default=(),
                 help="k values for quality vs k (default k, k/2, k/4, k/8)")
  p.add_argument("--k-query-sweep", type=_ints, default=(),
                 help="query k values searched against the documents at --k-doc (the index "
                 "unchanged): quality and QPS of denser queries")
  p.add_argument("--idf-power", type=float, default=IDF_POWER,
                 help="sparse systems score the idf-weighted cosine of their codes with this "
                 "power (saejax.retrieval.index; 0: the plain cosine they are trained with)")
  p.add_argument("--max-docs", type=int, default=0, help="subsample each corpus (0: all)")
  p.add_argument("--seed", type=int, default=0, help="seed of the subsample")
  p.add_argument("--max-query-len", type=int, default=None,
                 help="query token budget (default: the first --model's trained length)")
  p.add_argument("--max-doc-len", type=int, default=None,
                 help="document token budget (default: the first --model's trained length)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--quiet", action="store_true",
                 help="no stage lines or progress bars on stderr (warnings and errors still show)")
  p.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)  # now the default
  return p


class _StageFormatter(logging.Formatter):
  """``[eval   12.3s] message``: seconds since the command started."""

  def __init__(self, start: float):
    super().__init__()
    self.start = start

  def format(self, record: logging.LogRecord) -> str:
    return f"[eval {record.created - self.start:7.1f}s] {record.getMessage()}"


def show_stages(quiet: bool) -> None:
  """Stage lines to stderr (INFO), or only warnings with ``quiet``; idempotent."""
  for handler in [h for h in STAGES.handlers if isinstance(h.formatter, _StageFormatter)]:
    STAGES.removeHandler(handler)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(_StageFormatter(time.time()))
  STAGES.addHandler(handler)
  STAGES.setLevel(logging.WARNING if quiet else logging.INFO)
  STAGES.propagate = False  # a root handler installed by a library would print each line twice


def token_budgets(args: argparse.Namespace, systems: list) -> dict:
  """{"max_query_len", "max_doc_len", "from"}: the flags where given, else the first model's
  trained lengths, else the harness defaults (see the module docstring)."""
  trained = [(s.name, s.trained_lens) for s in systems if getattr(s, "trained_lens", None)]
  default = harness.HarnessConfig()
  query, doc = default.max_query_len, default.max_doc_len
  source = "defaults (no --model records its trained lengths)"
  if trained:
    name, (query, doc) = trained[0]
    source = f"trained lengths of {name}"
    others = [f"{n} {q}/{d}" for n, (q, d) in trained[1:] if (q, d) != (query, doc)]
    if others and (args.max_query_len is None or args.max_doc_len is None):
      STAGES.warning("models trained with other token budgets (query/document): %s; every system "
                     "reads %s's %d/%d; pass --max-query-len/--max-doc-len to choose",
                     ", ".join(others), name, query, doc)
  if args.max_query_len is not None or args.max_doc_len is not None:
    source = "--max-query-len/--max-doc-len" + (
        f" (the other from the {source})" if None in (args.max_query_len, args.max_doc_len) else "")
  return {"max_query_len": query if args.max_query_len is None else args.max_query_len,
          "max_doc_len": doc if args.max_doc_len is None else args.max_doc_len, "from": source}


def build_systems(args: argparse.Namespace) -> list:
  """The systems the arguments name: models first, then the baselines."""
  systems, loaded = [], {}  # loaded: a --model's system by path, whose encoder --encoder-of shares
  for i, spec in enumerate(args.model, start=1):
    name, path = harness.split_name(spec)
    STAGES.info("loading model %d/%d: %s", i, len(args.model), path)
    systems.append(harness.load_system(path, name))
    loaded.setdefault(str(paths.resolve(path, "--model")), systems[-1])  # one spelling per place
  for spec in args.encoder_of:
    name, path = harness.split_name(spec)
    model = loaded.get(str(paths.resolve(path, "--encoder-of")))
    if not isinstance(model, harness.SparseSystem):  # not loaded, or a dense run (refused there)
      STAGES.info("loading the encoder of %s", path)
      model = path
    systems.append(harness.encoder_system(model, name or f"{Path(path).name}-encoder"))
  if {"dense", "random"} & set(args.baselines):
    STAGES.info("loading baselines: %s", ", ".join(args.baselines))
  if "bm25" in args.baselines:
    systems.append(harness.BM25System())
  if {"dense", "random"} & set(args.baselines):
    encoder = args.dense_encoder or next(
        (s.init_from for s in systems if getattr(s, "init_from", "")), "")
    if not encoder:
      raise ConfigError(f"--baselines {','.join(args.baselines)} needs the untouched encoder, but "
                        "no --dense-encoder was given and no --model run has a model.init_from")
    if "dense" in args.baselines:
      systems.append(harness.dense_system(encoder))
      encoder = systems[-1]  # the floor shares its encoder module: each text is encoded once
    if "random" in args.baselines:
      sparse = [s for s in systems if s.kind == "sparse"]
      k = args.k_doc or (sparse[0].k if sparse else 64)
      if args.random_latents < 0:
        raise ConfigError(f"--random-latents={args.random_latents} must be >= 1 (0: the first "
                          "--model's S)")
      s = args.random_latents or (sparse[0].model.sae.config.num_latents if sparse else 16384)
      systems.append(harness.random_topk_system(encoder, k, s))
  return systems


def check_k(args: argparse.Namespace, systems: list) -> None:
  """Refuse a --k-query / --k-doc above a sparse system's S before anything is encoded."""
  for system in (s for s in systems if s.kind == "sparse"):
    num_latents = system.model.sae.config.num_latents
    for flag, k in (("--k-query", args.k_query), ("--k-doc", args.k_doc)):
      if k > num_latents:
        raise ConfigError(f"{flag}={k} exceeds the {num_latents} latents (S) of system "
                          f"{system.name!r}; choose k <= {num_latents} (0: the model's own k)")


def main(argv: list[str] | None = None) -> dict:
  """Run the evaluation; returns what was written to results.json."""
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  specs = [harness.BeirSpec.parse(b, max_docs=args.max_docs, seed=args.seed) for b in args.beir]
  for model in [*args.model, *args.encoder_of]:  # a wrong path fails now, not after minutes of
    harness.model_kind(harness.split_name(model)[1])  # loading and encoding
  for spec in specs:
    spec.check()
  report.out_directory(args.out)  # a file in the way fails now, not after the evaluation
  show_stages(args.quiet)
  systems = build_systems(args)
  check_k(args, systems)
  budgets = token_budgets(args, systems)
  STAGES.info("token budgets: queries %d, documents %d (%s)", budgets["max_query_len"],
              budgets["max_doc_len"], budgets["from"])
  cfg = harness.HarnessConfig(k_query=args.k_query, k_doc=args.k_doc, k_sweep=args.k_sweep,
                              k_query_sweep=args.k_query_sweep, idf_power=args.idf_power,
                              max_query_len=budgets["max_query_len"],
                              max_doc_len=budgets["max_doc_len"], batch_size=args.batch_size,
                              progress=not args.quiet)
  results = {**harness.evaluate(systems, specs, cfg), "token_budgets": budgets}
  command = shlex.join(["python", "-m", "saejax.eval", *argv])
  results = report.write(results, args.out, command=command, plots=not args.no_plots)
  STAGES.info("wrote %s: %s", args.out, ", ".join([report.RESULTS, report.REPORT, *(
      f for files in results["files"].values() for f in files.values())]))
  print(report.markdown(results), flush=True)
  return results


if __name__ == "__main__":
  cli.run(main)
