"""saejax.interpret.explorer: the command on a tiny trained run, another model's codes refused,
the embedded data inert whatever the documents hold, and the page loaded in a real headless
Chromium (JavaScript ran: the latents are in the DOM; screenshot saved).

Chromium comes from Debian's package (``apt-get install -y chromium``); the browser test skips
with a reason where it is absent.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saejax.data.beir import load_beir
from saejax.errors import ConfigError, DataError
from saejax.hub import trained
from saejax.interpret import explorer, latents as interpret
from saejax.sae.embedder import Embedder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_eval import _make_run  # noqa: E402  (a step-0 training workdir, SAE or dense)
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


def _data_block(html: str) -> str:
  """The embedded JSON as an HTML parser delimits it: up to the first "</script"."""
  return re.search(r'<script id="data" type="application/json">(.*?)</script', html,
                   re.S).group(1)


def _payload(page: Path) -> dict:
  return json.loads(_data_block(page.read_text()))


# Document texts that break a page whose embedded JSON keeps "<" as is: "<!--" then "<script"
# puts the HTML parser in a state where the page's own </script> no longer ends the data (and no
# "-->" follows here to take it back out).
HOSTILE = ["Example config: <!-- <script> here", "</script><script>alert(1)</script>",
           "a && b > c", "line\u2028separator\u2029paragraph", "plain"]


def _hand_payload(docs: list[str]) -> dict:
  """A `collect`-shaped payload built by hand: latent 1 fires in every document."""
  return {"title": "t <b>", "model": {"fingerprint": "f", "num_latents": 4, "k": 1,
                                      "num_docs": len(docs), "num_queries": 1, "dead": 0,
                                      "hot": 0, "label_quality": "q"},
          "latents": [{"id": 1, "label": "audio <!--", "terms": ["audio"], "freq": 1.0,
                       "mean": 1.0, "max": 1.0, "auc": None, "family": 0,
                       "top": [{"doc": 0, "act": 1.0, "spans": None}]}],
          "labels": {"1": "audio <!--"}, "docs": docs,
          "doc_codes": [[[1], [1.0]] for _ in docs],
          "queries": [{"text": "q <script>", "idx": [1], "val": [1.0]}],
          "histogram_svg": "<svg></svg>"}


def test_embedded_json_cannot_leave_its_script():
  """No "<" (nor ">", "&", U+2028, U+2029) inside the data element, whatever the documents hold,
  and the element parses back to the payload: the HTML parser, which reacts to "<" only within a
  script, ends the element where the template ends it."""
  payload = _hand_payload(HOSTILE)
  block = _data_block(explorer.render(payload))
  assert json.loads(block) == payload
  assert not set(block) & set("<>&\u2028\u2029"), sorted(set(block) & set("<>&\u2028\u2029"))


def _numpy_sae(model) -> dict[str, np.ndarray]:
  return {n: np.asarray(getattr(model.sae, n)[...], np.float64)
          for n in ("w_enc", "b_lat", "b_pre")}


def _pre(sae: dict, v: np.ndarray) -> np.ndarray:
  """The SAE's pre-activations, in NumPy: (v - b_pre) W_enc + b_lat."""
  return (np.asarray(v, np.float64) - sae["b_pre"]) @ sae["w_enc"] + sae["b_lat"]


