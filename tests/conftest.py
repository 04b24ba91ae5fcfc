"""Shared test setup: offline Hugging Face, one XLA compilation cache, real-data locations."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One XLA persistent compilation cache for the whole run: this process, the other xdist worker and
# every subprocess a test starts (they inherit the environment; JAX reads it when first imported,
# which is after this file). Most tests build the same tiny models, so a program that took over half
# a second to compile is loaded from disk after that. Not lower: eager ops compile too, and
# thousands of entries cost more to write than they save. No size cap: JAX's capped cache locks and
# lists the whole folder on every write (the suite took 40 min with one, against 25 warm without).
# Point JAX_COMPILATION_CACHE_DIR elsewhere to start cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) /
                                                       f"saejax-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# fp32 comparisons at fp32 precision wherever the suite runs: a GPU's fp32 matmuls default to TF32
# (on an H200, 10 tests of test_modernbert/bert/sae/losses missed their 1e-4..1e-5 tolerances by
# 1e-4..6e-3, RESULTS.md "GPU", session 35). XLA:CPU computes fp32 in full either way. The
# environment variable carries it to subprocesses; the update covers a jax imported already.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
  """../shared/data beside the checkout (real datasets); tests skip where it is absent."""
  if not DATA.is_dir():
    pytest.skip(f"real data folder {DATA} is absent (it lies beside the checkout in CI)")
  return DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
  """A tiny trained run's workdir (random BERT + SAE S=128, 2 steps), for tests of the tools that
  read runs (explorer, notebooks)."""
  import subprocess
  import sys
  workdir = tmp_path_factory.mktemp("tiny_run")
  subprocess.run([sys.executable, "-m", "saejax.train", "--config=tests/tiny_config.py:2",
                  f"--workdir={workdir}"], cwd=REPO, check=True, capture_output=True)
  return workdir
