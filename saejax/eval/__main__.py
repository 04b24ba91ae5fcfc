"""``python -m saejax.eval``: retrieval evaluation of saejax models and baselines on BEIR folders.

    python -m saejax.eval --model runs/quickstart --model dense=runs/dense_ablation \\
        --beir ../shared/data/scifact:test --beir ../shared/data/cranfield \\
        --out eval/quickstart --baselines bm25,dense --dense-encoder "$(python -c \\
        'from saejax.demo import minilm_dir; print(minilm_dir())')"

Writes DIR/results.json, DIR/report.md and DIR/*.png (see `saejax.eval.report`). Each ``--model``
is a training workdir (the dense ablation, ``sae.enabled=False``, is evaluated as a dense model)
or an exported sentence-transformers SparseEncoder directory, optionally named ``NAME=PATH``.
Each ``--beir`` is ``[NAME=]FOLDER[:SPLIT]`` (split ``test`` by default). The "dense" baseline is
the untouched encoder of ``--dense-encoder`` (default: the first run's ``model.init_from``).
"""

import argparse
import logging
import shlex
import sys

from saejax.errors import ConfigError
from saejax.eval import harness, report

BASELINES = ("bm25", "dense", "random")


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
  p = argparse.ArgumentParser(prog="python -m saejax.eval", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                 help="a training workdir or an exported SparseEncoder directory (repeatable)")
  p.add_argument("--beir", action="append", required=True, metavar="[NAME=]FOLDER[:SPLIT]",
                 help="a BEIR folder and qrels split (repeatable)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--baselines", type=_baselines, default=BASELINES,
                 help="comma-separated from bm25,dense,random ('none' for none; default all). "
                 "random: random TopK of the untouched encoder at the first model's k (the floor)")
  p.add_argument("--dense-encoder", default="",
                 help="Hugging Face directory of the untouched dense encoder")
  p.add_argument("--k-query", type=int, default=0, help="latents per query (0: training k)")
  p.add_argument("--k-doc", type=int, default=0, help="latents per document (0: training k)")
  p.add_argument("--k-sweep", type=_ints, default=(),
                 help="k values for quality vs k (default k, k/2, k/4, k/8)")
  p.add_argument("--max-docs", type=int, default=0, help="subsample each corpus (0: all)")
  p.add_argument("--seed", type=int, default=0, help="seed of the subsample")
  p.add_argument("--max-query-len", type=int, default=64)
  p.add_argument("--max-doc-len", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  p.add_argument("--progress", action="store_true", help="show progress bars")
  return p


def build_systems(args: argparse.Namespace) -> list:
  """The systems the arguments name: models first, then the baselines."""
  systems = []
  for spec in args.model:
    name, path = harness.split_name(spec)
    systems.append(harness.load_system(path, name))
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
    if "random" in args.baselines:
      sparse = [s for s in systems if s.kind == "sparse"]
      k = args.k_doc or (sparse[0].k if sparse else 64)
      s = sparse[0].model.sae.config.num_latents if sparse else 16384
      systems.append(harness.random_topk_system(encoder, k, s))
  return systems


def main(argv: list[str] | None = None) -> dict:
  """Run the evaluation; returns what was written to results.json."""
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  cfg = harness.HarnessConfig(k_query=args.k_query, k_doc=args.k_doc, k_sweep=args.k_sweep,
                              max_query_len=args.max_query_len, max_doc_len=args.max_doc_len,
                              batch_size=args.batch_size, progress=args.progress)
  specs = [harness.BeirSpec.parse(b, max_docs=args.max_docs, seed=args.seed) for b in args.beir]
  results = harness.evaluate(build_systems(args), specs, cfg)
  command = shlex.join(["python", "-m", "saejax.eval", *argv])
  results = report.write(results, args.out, command=command, plots=not args.no_plots)
  print(report.markdown(results), flush=True)
  return results


if __name__ == "__main__":
  from saejax import cli
  cli.run(main)