def _batch(encodings, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, valid) of tokenised texts, right-padded to the longest."""
  lengths = np.array([len(e.ids) for e in encodings])
  ids = np.full((len(encodings), lengths.max()), pad, np.int32)
  for row, e in enumerate(encodings):
    ids[row, :len(e.ids)] = e.ids
  return ids, np.arange(lengths.max())[None] < lengths[:, None]


def test_report_content(report, run_dir):
  """The page's latents, frequencies, top documents and token evidence equal what NumPy computes
  from the run's weights: the documents cut and tokenised here, the pooled vectors through a NumPy
  TopK SAE, then counted, ranked and left out one token at a time."""
  from saejax.data.tokenizer import pad_id, truncating_copy
  data = _payload(report)
  config, model, tokenizer = trained.load_run(run_dir)
  assert data["model"]["fingerprint"] == interpret.model_fingerprint(model)
  assert data["model"]["num_docs"] == 40 and len(data["queries"]) == 20
  docs = list(load_beir(BEIR, "dev", max_docs=40).docs)
  max_len, k = int(config.data.max_doc_len), model.sae.config.k
  shown = explorer.ExplorerConfig()  # top_docs, evidence_docs and doc_chars as the command has them
  doc_chars = shown.doc_chars
  assert data["docs"] == [d[:doc_chars] for d in docs]
  cut = truncating_copy(tokenizer, max_len)
  encodings = cut.encode_batch(docs)
  sae = _numpy_sae(model)
  pre = _pre(sae, model.dense(*_batch(encodings, pad_id(tokenizer))))
  z = np.where(pre >= -np.sort(-pre, axis=1)[:, k - 1:k], np.maximum(pre, 0), 0)  # ReLU(TopK)
  z /= np.linalg.norm(z, axis=1, keepdims=True)  # the unit-norm codes of normalize_codes
  counts = (z > 0).sum(0)
  live = np.flatnonzero(counts)
  order = live[np.argsort(-counts[live], kind="stable")]  # most frequent first, ties by id
  latents = data["latents"]
  assert [latent["id"] for latent in latents] == order.tolist()
  assert [latent["freq"] for latent in latents] == pytest.approx(counts[order] / 40)
  for latent in latents:
    fired = z[:, latent["id"]][z[:, latent["id"]] > 0]
    assert latent["mean"] == pytest.approx(fired.mean(), rel=1e-4)
    assert latent["max"] == pytest.approx(fired.max(), rel=1e-4)
    top = np.argsort(-z[:, latent["id"]], kind="stable")[:min(shown.top_docs, fired.size)]
    assert [t["doc"] for t in latent["top"]] == top.tolist(), latent["id"]
    assert [t["act"] for t in latent["top"]] == pytest.approx(z[top, latent["id"]], abs=1e-4)
  # Token evidence of the first 4 latents' (--evidence-latents) top 3 documents (evidence_docs):
  # pre(text) - pre(text without token t) per token (special tokens 0), over its peak; the spans
  # are the character offsets of the tokens that push the latent up, within the shown characters.
  checked = 0
  for latent in latents[:4]:
    j = latent["id"]
    for top in latent["top"][:shown.evidence_docs]:
      enc = encodings[top["doc"]]
      n = len(enc.ids)
      ids = np.tile(np.asarray(enc.ids, np.int32), (n + 1, 1))
      valid = np.concatenate([~np.eye(n, dtype=bool), np.ones((1, n), bool)])  # last: whole text
      p = _pre(sae, model.dense(ids, valid))[:, j]
      w = np.where(np.asarray(enc.special_tokens_mask, bool), 0.0, p[-1] - p[:n])
      if w.max() <= 0:
        assert top["spans"] is None
        continue
      ref = {(a, b): x / w.max() for (a, b), x in zip(enc.offsets, w) if b > a and b <= doc_chars}
      got = {(a, b): x for a, b, x in top["spans"]}
      assert set(got) <= set(ref), (j, top["doc"], sorted(set(got) - set(ref)))
      assert {key for key, x in ref.items() if x > 2e-3} <= set(got), (j, top["doc"])
      for key, x in got.items():
        assert x == pytest.approx(ref[key], abs=2e-3), (j, top["doc"], key)
      checked += len(got)
  assert checked > 0
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


def test_refuses_a_run_without_sae_and_negative_max_queries(run_dir, tmp_path):
  out = tmp_path / "x.html"
  with pytest.raises(ConfigError, match=r"--max-queries=-1 must be >= 0"):
    explorer.main(["--run", str(run_dir), "--out", str(out), *ARGS, "--max-queries", "-1"])
  # A real dense ablation's workdir (sae.enabled=False, written as `saejax.train` writes one): it
  # loads as an Embedder whose sae is None, and the explorer refuses it by name.
  dense = _make_run(tmp_path / "dense_ablation", sae=False)
  assert trained.load_run(dense)[1].sae is None
  with pytest.raises(ConfigError, match=f"--run {re.escape(str(dense))} has no SAE"):
    explorer.main(["--run", str(dense), "--out", str(out), *ARGS])
  assert not out.exists()


def _chromium() -> str:
  for name in ("chromium", "chromium-browser", "google-chrome"):
    if shutil.which(name):
      return shutil.which(name)
  pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium)")


def _browser_flags() -> list[str]:
  return [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--virtual-time-budget=10000", "--window-size=1400,1000"]


def _dom(page: Path) -> str:
  """The page's DOM after its JavaScript ran."""
  return subprocess.run([*_browser_flags(), "--dump-dom", page.as_uri()], capture_output=True,
                        text=True, timeout=120, check=True).stdout


