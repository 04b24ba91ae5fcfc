"""A readable label for every live latent, from its top documents, without a language model.

Method: class-based TF-IDF (c-TF-IDF; Grootendorst 2022, "BERTopic", sec. 3.3) with one class per
latent. The class of latent j is its ``top_docs`` most activating documents; a term's weight is

    w(t, j) = tf(t, j) * log(1 + N / df(t))

where tf(t, j) is the fraction of j's top documents containing t and df(t) the number of the N
corpus documents containing t. Terms in fewer than ``max(2, min_doc_fraction * top_docs)`` of the
top documents are dropped, so one document's package name cannot label a latent. The label is the
``label_terms`` best terms. Words come from scikit-learn's `CountVectorizer` (lower-cased word
tokens that start with a letter, English stop words removed), counted once per document.

Quality, measured on documents the labels never saw: the corpus is split at random into a fitting
part (``1 - heldout_fraction``) and a held-out part. For each latent the held-out documents are
scored by the label's words they contain (sum of the words' idf), and the score's ROC AUC against
"the latent fires in this document" says how well the label predicts activation (0.5: not at all,
1: perfectly). A latent with no held-out document on one side gets no AUC.

An LLM labeller can be plugged in (`Labeller`: latent id, top texts and c-TF-IDF terms in, label
out); it is off by default, never called by the tests, and its labels are scored the same way.

Labels are stored as ``latent_labels.json`` (`LatentLabels.save`, `load_labels`) together with the
fingerprint of the model they describe (`saejax.interpret.latents.model_fingerprint`); the
model-card exporter copies the file as is.
"""

import dataclasses
import json
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse as sp
from jaxtyping import Float, Int
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.metrics import roc_auc_score

from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.interpret import latents

FILE_NAME = "latent_labels.json"
FORMAT = "saejax.latent_labels"
FORMAT_VERSION = 1
TOKEN_PATTERN = r"(?u)\b[^\W\d_][^\W_]+\b"  # words of 2+ letters or digits, starting with a letter


