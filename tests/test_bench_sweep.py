"""benchmarks/sweep.py's latent-health count (shared with benchmarks/health.py), by hand."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def sweep():
  sys.path.insert(0, str(BENCHMARKS))
  try:
    import sweep as module  # noqa: PLC0415
    return module
  finally:
    sys.path.remove(str(BENCHMARKS))


def test_latent_health_counts_firing_values_only(sweep):
  values = np.array([[1.0, 0.0], [0.5, 0.2], [0.0, 0.0]])  # a zero value is not a firing
  indices = np.array([[0, 1], [0, 2], [3, 1]])
  got = sweep.latent_health(values, indices, 5)
  # firings per latent: 0 -> 2 texts, 2 -> 1, and 1, 3, 4 never (1 and 3 only with value 0)
  assert got["never_fire"] == pytest.approx(3 / 5)
  assert got["max_mixed_freq"] == pytest.approx(2 / 3)
  assert got["health_hot"] == pytest.approx(2 / 5)  # latents 0 and 2 fire in > 10% of 3 texts


def test_health_rows_are_the_same_draw_every_time(sweep):
  rows = sweep.health_rows(50_000)
  assert len(rows) == sweep.HEALTH_TEXTS == len(set(rows.tolist()))
  np.testing.assert_array_equal(rows, sweep.health_rows(50_000))
  assert rows.max() < 50_000


def test_run_sae_refuses_a_cache_of_another_encoder(sweep, tmp_path):
  # A cache embedded by run A's encoder (embed_cache.py --run A) is not run B's input; a cache of
  # the untouched MiniLM is not the input of a run whose encoder was trained. Both are refused
  # before any checkpoint is read.
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"optim": {"freeze_encoder": False}}))
  cache = tmp_path / "cache"
  cache.mkdir()
  with pytest.raises(SystemExit, match="embed_cache.py --run"):
    sweep.run_sae(str(run), cache)
  (cache / "encoder.json").write_text(json.dumps({"run": str(tmp_path / "other")}))
  with pytest.raises(SystemExit, match="holds the embeddings of run .*other's encoder"):
    sweep.run_sae(str(run), cache)
