"""Quality benchmark: saejax sparse retrieval against the systems a user would pick instead.

Trains the three arms of configs/quality.py on the shared real training data, each with the same
data, batches and number of steps (the budget):

  sparse   saejax: MiniLM + TopK SAE (S=16,384, k=64) trained end to end
  dense    the same MiniLM fine-tuned without SAE (InfoNCE on cosine)
  frozen   CSR-style: the SAE trained on the frozen MiniLM

then evaluates them with `python -m saejax.eval` next to BM25 (bm25s), the untouched dense
MiniLM and the sparse arm's own encoder read densely ("sparse-encoder") on the ``quality`` suite
of eval/suites.py (SciFact test, Cranfield test, Debian descriptions beir-dev, k from 8 to 128;
and SciFact's claims whose relevant abstracts no training pair holds, as a fourth line); random
TopK is scored at the sparse arm's S. It checks the issue's targets on the mean nDCG@10 over
the three sets:

  sparse within 0.01 of dense-fine-tuned;  sparse above the untouched dense encoder;
  sparse above frozen by >= 0.02;          sparse above BM25 on SciFact;
  sparse above random TopK (the untouched encoder, no training, same k) by >= 0.10.

    .venv/bin/python eval/quality.py [--steps 600] [--out runs/quality] [--set KEY=VALUE]

A finished arm (summary.json at the requested step) is not retrained; an interrupted one resumes
from its checkpoint. The frozen arm starts from the sparse arm's stage-1 head
(`saejax.train.stage1`: the same inputs, so the same head) when the sparse arm kept one. Results:
OUT/eval/results.json, OUT/eval/report.md (with plots), and the target table printed last.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from suites import SUITES

REPO = Path(__file__).resolve().parents[1]
ARMS = ("sparse", "dense", "frozen")
# The sets, the k sweep (the codes read at each k from one encoding) and the token budget the arms
# were trained with (configs/quality.py), which every system gets.
SUITE = SUITES["quality"]
# The targets' mean: the suite's fourth set, SciFact's test claims whose relevant abstracts are not
# among the training pairs ("scifact-unseen"), is reported beside them, not averaged in.
MEAN_SETS = ("scifact", "cranfield", "debian")
UNSEEN = "scifact-unseen"


def quality_config():
  """configs/quality.py as a module: its arms (`get_config`) and budget (`STEPS`)."""
  spec = importlib.util.spec_from_file_location("quality_config", REPO / "configs" / "quality.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def trained_to(workdir: Path) -> int:
  summary = workdir / "summary.json"
  return json.loads(summary.read_text())["step"] if summary.is_file() else 0


def _check_overrides(workdir: Path, overrides: list[str]) -> None:
  """A workdir trained (or started) with other values of the overridden keys is not reused."""
  config_file = workdir / "config.json"
  if not config_file.is_file():
    return
  config = json.loads(config_file.read_text())
  for override in overrides:
    key, _, text = override.partition("=")
    value = config
    for part in key.split("."):
      value = value.get(part) if isinstance(value, dict) else None
    try:
      wanted = json.loads(text.lower() if text in ("True", "False") else text)
    except json.JSONDecodeError:
      wanted = text
    if value != wanted:
      raise SystemExit(f"error: {workdir} was trained with {key}={value!r}, not {text}; "
                       "choose another --out")


def train(arm: str, steps: int, out: Path, overrides: list[str] = ()) -> float:
  """Train (or resume) one arm (``overrides``: ``KEY=VALUE`` config overrides, e.g.
  ``data.batch_by_source=True``); returns the wall time spent now."""
  workdir = out / arm
  _check_overrides(workdir, overrides)
  if trained_to(workdir) >= steps:
    print(f"{arm}: already trained to step {steps} in {workdir}", flush=True)
    return 0.0
  start = time.time()
  cmd = [sys.executable, "-m", "saejax.train", f"--config={REPO / 'configs/quality.py'}:{arm},{steps}",
         f"--workdir={workdir}", *(f"--config.{o}" for o in overrides)]
  from saejax.train import stage1
  if arm == "frozen" and stage1.exists(out / "sparse"):
    # The two arms' stage 1 is the same (tests/test_train.py): the frozen arm loads the sparse
    # arm's head instead of training it again (~25 min here).
    cmd.append(f"--config.warmstart.init_from={out / 'sparse'}")
  print("$", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)
  return time.time() - start


def floor_latents(out: Path, overrides: list[str] = ()) -> int:
  """S of the random TopK floor: the sparse arm's (as trained in OUT, else as configured), so the
  floor is like for like with the model it is the floor of."""
  config_file = out / "sparse" / "config.json"
  if config_file.is_file():
    return int(json.loads(config_file.read_text())["sae"]["num_latents"])
  for override in overrides:
    key, _, value = override.partition("=")
    if key == "sae.num_latents":
      return int(value)
  return quality_config().get_config("sparse").sae.num_latents


def _mean_ndcg(datasets: dict, sets: tuple[str, ...]) -> dict[str, float]:
  """Mean nDCG@10 over ``sets`` of every system evaluated on the first of them."""
  return {name: sum(datasets[d]["systems"][name]["ndcg@10"] for d in sets) / len(sets)
          for name in datasets[sets[0]]["systems"]}


def targets(results: dict) -> tuple[list[tuple[str, float, float, bool]], dict[str, float]]:
  """(what, value, threshold, met) for each target of the issue, and the mean nDCG@10 per system."""
  datasets = results["datasets"]
  mean = _mean_ndcg(datasets, MEAN_SETS)
  scifact = datasets["scifact"]["systems"]
  sci = {name: system["ndcg@10"] for name, system in scifact.items()}
  rows = [  # (what, table, system, other system, threshold)
      ("mean nDCG@10: sparse - dense fine-tuned", mean, "sparse", "dense-ft", -0.01),
      ("mean nDCG@10: sparse - untouched dense", mean, "sparse", "dense", 0.0),
      ("mean nDCG@10: sparse - frozen SAE", mean, "sparse", "frozen", 0.02),
      ("SciFact nDCG@10: sparse - BM25", sci, "sparse", "bm25", 0.0),
      ("mean nDCG@10: sparse - random TopK (no training)", mean, "sparse", "random-topk", 0.10),
  ]
  checks = []
  for what, table, a, b, threshold in rows:
    if a in table and b in table:  # `--arms` may have trained only some of the arms
      value = table[a] - table[b]
      checks.append((what, value, threshold, value > threshold if threshold >= 0 else
                     value >= threshold))
  return checks, mean


def unseen_mean(results: dict) -> dict[str, float]:
  """Mean nDCG@10 per system with SciFact's unseen claims in place of all of SciFact: the three
  sets' mean without the recall of training documents ({} when the suite had no unseen line)."""
  datasets = results["datasets"]
  return _mean_ndcg(datasets, (UNSEEN, *MEAN_SETS[1:])) if UNSEEN in datasets else {}


