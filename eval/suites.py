"""The evaluation suites: which BEIR sets, which baselines, at which k. One command each:

    .venv/bin/python eval/suites.py quickstart --model runs/quickstart
    .venv/bin/python eval/suites.py quality --model sparse=runs/quality/sparse [--model ...]
    .venv/bin/python eval/suites.py beir --model runs/quickstart --out runs/eval/beir
    .venv/bin/python eval/suites.py --list

A suite is a fixed argument list for ``python -m saejax.eval`` (the library CLI does the work and
writes results.json, report.md and the plots to ``--out``, default ``runs/eval/SUITE``); any other
flag is passed through to it (e.g. ``--max-docs 500`` for a quick look, ``--quiet``). Without
``--model`` a suite runs its baselines alone, the dense one on the untouched all-MiniLM-L6-v2.
`eval/quality.py` trains the quality benchmark's arms and evaluates them with the ``quality``
suite. BEIR sets come from ``../shared/data`` beside the checkout, the quickstart's from
``data/debian-quickstart``.
"""

import argparse
import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class Suite:
  """One evaluation suite, as ``python -m saejax.eval`` arguments."""
  about: str
  beir: tuple[str, ...]        # [NAME=]FOLDER[:SPLIT] per set
  baselines: str = "bm25,dense,random"
  k_sweep: str = ""            # the codes read again at each k ("" = the training k only)
  k_query_sweep: str = ""      # queries at each k against the documents as indexed ("" = none)
  max_doc_len: int | None = None  # None: the first run's trained budget
  max_docs: int = 0            # subsample each corpus to this many documents (0 = all)

  def args(self) -> list[str]:
    out = [f"--beir={b}" for b in self.beir] + [f"--baselines={self.baselines}"]
    out += [f"--k-sweep={self.k_sweep}"] if self.k_sweep else []
    out += [f"--k-query-sweep={self.k_query_sweep}"] if self.k_query_sweep else []
    out += [f"--max-doc-len={self.max_doc_len}"] if self.max_doc_len else []
    out += [f"--max-docs={self.max_docs}"] if self.max_docs else []
    return out


SUITES = {
    "quickstart": Suite(
        "the quickstart's held-aside Debian dev split, subsampled as after training "
        "(1,000 documents, seed 0)",
        (f"debian-quickstart={REPO / 'data' / 'debian-quickstart' / 'beir-dev'}:dev",),
        k_sweep="8,16,32,64", max_docs=1000),
    "quality": Suite(
        "the quality benchmark's three sets at the arms' training budget (documents 128 tokens), "
        "and SciFact's 104 test claims whose relevant abstracts no training pair holds",
        (f"scifact={DATA / 'scifact'}:test", f"cranfield={DATA / 'cranfield'}:test",
         f"debian={DATA / 'debian-descriptions' / 'beir-dev'}:dev",
         f"scifact-unseen={DATA / 'scifact'}:test~train"),
        k_sweep="8,16,32,64,128", k_query_sweep="64,128,256,512", max_doc_len=128),
    "beir": Suite(
        "every BEIR retrieval set in ../shared/data, CLIMATE-FEVER's derived set included",
        (f"scifact={DATA / 'scifact'}:test", f"cranfield={DATA / 'cranfield'}:test",
         f"debian={DATA / 'debian-descriptions' / 'beir-dev'}:dev",
         f"climate-fever={DATA / 'climate-fever'}:test"),
        k_sweep="16,32,64,128"),
}


def minilm_dir() -> Path:
  from saejax.hub.demo import minilm_dir as find  # pylint: disable=import-outside-toplevel
  return find()


def eval_argv(suite: Suite, models: list[str], out: str, extra: list[str]) -> list[str]:
  """The ``python -m saejax.eval`` arguments of `suite` for `models`."""
  argv = [f"--model={m}" for m in models] + suite.args() + [f"--out={out}"]
  if not models and "dense" in suite.baselines.split(","):
    argv.append(f"--dense-encoder={minilm_dir()}")
  return argv + extra


def main(argv: list[str] | None = None):
  p = argparse.ArgumentParser(prog="eval/suites.py", description=__doc__.split("\n")[0])
  p.add_argument("suite", nargs="?", choices=sorted(SUITES))
  p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                 help="training workdir or exported SparseEncoder (repeat to compare)")
  p.add_argument("--out", help="output directory (default runs/eval/SUITE)")
  p.add_argument("--list", action="store_true", help="list the suites and their arguments")
  args, extra = p.parse_known_args(argv)
  if args.list or not args.suite:
    for name, suite in SUITES.items():
      print(f"{name}: {suite.about}\n  python -m saejax.eval " + " ".join(suite.args()))
    return None
  from saejax.eval import __main__ as eval_cli  # pylint: disable=import-outside-toplevel
  out = args.out or str(REPO / "runs" / "eval" / args.suite)
  return eval_cli.main(eval_argv(SUITES[args.suite], args.model, out, extra))


if __name__ == "__main__":
  from saejax import cli  # pylint: disable=import-outside-toplevel
  cli.run(main)
