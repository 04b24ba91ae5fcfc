"""notebooks/: each jupytext notebook runs top to bottom on a tiny trained run and tiny data, and
writes its plot (a PNG) to the folder given in SAEJAX_OUT."""

import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"latent_inspection.py": "latent_inspection.png", "steering.py": "steering.png",
             "sparsity_tradeoff.py": "sparsity_tradeoff.png"}


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
  return tiny_run


def test_every_notebook_is_tested():
  assert sorted(p.name for p in (REPO / "notebooks").glob("*.py")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, run_dir, tmp_path, monkeypatch):
  # The kernel inherits this process' environment: that is how the parameters reach it.
  monkeypatch.setenv("SAEJAX_RUN", str(run_dir))
  monkeypatch.setenv("SAEJAX_BEIR", str(REPO / "data/debian-quickstart/beir-dev"))
  monkeypatch.setenv("SAEJAX_SPLIT", "dev")
  monkeypatch.setenv("SAEJAX_MAX_DOCS", "60")
  monkeypatch.setenv("SAEJAX_OUT", str(tmp_path))
  monkeypatch.setenv("SAEJAX_KS", "4,8")  # two points of the trade-off: fewer compilations
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  nb = jupytext.read(REPO / "notebooks" / name)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  png = tmp_path / NOTEBOOKS[name]
  assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert png.stat().st_size > 5000  # a drawn figure, not an empty canvas
