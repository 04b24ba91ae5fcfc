"""Query-time steering of sparse retrieval: boost, suppress, exclude or require latents.

A query's TopK code (values, indices) is a weighted list of concepts, and a document's score is the
dot product of codes, so concept-level control is arithmetic on the query plus a filter on results:

* ``boost`` j: add ``strength * scale`` to the query's weight of latent j, where ``scale`` is the
  sum of the query's positive weights (so strengths mean the same for every query and model).
  Documents that activate j rise.
* ``suppress`` j: set the query's weight of j to ``-strength * scale``. A document with
  activation a_j loses ``strength * scale * a_j``; since a score is at most ``scale`` times the
  document's largest activation, a document whose strongest latent is j drops out entirely at
  strength 1. Soft: a document that activates j only weakly can stay.
* ``exclude`` j: drop j from the query and remove every result whose activation of j exceeds
  ``threshold`` (hard post-filter).
* ``only`` j: boost j and keep only results whose activation of j exceeds ``threshold``.

An idf-weighted index (`SparseIndex.build(..., idf_power=a)`, as saejax searches) scores codes whose
latents it has weighted, queries and documents alike; steering then acts in that space, where the
scores are: ``scale`` is the sum of the query's weighted positive weights and a steered latent's
weight is divided by its own idf weight before the index weighs it again, so the boost and
suppress statements hold for the activations as the index weighs them. `SteeredSearch` reads the
weights from the index (``latent_weights``); unweighted, the two spaces are the same.

Post-filters read the documents' own codes (`DocActivations`), not the index, so steering works
with any index object that has ``search(q_values, q_indices, top_k) -> (scores, doc_ids)``: the
exact `saejax.retrieval.index.SparseIndex` or an external-engine adapter with the same method. To
fill ``top_k`` results after filtering, `SteeredSearch` over-fetches and deepens the search until
every query has ``top_k`` survivors or the index has nothing more to give.

Steering by words: `parse_steering("less about licensing; only about audio", labels)` turns
phrases into operations on the latents whose labels (`saejax.interpret.labels`) match; a phrase that
matches no label raises `SteerError` listing the closest labels. Latent ids can be given directly
("suppress latent 17", or `Steering.by_id`).

This is the query-side half of "steering" an SAE: activation steering (Templeton et al. 2024,
"Scaling Monosemanticity", sec. "Feature steering") clamps features inside a generating model; a
retriever's code is its output, so editing the query code is the whole intervention.
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
from jaxtyping import Float, Int

from saejax.errors import ConfigError, DataError
from saejax.interpret import labels as labels_lib, latents as latents_lib
from saejax.retrieval.index import _check_codes, sparse_matrix

OpKind = Literal["boost", "suppress", "exclude", "only"]
KINDS: tuple[str, ...] = ("boost", "suppress", "exclude", "only")
FILTERS = ("exclude", "only")
OVERFETCH = 4  # first search depth is top_k times this when results are post-filtered


class SteerError(ConfigError):
  """A steering request that cannot be carried out (unknown label, latent out of range...)."""


class SearchIndex(Protocol):
  """What steering needs from an index (`saejax.retrieval.index.SparseIndex` has it). An index
  that weighs query latents before scoring also exposes them as ``latent_weights`` [S] (None or
  absent: it scores the codes as given)."""

  def search(self, q_values: np.ndarray, q_indices: np.ndarray,
             top_k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True)
class SteerOp:
  """One operation on a set of latents.

  Attributes:
    kind: "boost", "suppress", "exclude" or "only".
    latents: the latent ids.
    strength: for boost / suppress / only: weight as a multiple of the query's total weight.
    threshold: for exclude / only: a document activates a latent when its value exceeds this.
    phrase: the words it was parsed from ("" when given by id).
  """
  kind: OpKind
  latents: tuple[int, ...]
  strength: float = 1.0
  threshold: float = 0.0
  phrase: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise SteerError(f"steering kind {self.kind!r} is not one of {KINDS}")
    if not self.latents:
      raise SteerError(f"{self.kind} needs at least one latent")
    if not self.strength >= 0:
      raise SteerError(f"{self.kind} strength={self.strength!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class Steering:
  """An ordered list of operations (later ones win where they touch the same latent)."""
  ops: tuple[SteerOp, ...] = ()

  @classmethod
  def by_id(cls, *, boost: Sequence[int] = (), suppress: Sequence[int] = (),
            exclude: Sequence[int] = (), only: Sequence[int] = (), strength: float = 1.0,
            threshold: float = 0.0) -> "Steering":
    """Steering from latent ids."""
    ops = [SteerOp(kind, tuple(int(j) for j in ids), strength, threshold)
           for kind, ids in (("boost", boost), ("suppress", suppress), ("exclude", exclude),
                             ("only", only)) if len(ids)]
    return cls(tuple(ops))

  def check(self, num_latents: int) -> None:
    """Raise SteerError if a latent id is outside [0, num_latents)."""
    for op in self.ops:
      bad = [j for j in op.latents if not 0 <= j < num_latents]
      if bad:
        raise SteerError(f"{op.kind}: latent id(s) {bad} out of range [0, {num_latents})")

  def last_ops(self) -> dict[int, SteerOp]:
    """Each steered latent's operation: the last one that names it (later operations win, as
    in the explorer page, which keeps one operation per latent)."""
    return {j: op for op in self.ops for j in op.latents}

  @property
  def filters(self) -> tuple[SteerOp, ...]:
    """The exclude / only operations, each on the latents that no later operation overrides
    (an op left with none is dropped)."""
    last = self.last_ops()
    kept = ((op, tuple(j for j in op.latents if last[j] is op))
            for op in self.ops if op.kind in FILTERS)
    return tuple(dataclasses.replace(op, latents=ids) for op, ids in kept if ids)

  def describe(self, labels: labels_lib.LatentLabels | None = None) -> str:
    """One line per operation, with labels where known."""
    lines = []
    for op in self.ops:
      names = [f"{j}" + (f" ({labels.text(j)})" if labels and labels.text(j) else "")
               for j in op.latents]
      lines.append(f"{op.kind} {', '.join(names)}" + (f"  <- {op.phrase!r}" if op.phrase else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Parsing phrases

_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (kind, re.compile(p, re.IGNORECASE)) for kind, p in (
        ("suppress", r"^(?:less|fewer|suppress|downweight|down)\b(?:\s+(?:about|on|of))?\s+(.+)$"),
        ("boost", r"^(?:more|boost|upweight|up)\b(?:\s+(?:about|on|of))?\s+(.+)$"),
        ("only", r"^(?:only|just)\b(?:\s+(?:about|on))?\s+(.+)$"),
        ("exclude", r"^(?:not|no|without|exclude|except|nothing)\b(?:\s+(?:about|on|with))?"
                    r"\s+(.+)$")))
_LATENT_ID = re.compile(r"^(?:latents?\s+|#)(\d+(?:\s*,\s*\d+)*)$", re.IGNORECASE)


def resolve(target: str, labels: labels_lib.LatentLabels | None, num_latents: int) -> list[int]:
  """Latent ids named by ``target``: "latent 12", "#12, 13" or label words ("audio player")."""
  target = target.strip()
  by_id = _LATENT_ID.match(target)
  if by_id:
    ids = [int(x) for x in re.split(r"\s*,\s*", by_id.group(1))]
    bad = [j for j in ids if not 0 <= j < num_latents]
    if bad:
      raise SteerError(f"latent id(s) {bad} in {target!r} out of range [0, {num_latents})")
    return ids
  if labels is None:
    raise SteerError(f"{target!r} names no latent id and no labels were given to search")
  found = labels_lib.match_latents(labels, target)
  if not found:
    closest = labels_lib.closest_labels(labels, target)
    raise SteerError(f"no latent label matches {target!r}; closest labels: "
                     f"{', '.join(closest) or '(there are no labels)'}")
  return found


def parse_steering(text: str, labels: labels_lib.LatentLabels | None, num_latents: int, *,
                   strength: float = 1.0, threshold: float = 0.0) -> Steering:
  """Parse "less about X; more about Y, only about Z, without W" into a `Steering`.

  Phrases are separated by ";" or ","; each starts with less/fewer/suppress (suppress),
  more/boost (boost), only/just (only) or not/no/without/exclude (exclude), followed by label
  words or a latent id ("latent 17", "#17").

  Raises:
    SteerError: a phrase without a known verb, label words that match no label (the message
      lists the closest labels), or a latent id out of range.
  """
  ops = []
  for phrase in filter(None, (p.strip() for p in re.split(r"[;,](?!\s*\d)", text))):
    for kind, pattern in _PATTERNS:
      m = pattern.match(phrase)
      if m:
        ops.append(SteerOp(kind, tuple(resolve(m.group(1), labels, num_latents)), strength,
                           threshold, phrase))
        break
    else:
      raise SteerError(f"steering phrase {phrase!r} does not start with one of: less / more / "
                       f"only / without (e.g. 'less about licensing', 'only about audio')")
  return Steering(tuple(ops))


# ---------------------------------------------------------------------------------------------
# The query transform and the post-filter

def steer_query(q_values: Float[np.ndarray, "Q R"], q_indices: Int[np.ndarray, "Q R"],
                steering: Steering, num_latents: int,
                latent_weights: Float[np.ndarray, "S"] | None = None
                ) -> tuple[Float[np.ndarray, "Q R2"], Int[np.ndarray, "Q R2"]]:
  """Apply the boost / suppress / exclude / only operations to query codes.

  Returns codes with one extra column per steered latent (a latent appearing twice in a row has
  its weights summed by every index); the original columns of suppressed and excluded latents are
  zeroed. ``latent_weights`` [S]: the per-latent weights the index will multiply the query by
  (an idf-weighted index's ``latent_weights``); the steering weights are set so that they hold
  after that weighting (module docstring). None: an unweighted index.
  """
  steering.check(num_latents)
  q_values, q_indices = _check_codes(q_values, q_indices, num_latents, "query")
  if latent_weights is None:
    latent_weights = np.ones(num_latents, np.float32)
  latent_weights = np.asarray(latent_weights, np.float64)
  if latent_weights.shape != (num_latents,) or not (latent_weights > 0).all():
    raise DataError(f"latent_weights must be [{num_latents}] positive weights (the index's), got "
                    f"shape {latent_weights.shape}")
  # The query's positive mass as the index weighs it (the index's per-query rescale to the
  # original norm multiplies every column alike, so it moves no ranking and no sign).
  scale = (np.clip(q_values, 0, None) * latent_weights[q_indices]).sum(axis=1)  # [Q]
  values = q_values.copy()
  extra_v, extra_i = [], []
  for j, op in steering.last_ops().items():  # later operations override earlier ones on j
    if op.kind in ("suppress", "exclude"):
      values[q_indices == j] = 0.0
    weight = {"boost": 1.0, "only": 1.0, "suppress": -1.0, "exclude": 0.0}[op.kind] * op.strength
    extra_v.append(weight * scale / latent_weights[j])
    extra_i.append(np.full(q_values.shape[0], j, q_indices.dtype))
  if not extra_v:
    return values, q_indices.copy()
  return (np.concatenate([values, np.stack(extra_v, 1).astype(np.float32)], 1),
          np.concatenate([q_indices, np.stack(extra_i, 1)], 1))


class DocActivations:
  """Documents' codes, looked up by doc id: what post-filters read."""

  def __init__(self, values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
               num_latents: int, doc_ids: Int[np.ndarray, "N"] | None = None):
    values, indices = np.asarray(values), np.asarray(indices)
    if values.shape != indices.shape or values.ndim != 2:
      raise DataError(f"document codes must be values [N, K] and indices [N, K]; got "
                      f"{values.shape} and {indices.shape}")
    n = values.shape[0]
    doc_ids = np.arange(n) if doc_ids is None else np.asarray(doc_ids, np.int64)
    if doc_ids.shape != (n,):
      raise DataError(f"doc_ids has shape {doc_ids.shape}, expected ({n},)")
    self._order = np.argsort(doc_ids, kind="stable")
    self._sorted_ids = doc_ids[self._order]
    # A copy of indices: scipy compacts the index array it is given when dropping zeros.
    self.matrix = sparse_matrix(values, indices.copy(), num_latents).tocsc()
    self.num_latents = num_latents

  def rows(self, doc_ids: Int[np.ndarray, "..."]) -> Int[np.ndarray, "..."]:
    """Row of each doc id (-1 for ids not held, e.g. the -1 padding of search results)."""
    doc_ids = np.asarray(doc_ids)
    pos = np.clip(np.searchsorted(self._sorted_ids, doc_ids), 0, len(self._sorted_ids) - 1)
    found = self._sorted_ids[pos] == doc_ids
    return np.where(found, self._order[pos], -1)

  def activation(self, doc_ids: Int[np.ndarray, "..."], latent: int) -> Float[np.ndarray, "..."]:
    """Activation of ``latent`` in each document (0 for unknown ids).

    Raises:
      ConfigError: ``latent`` outside [0, S).
    """
    (latent,) = latents_lib.check_latent_ids([latent], self.num_latents)
    rows = self.rows(doc_ids)
    column = np.asarray(self.matrix[:, latent].todense()).ravel()
    return np.where(rows >= 0, column[np.maximum(rows, 0)], 0.0)


def filter_results(scores: Float[np.ndarray, "Q R"], doc_ids: Int[np.ndarray, "Q R"],
                   docs: DocActivations, steering: Steering
                   ) -> tuple[Float[np.ndarray, "Q R"], Int[np.ndarray, "Q R"]]:
  """Drop results that an exclude removes or an only does not keep; survivors move up in order,
  the tail is padded with (-inf, -1)."""
  keep = doc_ids >= 0
  for op in steering.filters:
    acts = np.stack([docs.activation(doc_ids, j) for j in op.latents])  # [L, Q, R]
    hit = (acts > op.threshold).any(axis=0)
    keep &= ~hit if op.kind == "exclude" else hit
  order = np.argsort(~keep, axis=1, kind="stable")  # kept first, in their ranked order
  kept = np.take_along_axis(keep, order, 1)
  out_s = np.where(kept, np.take_along_axis(scores, order, 1), -np.inf).astype(np.float32)
  out_i = np.where(kept, np.take_along_axis(doc_ids, order, 1), -1)
  return out_s, out_i


class SteeredSearch:
  """Search any index with steering: query transform, then post-filters with deepening."""

  def __init__(self, index: SearchIndex, docs: DocActivations | None = None,
               num_latents: int | None = None):
    """Args:
      index: an object with ``search(q_values, q_indices, top_k)``.
      docs: the indexed documents' codes (needed for exclude / only).
      num_latents: S; default ``index.num_latents`` or ``docs.num_latents``.
    """
    self.index, self.docs = index, docs
    num_latents = num_latents or getattr(index, "num_latents", None) or (
        docs.num_latents if docs else None)
    if not num_latents:
      raise ConfigError("SteeredSearch needs num_latents (the index and docs do not tell it)")
    self.num_latents = int(num_latents)
    self.num_docs = getattr(index, "num_docs", None) or (docs.matrix.shape[0] if docs else None)

  def search(self, q_values: Float[np.ndarray, "Q R"], q_indices: Int[np.ndarray, "Q R"],
             top_k: int = 10, steering: Steering = Steering()
             ) -> tuple[Float[np.ndarray, "Q top_k"], Int[np.ndarray, "Q top_k"]]:
    """Top ``top_k`` (scores, doc ids) of each query under ``steering``."""
    values, indices = steer_query(q_values, q_indices, steering, self.num_latents,
                                  getattr(self.index, "latent_weights", None))
    if not steering.filters:
      return self.index.search(values, indices, top_k)
    if self.docs is None:
      raise SteerError("exclude / only need the documents' codes: pass docs=DocActivations(...)")
    depth = top_k * OVERFETCH
    while True:
      scores, ids = self.index.search(values, indices, depth)
      # Fewer than `depth` results for every query: the index has nothing more to give.
      exhausted = (ids[:, -1] < 0).all() or (self.num_docs is not None and depth >= self.num_docs)
      scores, ids = filter_results(scores, ids, self.docs, steering)
      full = (ids[:, :top_k] >= 0).all()
      if full or exhausted:
        return scores[:, :top_k], ids[:, :top_k]
      depth = min(depth * 4, self.num_docs) if self.num_docs else depth * 4


def fraction_activating(doc_ids: Int[np.ndarray, "Q R"], docs: DocActivations, latent: int,
                        threshold: float = 0.0) -> Float[np.ndarray, "Q"]:
  """Per query, the fraction of its returned documents whose activation of ``latent`` exceeds
  ``threshold`` (0 for a query with no results); ConfigError for ``latent`` outside [0, S)."""
  acts = docs.activation(doc_ids, latent)
  returned = (doc_ids >= 0).sum(axis=1)
  hits = ((acts > threshold) & (doc_ids >= 0)).sum(axis=1)
  return np.divide(hits, returned, out=np.zeros(len(returned)), where=returned > 0)
