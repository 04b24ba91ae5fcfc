"""eval/: every suite is a valid `python -m saejax.eval` command over folders that exist, and the
quality benchmark evaluates with the quality suite."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from saejax.eval import __main__ as eval_cli

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / "eval" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


suites = _load("suites")


@pytest.mark.parametrize("name", sorted(suites.SUITES))
def test_every_suite_is_an_eval_command_over_existing_folders(name):
  suite = suites.SUITES[name]
  args = eval_cli.parser().parse_args(suites.eval_argv(suite, ["runs/a", "b=runs/b"], "out", []))
  assert args.model == ["runs/a", "b=runs/b"] and args.out == "out"
  assert len(args.beir) == len(suite.beir) and set(args.baselines) == {"bm25", "dense", "random"}
  folders = [Path(b.partition("=")[2].rpartition(":")[0]) for b in suite.beir]
  shared = [f for f in folders if suites.DATA in f.parents]
  if shared and not suites.DATA.is_dir():
    pytest.skip(f"{suites.DATA} (the shared data beside the checkout) is absent")
  for folder in folders:
    assert (folder / "corpus.jsonl").is_file() and (folder / "qrels").is_dir(), folder


def test_passed_through_flags_override_the_suite():
  argv = suites.eval_argv(suites.SUITES["quality"], ["runs/a"], "out", ["--max-doc-len", "64"])
  assert eval_cli.parser().parse_args(argv).max_doc_len == 64


def test_the_quality_benchmark_evaluates_with_the_quality_suite():
  assert _load("quality").SUITE is suites.SUITES["quality"]


def test_list_names_every_suite():
  out = subprocess.run([sys.executable, str(REPO / "eval" / "suites.py"), "--list"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert [line.split(":")[0] for line in out.stdout.splitlines()
          if not line.startswith(" ")] == list(suites.SUITES)


def _results(**means):
  """Three datasets where each system scores the same nDCG@10 everywhere, and a SciFact-unseen
  line where each scores 0 (reported beside the targets, never averaged into them)."""
  systems = {name: {"ndcg@10": value} for name, value in means.items()}
  datasets = {d: {"systems": systems} for d in ("scifact", "cranfield", "debian")}
  zero = {name: {"ndcg@10": 0.0} for name in means}
  return {"datasets": {**datasets, "scifact-unseen": {"systems": zero}}}


def test_quality_targets_hand_computed_and_only_for_the_arms_present():
  quality = _load("quality")
  checks, mean = quality.targets(_results(**{
      "sparse": 0.62, "dense-ft": 0.625, "dense": 0.63, "frozen": 0.605, "bm25": 0.61,
      "random-topk": 0.50}))
  got = {what.split(": ")[1]: (round(value, 6), met) for what, value, _, met in checks}
  assert got == {"sparse - dense fine-tuned": (-0.005, True),  # within 0.01
                 "sparse - untouched dense": (-0.01, False),
                 "sparse - frozen SAE": (0.015, False),        # must beat frozen by 0.02
                 "sparse - BM25": (0.01, True),
                 "sparse - random TopK (no training)": (0.12, True)}
  assert mean["sparse"] == pytest.approx(0.62)
  # `eval/quality.py --arms sparse`: only the rows whose two systems were evaluated
  checks, _ = quality.targets(_results(sparse=0.6, bm25=0.5, dense=0.55, **{"random-topk": 0.4}))
  assert [what.split(": ")[1] for what, *_ in checks] == [
      "sparse - untouched dense", "sparse - BM25", "sparse - random TopK (no training)"]


def test_quality_refuses_to_reuse_an_arm_trained_with_other_overrides(tmp_path):
  quality = _load("quality")
  (tmp_path / "config.json").write_text(json.dumps(
      {"data": {"batch_by_source": True}, "loss": {"bank_size": 0}}))
  quality._check_overrides(tmp_path, ["data.batch_by_source=True", "loss.bank_size=0"])
  with pytest.raises(SystemExit, match=r"trained with loss.bank_size=0, not 2048"):
    quality._check_overrides(tmp_path, ["loss.bank_size=2048"])
  with pytest.raises(SystemExit, match=r"data.batch_by_source=True, not False"):
    quality._check_overrides(tmp_path, ["data.batch_by_source=False"])
  quality._check_overrides(tmp_path / "fresh", ["loss.bank_size=2048"])  # not trained yet: fine


def test_quality_starts_the_frozen_arm_from_the_sparse_arms_kept_stage_one(tmp_path, monkeypatch):
  """Only the frozen arm, and only once the sparse arm kept a stage-1 head (`saejax.train.stage1`;
  that their inputs match is tests/test_train.py's)."""
  quality = _load("quality")
  commands = []
  monkeypatch.setattr(quality.subprocess, "run", lambda cmd, **kwargs: commands.append(cmd))
  quality.train("frozen", 150, tmp_path)
  (tmp_path / "sparse" / "stage1").mkdir(parents=True)
  (tmp_path / "sparse" / "stage1" / "head.json").write_text("{}")
  quality.train("dense", 150, tmp_path)
  quality.train("frozen", 150, tmp_path)
  flag = f"--config.warmstart.init_from={tmp_path / 'sparse'}"
  assert [flag in cmd for cmd in commands] == [False, False, True]


def test_quality_floor_has_the_sparse_arms_size(tmp_path):
  """Random TopK is scored at the S the sparse arm was trained with, else configured with."""
  quality = _load("quality")
  spec = importlib.util.spec_from_file_location("config", REPO / "configs" / "quality.py")
  config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config)
  # nothing trained: configs/quality.py's S
  assert quality.floor_latents(tmp_path) == config.get_config("sparse").sae.num_latents
  assert quality.floor_latents(tmp_path, ["loss.bank_size=0", "sae.num_latents=4096"]) == 4096
  (tmp_path / "sparse").mkdir()
  (tmp_path / "sparse" / "config.json").write_text(json.dumps({"sae": {"num_latents": 2048}}))
  assert quality.floor_latents(tmp_path, ["sae.num_latents=4096"]) == 2048