def query_k_means(results: dict) -> dict[int, dict[str, float]]:
  """Mean nDCG@10 over the three sets with the documents as indexed (the training k) and queries
  at each k of the suite's query sweep: {query k: {system: mean}}, for the systems swept so on
  every set."""
  sets = [results["datasets"][d]["systems"] for d in MEAN_SETS]
  by_k: dict[int, dict[str, float]] = {}
  for name in sets[0]:
    rows = [{r["k_query"]: r["ndcg@10"] for r in s.get(name, {}).get("k_query_sweep", [])}
            for s in sets]
    for k in set.intersection(*(set(r) for r in rows)):
      by_k.setdefault(k, {})[name] = sum(r[k] for r in rows) / len(rows)
  return dict(sorted(by_k.items()))


def evaluate_group(name: str, argv: list[str], out: Path) -> dict:
  """`python -m saejax.eval` for one group of systems into OUT/eval/NAME (kept: a rerun reuses it,
  so each arm can be evaluated as soon as it is trained, unless what it evaluated changed: other
  arguments, or a model trained further since, e.g. a rerun with more --steps)."""
  from saejax.eval import __main__ as eval_cli
  group_dir = out / "eval" / name
  inputs, record = _group_inputs(argv), group_dir / "evaluated.json"
  if (group_dir / "results.json").is_file():
    if record.is_file() and json.loads(record.read_text()) == inputs:
      print(f"{name}: evaluated already in {group_dir}", flush=True)
      return json.loads((group_dir / "results.json").read_text())
    print(f"{name}: {group_dir} evaluated other inputs than these ({inputs}); evaluating again",
          flush=True)
  results = eval_cli.main([*SUITE.args(), *argv, f"--out={group_dir}"])  # argv overrides the suite
  record.write_text(json.dumps(inputs, indent=2) + "\n")
  return results