def test_page_in_headless_chromium(report, tmp_path):
  flags = _browser_flags()
  dom = _dom(report)
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


def test_hostile_documents_in_headless_chromium(tmp_path):
  """Documents holding "<!-- <script>" and "</script>" leave the page working: its script ran
  (the latent row, the top document and all five results are in the DOM) and shows them as text."""
  page = explorer.write_report(tmp_path / "hostile.html", _hand_payload(HOSTILE))
  dom = _dom(page)
  assert re.findall(r'<tr class="latent-row[^"]*" data-latent="(\d+)"', dom) == ["1"]
  scores = re.findall(r'<div class="doc result"><span class="act">score ([\d.]+)</span>', dom)
  assert scores == ["1.000"] * len(HOSTILE)  # every document holds latent 1 at 1.0, as the query
  assert "Example config: &lt;!-- &lt;script&gt; here" in dom
  assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_evidence_spans_count_as_javascript_does():
  """The page slices a document with JavaScript's string offsets (UTF-16 code units); the
  tokenizer's offsets count code points. Before an emoji or a math letter (two units in
  JavaScript) they differ: the span of "audio" must still cut "audio" out as the page cuts it."""
  import jax.numpy as jnp
  from flax import nnx
  from saejax.data.tokenizer import load_tokenizer
  from saejax.hub.demo import minilm_dir
  from saejax.sae import topk as sae_lib

  class BagOfEmbeddings(nnx.Module):
    """Token states are table rows: latent 3 reads the "audio" row alone."""

    def __init__(self, table):
      self.table = nnx.Param(jnp.asarray(table))

    def __call__(self, ids, valid):
      return self.table[...][ids]

  tok = load_tokenizer(minilm_dir(), vocab_size=30522)
  table = np.zeros((30522, 4), np.float32)
  table[tok.token_to_id("audio"), 0] = table[tok.token_to_id("video"), 1] = 1.0
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=4, num_latents=8, k=2, k_aux=2,
                                      dead_after_tokens=10), rngs=nnx.Rngs(0))
  w = np.zeros((4, 8), np.float32)
  w[0, 3] = w[1, 5] = 1.0
  sae.w_enc.set_value(jnp.asarray(w))
  model = Embedder(BagOfEmbeddings(table), sae)
  docs = ["\U0001F3B5\U0001F3B5 music \U0001D465 audio player", "video and audio tools",
          "plain audio mixer", "video editor"]
  payload = explorer.collect(model, tok, docs, ["audio"],
                             config=explorer.ExplorerConfig(latents=8, top_docs=4,
                                                            evidence_latents=8, evidence_docs=4,
                                                            max_doc_len=32, batch_size=4))
  [audio] = [latent for latent in payload["latents"] if latent["id"] == 3]
  checked = 0
  for top in audio["top"]:
    units = payload["docs"][top["doc"]].encode("utf-16-le")  # the page's string
    best = max(top["spans"], key=lambda span: span[2])
    assert units[2 * best[0]:2 * best[1]].decode("utf-16-le") == "audio", (top, best)
    checked += top["doc"] == 0
  assert checked == 1  # the document with the emoji was among them
