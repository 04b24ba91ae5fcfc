"""notebooks/: each jupytext notebook runs top to bottom on a tiny trained run and tiny data, writes
its plot (a PNG) to the folder given in SAEJAX_OUT, and plots what an independent recomputation
here (NumPy search, statistics and SAE, ir_measures scores) says it should; and each has its
.ipynb (built by `python notebooks/build.py`, with outputs) in sync with its source."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from idf_reference import idf_weighted  # tests/ is on sys.path (pytest's rootdir-relative import)

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
BEIR = REPO / "data/debian-quickstart/beir-dev"
MAX_DOCS = 60
KS = (4, 8)
NOTEBOOKS = {"latent_inspection.py": "latent_inspection.png", "steering.py": "steering.png",
             "sparsity_tradeoff.py": "sparsity_tradeoff.png"}

# Appended to each notebook (in memory): what its figure `fig` shows, read back from matplotlib.
DUMP_FIGURE = """
import json as _json
_axes = [{"lines": [line.get_xydata().tolist() for line in ax.get_lines()],
          "bars": [float(p.get_height()) for p in ax.patches],
          "points": [c.get_offsets().tolist() for c in ax.collections]} for ax in fig.axes]
_j = globals().get("j")  # the steered latent (steering.py)
(OUT / "figure.json").write_text(_json.dumps({"axes": _axes, "j": None if _j is None else int(_j)}))
"""


@pytest.fixture(scope="module")
def run_dir(tiny_run) -> Path:
  return tiny_run


def test_every_notebook_is_tested():
  assert sorted(p.name for p in (REPO / "notebooks").glob("*.py")
                if p.name != "build.py") == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_ipynb_in_sync(name):
  """notebooks/X.ipynb exists, records the SHA-256 of X.py, and has X.py's cells (as jupytext
  reads them) after its generated header: an edited .py or a hand-edited .ipynb fails here."""
  py = REPO / "notebooks" / name
  ipynb = py.with_suffix(".ipynb")
  rebuild = f"rebuild it: python notebooks/build.py {py.stem}"
  assert ipynb.is_file(), f"{ipynb.relative_to(REPO)} is missing; {rebuild}"
  built = nbformat.read(ipynb, as_version=4)
  recorded = built.metadata.get("saejax", {}).get("source_sha256")
  assert recorded == hashlib.sha256(py.read_bytes()).hexdigest(), (
      f"{ipynb.relative_to(REPO)} was built from another version of {name}; {rebuild}")
  header, *cells = built.cells
  assert header.cell_type == "markdown" and "generated-from-source" in header.metadata.get(
      "tags", []) and name in header.source and "python notebooks/build.py" in header.source
  source = jupytext.read(py).cells
  assert [(c.cell_type, c.source) for c in cells] == [(c.cell_type, c.source) for c in source], (
      f"{ipynb.relative_to(REPO)}'s cells differ from {name}'s; {rebuild}")
  for c in cells:  # every code cell ran, in order
    if c.cell_type == "code":
      assert c.execution_count is not None, f"{ipynb.relative_to(REPO)} has unexecuted cells"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name, run_dir, tmp_path, monkeypatch):
  # The kernel inherits this process' environment: that is how the parameters reach it.
  monkeypatch.setenv("SAEJAX_RUN", str(run_dir))
  monkeypatch.setenv("SAEJAX_BEIR", str(BEIR))
  monkeypatch.setenv("SAEJAX_SPLIT", "dev")
  monkeypatch.setenv("SAEJAX_MAX_DOCS", str(MAX_DOCS))
  monkeypatch.setenv("SAEJAX_OUT", str(tmp_path))
  monkeypatch.setenv("SAEJAX_KS", ",".join(map(str, KS)))  # two points: fewer compilations
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  nb = jupytext.read(REPO / "notebooks" / name)
  nb.cells.append(nbformat.v4.new_code_cell(DUMP_FIGURE))
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  png = tmp_path / NOTEBOOKS[name]
  assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  figure = json.loads((tmp_path / "figure.json").read_text())
  CHECKS[name](figure, Reference(run_dir))


# ---------------------------------------------------------------------------------------------
# The reference: the same run and data, recomputed without the notebook's code path

class Reference:
  """The tiny run's codes of the notebooks' data, and NumPy versions of what the notebooks plot."""

  def __init__(self, run_dir: Path):
    from saejax.data.beir import load_beir
    from saejax.hub import trained
    self.config, self.model, self.tokenizer = trained.load_run(run_dir)
    self.data = load_beir(BEIR, "dev", max_docs=MAX_DOCS)
    self.num_latents = self.model.sae.config.num_latents

  def _cfg(self, kind: str):
    from saejax.retrieval.encode import EncodeConfig
    return EncodeConfig(max_len=self.config.data[f"max_{kind}_len"], progress=False)

  def dense_codes(self, texts, kind: str, k: int | None = None) -> np.ndarray:
    """[N, S] codes as the index receives them (from the model's own encode_sparse)."""
    from saejax.retrieval.encode import encode_sparse
    codes = encode_sparse(self.model, self.tokenizer, texts, k, self._cfg(kind))
    dense = np.zeros((len(texts), self.num_latents))
    np.add.at(dense, (np.arange(len(texts))[:, None], codes.indices), codes.values)
    return dense

  def pooled(self) -> np.ndarray:
    from saejax.retrieval.encode import encode, mean_pooled
    (v,), _ = encode(mean_pooled(self.model.encoder), self.tokenizer, self.data.docs,
                     self._cfg("doc"))
    return np.asarray(v, np.float64)

  def search(self, q: np.ndarray, d: np.ndarray, depth: int = 10):
    """Exact top-`depth` by the idf-weighted cosine saejax searches with (`idf_weighted`, NumPy);
    a document sharing no positive score is not returned (id -1), as in the sparse index."""
    q, d = idf_weighted(q, d)
    scores = q @ d.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    top = np.take_along_axis(scores, ids, 1)
    return np.where(top > 0, top, -np.inf), np.where(top > 0, ids, -1)

  def ndcg(self, scores, ids) -> float:
    from saejax.eval import quickeval  # ir_measures underneath: the reference scorer
    return quickeval.evaluate(self.data.qrels, quickeval.to_run(
        self.data, np.maximum(ids, 0), scores))["ndcg@10"]


def _check_latent_inspection(figure: dict, ref: Reference):
  d = ref.dense_codes(ref.data.docs, "doc")
  fires = d > 0
  frequency = fires.mean(0)
  live = frequency > 0
  mean_activation = d.sum(0)[live] / fires.sum(0)[live]
  hist, scatter = figure["axes"]
  np.testing.assert_array_equal(hist["bars"], np.histogram(np.log10(frequency[live]), bins=30)[0])
  np.testing.assert_allclose(sorted(map(tuple, scatter["points"][0])),
                             sorted(zip(frequency[live], mean_activation)), rtol=1e-5)


def _check_sparsity_tradeoff(figure: dict, ref: Reference):
  quality, reconstruction = figure["axes"]
  [ndcg_line], [fvu_line] = quality["lines"], reconstruction["lines"]  # one run: one S
  assert [k for k, _ in ndcg_line] == [k for k, _ in fvu_line] == list(KS)
  v = ref.pooled()
  params = {name: np.asarray(getattr(ref.model.sae, name)[...], np.float64)
            for name in ("w_enc", "b_lat", "b_pre", "w_dec")}
  pre = (v - params["b_pre"]) @ params["w_enc"] + params["b_lat"]
  for (k, ndcg), (_, fvu) in zip(ndcg_line, fvu_line):
    k = int(k)
    scores, ids = ref.search(ref.dense_codes(ref.data.queries, "query", k),
                             ref.dense_codes(ref.data.docs, "doc", k))
    assert ndcg == pytest.approx(ref.ndcg(scores, ids), abs=1e-6)
    # FVU from a NumPy TopK SAE: z = ReLU(TopK(pre)), v_hat = z W_dec + b_pre.
    kth = -np.sort(-pre, axis=1)[:, k - 1:k]
    z = np.where(pre >= kth, np.maximum(pre, 0), 0)
    v_hat = z @ params["w_dec"] + params["b_pre"]
    assert fvu == pytest.approx(((v - v_hat) ** 2).sum() / ((v - v.mean(0)) ** 2).sum(),
                                rel=1e-3)


def _check_steering(figure: dict, ref: Reference):
  fraction, quality = figure["axes"]
  j = figure["j"]
  d = ref.dense_codes(ref.data.docs, "doc")
  scores, ids = ref.search(ref.dense_codes(ref.data.queries, "query"), d)
  # The notebook steers the latent present in most top-10 results (among each document's k ids).
  from saejax.retrieval.encode import encode_sparse
  doc_ids = encode_sparse(ref.model, ref.tokenizer, ref.data.docs, None, ref._cfg("doc")).indices
  assert j == np.bincount(doc_ids[ids[ids >= 0]].ravel(), minlength=ref.num_latents).argmax()
  returned = (ids >= 0).sum(1)
  hits = ((d[np.maximum(ids, 0), j] > 0) & (ids >= 0)).sum(1)
  unsteered = np.mean(np.divide(hits, returned, out=np.zeros(len(ids)), where=returned > 0))
  (suppress, boost), (suppress_ndcg, boost_ndcg) = fraction["lines"], quality["lines"]
  for line in (suppress, boost):  # strength 0 is the unsteered search
    assert line[0] == pytest.approx([0.0, unsteered])
  for line in (suppress_ndcg, boost_ndcg):
    assert line[0] == pytest.approx([0.0, ref.ndcg(scores, ids)], abs=1e-6)
  # Steering moves the share the way it says: at the strongest setting (2x the query's weight)
  # boosting has not lowered it and suppressing has lowered it (the unsteered share is 0.44 here).
  assert boost[-1][1] >= unsteered > suppress[-1][1]


CHECKS = {"latent_inspection.py": _check_latent_inspection,
          "sparsity_tradeoff.py": _check_sparsity_tradeoff, "steering.py": _check_steering}