def _group_inputs(argv: list[str]) -> dict:
  """What a group's results depend on besides the suite: its arguments and the step each training
  run among them stands at (`trained_to`)."""
  runs = {}
  for arg in argv:
    path = Path(arg.split("=")[-1])
    if (path / "checkpoints").is_dir():
      runs[str(path)] = trained_to(path)
  return {"argv": list(argv), "trained_to": runs}


def merge(groups: list[dict]) -> dict:
  """One result with every group's systems side by side per dataset."""
  merged = json.loads(json.dumps(groups[0]))
  for group in groups[1:]:
    for name, dataset in group["datasets"].items():
      merged["datasets"][name]["systems"].update(dataset["systems"])
  for key in ("created", "command", "machine", "files"):
    merged.pop(key, None)
  return merged


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=quality_config().STEPS,
                 help="training steps per arm (the budget; default configs/quality.py's STEPS)")
  p.add_argument("--out", default=str(REPO / "runs" / "quality"))
  p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override for every arm, e.g. --set data.batch_by_source=True")
  args = p.parse_args()
  for override in args.set:
    key, sep, _ = override.partition("=")
    if not (sep and key):
      p.error(f"--set {override!r}: expected KEY=VALUE, e.g. data.batch_by_source=True")
  out = Path(args.out)
  wall = {arm: train(arm, args.steps, out, args.set) for arm in args.arms}
  print(f"training wall time (this invocation): { {a: round(s / 60, 1) for a, s in wall.items()} } "
        f"min", flush=True)

  from saejax.eval import report
  from saejax.hub.demo import minilm_dir
  names = {"sparse": "sparse", "dense": "dense-ft", "frozen": "frozen"}
  # The sparse arm's encoder alone (dense cosine of the v its SAE codes) splits its gap to dense-ft
  # into what the encoder lost and what the 64-latent code loses on top.
  encoder = {"sparse": [f"--encoder-of=sparse-encoder={out / 'sparse'}"]}
  groups = [evaluate_group(names[arm], [f"--model={names[arm]}={out / arm}", *encoder.get(arm, []),
                                        "--baselines=none"], out)
            for arm in ARMS if trained_to(out / arm)]
  groups.append(evaluate_group("baselines", [f"--dense-encoder={minilm_dir()}",
                                             f"--random-latents={floor_latents(out, args.set)}"],
                               out))
  results = report.write(merge(groups), out / "eval", command=" ".join(sys.argv))
  print(report.markdown(results))
  checks, mean = targets(results)
  print("\nmean nDCG@10 over the three sets: " +
        ", ".join(f"{name} {value:.4f}" for name, value in mean.items()))
  generalisation = unseen_mean(results)
  if generalisation:
    print("mean nDCG@10 with SciFact's unseen claims in place of SciFact: " +
          ", ".join(f"{name} {value:.4f}" for name, value in generalisation.items()))
  denser = query_k_means(results)
  for k, means in denser.items():
    print(f"mean nDCG@10, documents at the training k (the index unchanged), queries at k = {k}: " +
          ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
  print("| target | value | threshold | met |\n|---|---|---|---|")
  for what, value, threshold, met in checks:
    print(f"| {what} | {value:+.4f} | {threshold:+.2f} | {'yes' if met else '**no**'} |")
  targets_rows = [dict(zip(("what", "value", "threshold", "met"), c)) for c in checks]
  (out / "eval" / "targets.json").write_text(json.dumps(
      {"mean_ndcg@10": mean, "mean_ndcg@10_unseen_scifact": generalisation,
       "mean_ndcg@10_by_query_k": denser, "targets": targets_rows}, indent=2) + "\n")


if __name__ == "__main__":
  main()
