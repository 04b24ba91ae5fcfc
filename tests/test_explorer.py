"""saejax.interpret.explorer: the command on a tiny trained run, another model's codes refused,
and the page loaded in a real headless Chromium (JavaScript ran: the latents are in the DOM;
screenshot saved).

Chromium comes from Debian's package (``apt-get install -y chromium``); the browser test skips
with a reason where it is absent.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from saejax.errors import DataError
from saejax.hub import trained
from saejax.interpret import explorer, latents as interpret

REPO = Path(__file__).resolve().parents[1]
BEIR = REPO / "data/debian-quickstart/beir-dev"
ARGS = ["--beir", str(BEIR), "--split", "dev", "--max-docs", "40", "--max-queries", "20",
        "--evidence-latents", "4"]


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
  return tiny_run


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("report") / "report.html"
  explorer.main(["--run", str(run_dir), "--out", str(out), *ARGS])
  return out


def _payload(page: Path) -> dict:
  text = page.read_text()
  return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', text,
                              re.S).group(1).replace("<\\/", "</"))


def test_report_content(report, run_dir):
  data = _payload(report)
  _, model, _ = trained.load_run(run_dir)
  assert data["model"]["fingerprint"] == interpret.model_fingerprint(model)
  assert data["model"]["num_docs"] == 40 and len(data["queries"]) == 20
  latents = data["latents"]
  assert latents and all(0 <= latent["id"] < 128 for latent in latents)
  freqs = [latent["freq"] for latent in latents]
  assert freqs == sorted(freqs, reverse=True)
  # The first latents' top documents carry token evidence whose spans index into the text.
  spans = [(t["doc"], s) for t in latents[0]["top"] if t["spans"] for s in t["spans"]]
  assert spans
  for doc, (a, b, w) in spans:
    assert 0 <= a < b <= len(data["docs"][doc]) and 0 < w <= 1
  assert "<svg id='histogram'" in report.read_text()


def test_refuses_another_models_codes(run_dir, report, tmp_path):
  data = _payload(report)
  n = data["model"]["num_docs"]
  codes = interpret.StoredCodes(np.ones((n, 8), np.float32), np.zeros((n, 8), np.int32), 128,
                                "0123456789abcdef")
  path = interpret.save_codes(tmp_path / "codes.npz", codes)
  with pytest.raises(interpret.FingerprintError, match="not by this model"):
    explorer.main(["--run", str(run_dir), "--out", str(tmp_path / "x.html"), "--codes",
                   str(path), *ARGS])
  # The right model's fingerprint but codes of another corpus size: refused too.
  right = interpret.StoredCodes(codes.values[:5], codes.indices[:5], 128,
                                data["model"]["fingerprint"])
  interpret.save_codes(path, right)
  with pytest.raises(DataError, match="5 documents but 40"):
    explorer.main(["--run", str(run_dir), "--out", str(tmp_path / "x.html"), "--codes",
                   str(path), *ARGS])
  assert not (tmp_path / "x.html").exists()


def _chromium() -> str:
  for name in ("chromium", "chromium-browser", "google-chrome"):
    if shutil.which(name):
      return shutil.which(name)
  pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium)")


def test_page_in_headless_chromium(report, tmp_path):
  browser = _chromium()
  flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=10000", "--window-size=1400,1000"]
  dom = subprocess.run([*flags, "--dump-dom", report.as_uri()], capture_output=True, text=True,
                       timeout=120, check=True).stdout
  data = _payload(report)
  # Rows exist only after the page's JavaScript rendered them from the embedded JSON.
  rows = re.findall(r'<tr class="latent-row[^"]*" data-latent="(\d+)"', dom)
  assert [int(r) for r in rows] == [latent["id"] for latent in data["latents"]]
  assert 'class="doc top-doc"' in dom              # the first latent's top documents
  assert 'class="chip active-latent"' in dom       # the first query's active latents
  assert 'class="doc result"' in dom               # and its ranked documents
  shot = tmp_path / "explorer.png"
  subprocess.run([*flags, f"--screenshot={shot}", report.as_uri()], capture_output=True,
                 timeout=120, check=True)
  assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
