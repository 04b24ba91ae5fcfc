"""Quality benchmark: saejax sparse retrieval against the systems a user would pick instead.

Trains the three arms of configs/quality.py on the shared real training data, each with the same
data, batches and number of steps (the budget):

  sparse   saejax: MiniLM + TopK SAE (S=16,384, k=64) trained end to end
  dense    the same MiniLM fine-tuned without SAE (InfoNCE on cosine)
  frozen   CSR-style: the SAE trained on the frozen MiniLM

then evaluates them with `python -m saejax.eval` next to BM25 (bm25s) and the untouched dense
MiniLM on SciFact (test), Cranfield (test) and Debian descriptions (beir-dev), and checks the
issue's targets on the mean nDCG@10 over the three sets:

  sparse within 0.01 of dense-fine-tuned;  sparse above the untouched dense encoder;
  sparse above frozen by >= 0.02;          sparse above BM25 on SciFact.

    .venv/bin/python benchmarks/quality.py [--steps 200] [--out runs/quality]

A finished arm (summary.json at the requested step) is not retrained; an interrupted one resumes
from its checkpoint. Results: OUT/eval/results.json, OUT/eval/report.md (with plots), and the
target table printed last.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ARMS = ("sparse", "dense", "frozen")
DATASETS = (f"scifact={DATA / 'scifact'}:test", f"cranfield={DATA / 'cranfield'}:test",
            f"debian={DATA / 'debian-descriptions' / 'beir-dev'}:dev")


def trained_to(workdir: Path) -> int:
  summary = workdir / "summary.json"
  return json.loads(summary.read_text())["step"] if summary.is_file() else 0


def train(arm: str, steps: int, out: Path) -> float:
  """Train (or resume) one arm; returns the wall time spent now."""
  workdir = out / arm
  if trained_to(workdir) >= steps:
    print(f"{arm}: already trained to step {steps} in {workdir}", flush=True)
    return 0.0
  start = time.time()
  cmd = [sys.executable, "-m", "saejax.train", f"--config={REPO / 'configs/quality.py'}:{arm},{steps}",
         f"--workdir={workdir}"]
  print("$", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)
  return time.time() - start


def targets(results: dict) -> tuple[list[tuple[str, float, float, bool]], dict[str, float]]:
  """(what, value, threshold, met) for each target of the issue, and the mean nDCG@10 per system."""
  datasets = results["datasets"]
  mean = {name: sum(d["systems"][name]["ndcg@10"] for d in datasets.values()) / len(datasets)
          for name in next(iter(datasets.values()))["systems"]}
  scifact = datasets["scifact"]["systems"]
  rows = [
      ("mean nDCG@10: sparse - dense fine-tuned", mean["sparse"] - mean["dense-ft"], -0.01),
      ("mean nDCG@10: sparse - untouched dense", mean["sparse"] - mean["dense"], 0.0),
      ("mean nDCG@10: sparse - frozen SAE", mean["sparse"] - mean["frozen"], 0.02),
      ("SciFact nDCG@10: sparse - BM25", scifact["sparse"]["ndcg@10"] - scifact["bm25"]["ndcg@10"],
       0.0),
  ]
  return [(what, value, threshold, value > threshold if threshold >= 0 else value >= threshold)
          for what, value, threshold in rows], mean


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=200, help="training steps per arm (the budget)")
  p.add_argument("--out", default=str(REPO / "runs" / "quality"))
  p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
  p.add_argument("--max-docs", type=int, default=0, help="subsample each corpus (0: all)")
  args = p.parse_args()
  out = Path(args.out)
  wall = {arm: train(arm, args.steps, out) for arm in args.arms}
  print(f"training wall time (this invocation): { {a: round(s / 60, 1) for a, s in wall.items()} } "
        f"min", flush=True)

  from saejax.demo import minilm_dir
  from saejax.eval import __main__ as eval_cli
  argv = [f"--model=sparse={out / 'sparse'}", f"--model=dense-ft={out / 'dense'}",
          f"--model=frozen={out / 'frozen'}", *(f"--beir={d}" for d in DATASETS),
          f"--out={out / 'eval'}", "--baselines=bm25,dense", f"--dense-encoder={minilm_dir()}",
          "--max-doc-len=256", f"--max-docs={args.max_docs}", "--progress"]
  results = eval_cli.main(argv)
  checks, mean = targets(results)
  print("\nmean nDCG@10 over the three sets: " +
        ", ".join(f"{name} {value:.4f}" for name, value in mean.items()))
  print("| target | value | threshold | met |\n|---|---|---|---|")
  for what, value, threshold, met in checks:
    print(f"| {what} | {value:+.4f} | {threshold:+.2f} | {'yes' if met else '**no**'} |")
  (out / "eval" / "targets.json").write_text(json.dumps(
      {"mean_ndcg@10": mean, "targets": [dict(zip(("what", "value", "threshold", "met"), c))
                                         for c in checks]}, indent=2) + "\n")


if __name__ == "__main__":
  main()
