"""Shared test setup: offline Hugging Face, real-data locations."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