class Labeller(Protocol):
  """An optional labeller (e.g. an LLM prompt): returns a short label for one latent."""

  def __call__(self, latent: int, top_texts: Sequence[str], terms: Sequence[str]) -> str:
    ...


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """How labels are made and scored.

  Attributes:
    top_docs: most activating documents that form a latent's class.
    num_terms: c-TF-IDF terms kept per latent (for search and display).
    label_terms: terms joined into the label.
    min_doc_fraction: a term must occur in at least this fraction of the top documents (and in
      at least 2 of them).
    heldout_fraction: documents kept aside to score the labels (0: no scores).
    seed: seed of the split.
  """
  top_docs: int = 20
  num_terms: int = 10
  label_terms: int = 3
  min_doc_fraction: float = 0.1
  heldout_fraction: float = 0.2
  seed: int = 0

  def __post_init__(self):
    for name in ("top_docs", "num_terms", "label_terms"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ConfigError(f"LabelConfig.{name}={getattr(self, name)!r} must be a positive int")
    if self.label_terms > self.num_terms:
      raise ConfigError(f"LabelConfig.label_terms={self.label_terms} exceeds "
                        f"num_terms={self.num_terms}")
    if not 0 <= self.heldout_fraction < 1:
      raise ConfigError(f"LabelConfig.heldout_fraction={self.heldout_fraction!r} must lie in "
                        f"[0, 1)")
    if not 0 <= self.min_doc_fraction <= 1:
      raise ConfigError(f"LabelConfig.min_doc_fraction={self.min_doc_fraction!r} must lie in "
                        f"[0, 1]")


@dataclasses.dataclass(frozen=True)
class LatentLabel:
  """One latent's label.

  Attributes:
    latent: the latent id.
    label: the short label ("" when no term passed the filters).
    terms: c-TF-IDF terms, best first.
    weights: their c-TF-IDF weights.
    frequency: firing frequency in the fitting documents.
    auc: held-out ROC AUC of the label predicting activation (None: not measurable).
    source: "ctfidf" or "labeller".
  """
  latent: int
  label: str
  terms: tuple[str, ...]
  weights: tuple[float, ...]
  frequency: float
  auc: float | None = None
  source: str = "ctfidf"


@dataclasses.dataclass(frozen=True)
class LatentLabels:
  """Labels of the live latents of one model."""
  labels: dict[int, LatentLabel]
  num_latents: int
  fingerprint: str
  config: LabelConfig

  def __getitem__(self, latent: int) -> LatentLabel:
    return self.labels[latent]

  def text(self, latent: int) -> str:
    """The label of ``latent`` ("" for a latent without one)."""
    found = self.labels.get(int(latent))
    return found.label if found else ""

  def aucs(self) -> Float[np.ndarray, "M"]:
    """Held-out AUCs of the latents that have one."""
    return np.asarray([x.auc for x in self.labels.values() if x.auc is not None], np.float64)

  def save(self, path: str | Path) -> Path:
    """Write ``latent_labels.json`` (``path`` may be a directory)."""
    path = Path(path)
    path = path / FILE_NAME if path.is_dir() else path
    data = {"format": FORMAT, "version": FORMAT_VERSION, "num_latents": self.num_latents,
            "fingerprint": self.fingerprint, "config": dataclasses.asdict(self.config),
            "auc_summary": auc_summary(self.aucs()),
            "labels": {str(j): dataclasses.asdict(x) for j, x in sorted(self.labels.items())}}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def load_labels(path: str | Path, *, fingerprint: str | None = None) -> LatentLabels:
  """Read ``latent_labels.json``; with ``fingerprint``, refuse another model's labels.

  Raises:
    CheckpointError: no file at ``path``, or one that is not such a file (the message names the
      file and what it lacks).
    FingerprintError: another model's labels.
  """
  path = Path(path)
  path = path / FILE_NAME if path.is_dir() else path
  if not path.is_file():
    raise CheckpointError(f"no labels file at {path}")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{path} is not a text file (byte {e.start} is not UTF-8)") from e
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e
  if (not isinstance(data, dict) or data.get("format") != FORMAT
      or data.get("version") != FORMAT_VERSION):
    raise CheckpointError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file")
  missing = [k for k in ("num_latents", "fingerprint", "config", "labels") if k not in data]
  if missing:
    raise CheckpointError(f"{path} has no {' or '.join(missing)}: write it with "
                          f"LatentLabels.save")
  if fingerprint is not None:
    latents.check_fingerprint(fingerprint, data["fingerprint"], f"labels file {path}")
  try:
    labels = {int(j): LatentLabel(**{**x, "terms": tuple(x["terms"]),
                                     "weights": tuple(x["weights"])})
              for j, x in data["labels"].items()}
    return LatentLabels(labels, int(data["num_latents"]), data["fingerprint"],
                        LabelConfig(**data["config"]))
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a malformed entry
    raise CheckpointError(f"{path}: malformed labels or config ({type(e).__name__}: {e}); "
                          f"write it with LatentLabels.save") from e


def auc_summary(aucs: Float[np.ndarray, "M"]) -> dict:
  """Distribution of per-latent AUCs: count, mean, quartiles, share above 0.5 / 0.7 / 0.9."""
  aucs = np.asarray(aucs, np.float64)
  if aucs.size == 0:
    return {"count": 0}
  q = np.quantile(aucs, [0.25, 0.5, 0.75])
  return {"count": int(aucs.size), "mean": float(aucs.mean()), "p25": float(q[0]),
          "median": float(q[1]), "p75": float(q[2]),
          **{f"above_{t}": float((aucs > t).mean()) for t in (0.5, 0.7, 0.9)}}


def vectorizer() -> CountVectorizer:
  """The word counter labels are made with (binary presence, English stop words removed)."""
  return CountVectorizer(lowercase=True, stop_words="english", token_pattern=TOKEN_PATTERN,
                         binary=True, dtype=np.float32)


def _ctfidf_terms(doc_term: sp.csr_matrix, idf: Float[np.ndarray, "V"], vocab: np.ndarray,
                  rows: Int[np.ndarray, "n"], cfg: LabelConfig
                  ) -> tuple[tuple[str, ...], tuple[float, ...]]:
  """Best c-TF-IDF terms of the class formed by document ``rows`` (see the module docstring)."""
  rows = rows[rows >= 0]
  if rows.size == 0:
    return (), ()
  present = np.asarray(doc_term[rows].sum(axis=0)).ravel()
  enough = present >= max(2.0, cfg.min_doc_fraction * rows.size)
  weight = np.where(enough, present / rows.size * idf, 0.0)
  best = np.lexsort((vocab, -weight))[:cfg.num_terms]  # ties alphabetically: deterministic
  best = best[weight[best] > 0]
  return tuple(str(vocab[i]) for i in best), tuple(float(weight[i]) for i in best)


def label_latents(texts: Sequence[str], values: Float[np.ndarray, "N K"],
                  indices: Int[np.ndarray, "N K"], num_latents: int, *, fingerprint: str = "",
                  config: LabelConfig = LabelConfig(),
                  labeller: Labeller | None = None) -> LatentLabels:
  """Label every latent that fires in the fitting documents and score the labels on held-out ones.

  Args:
    texts: the N corpus documents, in the order of the codes.
    values: [N, K] their code values.
    indices: [N, K] their latent ids.
    num_latents: S.
    fingerprint: `saejax.interpret.latents.model_fingerprint` of the model that made the codes.
    config: how labels are made and scored.
    labeller: optional replacement for the c-TF-IDF label (terms are still computed).
  """
  n = len(texts)
  if values.shape[0] != n:
    raise DataError(f"{n} texts but codes for {values.shape[0]} documents")
  acts = latents.activations(values, indices, num_latents)
  order = np.random.default_rng(config.seed).permutation(n)
  n_held = int(round(config.heldout_fraction * n))
  held, fit = np.sort(order[:n_held]), np.sort(order[n_held:])
  counter = vectorizer()
  try:
    doc_term = counter.fit_transform([texts[i] for i in fit]).tocsr()
  except ValueError as e:  # sklearn: "empty vocabulary"
    raise DataError(f"no words to label with in the {fit.size} fitting documents: {e}") from e
  vocab = counter.get_feature_names_out()
  df = np.asarray(doc_term.sum(axis=0)).ravel()
  idf = np.log1p(fit.size / np.maximum(df, 1))
  st = latents.latent_stats(values[fit], indices[fit], num_latents)
  live = st.live
  top_rows, _ = latents.top_documents(values[fit], indices[fit], num_latents, live,
                                      config.top_docs)
  held_terms = counter.transform([texts[i] for i in held]).tocsc() if held.size else None
  held_fires = (acts[held] > 0).tocsc() if held.size else None
  word_index = {w: i for i, w in enumerate(vocab)}
  analyse = counter.build_analyzer()
  labels = {}
  for j, rows in zip(live, top_rows):
    terms, weights = _ctfidf_terms(doc_term, idf, vocab, rows, config)
    text, source = " ".join(terms[:config.label_terms]), "ctfidf"
    if labeller is not None:
      text = str(labeller(int(j), [texts[fit[r]] for r in rows if r >= 0], terms)).strip()
      source = "labeller"
    auc = None
    if held_terms is not None and text:
      words = sorted({word_index[w] for w in analyse(text) if w in word_index})
      fires = held_fires[:, j].toarray().ravel()
      if words and 0 < fires.sum() < fires.size:
        score = held_terms[:, words] @ idf[words]
        auc = float(roc_auc_score(fires, np.asarray(score).ravel()))
    labels[int(j)] = LatentLabel(int(j), text, terms, weights, float(st.frequency[j]), auc, source)
  return LatentLabels(labels, int(num_latents), fingerprint, config)


# ---------------------------------------------------------------------------------------------
# Search by label (used by saejax.interpret.steer)

def _stem(word: str) -> str:
  """A crude suffix stripper so that "licensing", "licenses" and "license" meet."""
  word = word.lower()
  for suffix in ("ing", "es", "ed", "s", "e"):
    if word.endswith(suffix) and len(word) - len(suffix) >= 4:
      return word[:-len(suffix)]
  return word


def match_latents(labels: LatentLabels, phrase: str, *, num_terms: int | None = None
                  ) -> list[int]:
  """Latents whose label words cover every word of ``phrase`` (stop words ignored).

  A phrase word matches a label word when both stem to the same string (`_stem`). Only the label
  (the first ``label_terms`` terms) is searched unless ``num_terms`` widens it to more terms.
  Latents come back by decreasing frequency.
  """
  words = {_stem(w) for w in vectorizer().build_analyzer()(phrase)}
  if not words:
    raise ConfigError(f"steering phrase {phrase!r} has no content words")
  depth = num_terms or labels.config.label_terms
  found = []
  for j, lab in labels.labels.items():
    label_words = {_stem(w) for w in vectorizer().build_analyzer()(lab.label)}
    label_words |= {_stem(t) for t in lab.terms[:depth]}
    if words <= label_words:
      found.append(j)
  return sorted(found, key=lambda j: (-labels.labels[j].frequency, j))


def closest_labels(labels: LatentLabels, phrase: str, n: int = 5) -> list[str]:
  """The ``n`` labels most similar to ``phrase``, as "'label' (latent j)".

  Similarity is difflib's ratio, the best of the whole label against the whole phrase and of any
  label word against any phrase word (so "licence" finds "gpl license terms").
  """
  phrase = phrase.lower()
  phrase_words = phrase.split() or [phrase]

  def similarity(label: str) -> float:
    pairs = [(phrase, label)] + [(p, w) for p in phrase_words for w in label.split()]
    return max(difflib.SequenceMatcher(None, a, b).ratio() for a, b in pairs)

  by_text = {}
  for j, lab in sorted(labels.labels.items(), key=lambda x: (-x[1].frequency, x[0])):
    if lab.label:
      by_text.setdefault(lab.label, j)
  ranked = sorted(by_text, key=lambda text: -similarity(text))[:n]
  return [f"{text!r} (latent {by_text[text]})" for text in ranked]


def label_quality(labels: LatentLabels) -> str:
  """One line describing the AUC distribution, e.g. for a report."""
  s = auc_summary(labels.aucs())
  if not s["count"]:
    return "no held-out AUC (no held-out documents, or no latent fired in them)"
  return (f"held-out AUC over {s['count']} latents: mean {s['mean']:.3f}, median "
          f"{s['median']:.3f}, IQR {s['p25']:.3f}-{s['p75']:.3f}, "
          f"{100 * s['above_0.7']:.0f}% above 0.7")