def test_quality_unseen_mean_puts_unseen_scifact_in_place_of_scifact():
  quality = _load("quality")
  results = _results(sparse=0.6, dense=0.5)  # scifact-unseen: 0 for every system
  results["datasets"]["cranfield"] = {"systems": {"sparse": {"ndcg@10": 0.3},
                                                  "dense": {"ndcg@10": 0.4}}}
  assert quality.unseen_mean(results) == pytest.approx({"sparse": (0 + 0.3 + 0.6) / 3,
                                                        "dense": (0 + 0.4 + 0.5) / 3})
  del results["datasets"]["scifact-unseen"]
  assert quality.unseen_mean(results) == {}


def test_quality_query_k_means_hand_computed():
  quality = _load("quality")
  results = _results(sparse=0.6, bm25=0.5)
  for i, name in enumerate(("scifact", "cranfield", "debian")):  # fresh dicts per set
    results["datasets"][name] = {"systems": {
        "sparse": {"ndcg@10": 0.6, "k_query_sweep": [{"k_query": 64, "ndcg@10": 0.6},
                                                     {"k_query": 256, "ndcg@10": 0.6 + i / 10}]},
        "random-topk": {"ndcg@10": 0.5, "k_query_sweep": [{"k_query": 256, "ndcg@10": 0.4}]},
        "bm25": {"ndcg@10": 0.5}}}
  got = quality.query_k_means(results)
  assert list(got) == [64, 256]
  assert got[64] == pytest.approx({"sparse": 0.6})
  assert got[256] == pytest.approx({"sparse": 0.7, "random-topk": 0.4})  # (0.6 + 0.7 + 0.8) / 3
  del results["datasets"]["debian"]["systems"]["sparse"]["k_query_sweep"][1]  # not on every set
  got = quality.query_k_means(results)
  assert got[64] == pytest.approx({"sparse": 0.6})
  assert got[256] == pytest.approx({"random-topk": 0.4})


def test_an_evaluation_is_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
  """eval/quality.py keeps each group's evaluation for a rerun, but not once the arm it scored has
  trained further (a rerun with more --steps) or the group's arguments changed. The evaluation
  itself is stood in for by a counter (what is tested is the reuse decision)."""
  quality = _load("quality")
  calls = []

  def evaluation(argv):
    calls.append(argv)
    out = Path(argv[-1].split("=", 1)[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"evaluation": len(calls)}))
    return {"evaluation": len(calls)}

  monkeypatch.setattr(eval_cli, "main", evaluation)
  run = tmp_path / "sparse"
  (run / "checkpoints").mkdir(parents=True)
  (run / "summary.json").write_text(json.dumps({"step": 150}))
  argv = [f"--model=sparse={run}"]
  assert quality.evaluate_group("sparse", argv, tmp_path) == {"evaluation": 1}
  assert quality.evaluate_group("sparse", argv, tmp_path) == {"evaluation": 1}  # reused
  (run / "summary.json").write_text(json.dumps({"step": 600}))  # the arm trained further
  assert quality.evaluate_group("sparse", argv, tmp_path) == {"evaluation": 2}
  assert quality.evaluate_group("sparse", [*argv, "--k-doc=32"], tmp_path) == {"evaluation": 3}
  assert len(calls) == 3
