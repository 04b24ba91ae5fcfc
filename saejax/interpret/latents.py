"""What the latents of a trained SAE embedder do, measured on an encoded corpus.

Everything here reads TopK codes, (values [N, K], indices [N, K]) as
`saejax.retrieval.encode.encode_sparse` returns them (unit-norm when `SAEConfig.normalize_codes`: an
activation is then the latent's share of its code), and gives numpy arrays indexed by latent id,
plus a printable table:

* `latent_stats`: per latent, how many documents it fires in (value > 0), its firing frequency,
  mean activation over the documents it fires in, max activation; dead latents (fire nowhere)
  and hot latents (fire in more than `hot_frequency` of documents; Gao et al. 2024, "Scaling and
  evaluating sparse autoencoders", sec. 2.4 report both as SAE health measures).
* `coactivation` / `latent_families`: how often two latents fire in the same document, and
  families of related latents as connected components of the graph whose edges join latents
  with Jaccard co-activation ``c_ij / (c_i + c_j - c_ij)`` above a threshold. Jaccard normalises
  away a latent's own frequency, so two hot latents are not joined merely for both being common
  (Bricken et al. 2023, "Towards Monosemanticity", group features by co-activation likewise).
* `top_documents`: the documents that activate a latent most.
* `token_evidence`: which tokens of a document drive a latent, by **leave-one-token-out**: token
  t's evidence for latent j is ``pre_j(text) - pre_j(text without t)``, where "without t" marks t
  as padding (it leaves attention and the mean pool; positions of other tokens stay). Chosen over
  gradient x input (Shrikumar et al. 2016) because it is exact, not a first-order estimate: the
  encoder's attention and LayerNorms make a token's effect non-linear, and gradient x input
  compares against an all-zero embedding that no text produces. The cost is T + 1 forward passes
  of one text, all done as one jitted [T + 1, T] batch, which for the short texts these models
  embed is a fraction of a second. Evidence is read on SAE pre-activations, not on the TopK code:
  a token can move a latent across the TopK cut-off, where the code jumps from 0 to a value and a
  difference of codes would say nothing about the tokens that did not cross it.
* `model_fingerprint` (defined in `saejax.sae.embedder`, which corpus shards use too): a short
  hash of a model's configuration and parameters, stored beside codes and labels so that analysis
  of one model is never shown as another's (`check_fingerprint`).

Shape legend: N documents, K active latents per document, S latents, T tokens, L latents asked for.
"""

import dataclasses
import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from flax import nnx
from jaxtyping import Bool, Float, Int
from tokenizers import Tokenizer

from saejax.data.tokenizer import pad_id, truncating_copy
from saejax.errors import CheckpointError, ConfigError, DataError, SaejaxError
from saejax.retrieval.encode import _bucket, _pad, tokenize
from saejax.retrieval.index import sparse_matrix
from saejax.sae.embedder import Embedder, model_fingerprint  # noqa: F401 - part of this API

HOT_FREQUENCY = 0.1  # Gao et al. call a latent dense above a firing rate of 10%
CODES_FORMAT = "saejax.codes"


class FingerprintError(SaejaxError, ValueError):
  """Codes, labels or a report belong to a different model than the one given."""


# ---------------------------------------------------------------------------------------------
# Statistics

@dataclasses.dataclass(frozen=True)
class LatentStats:
  """Per-latent statistics of N encoded documents (arrays of length S, indexed by latent id).

  Attributes:
    num_docs: N.
    counts: documents in which the latent fires (value > 0).
    frequency: counts / N.
    mean_activation: mean value over the documents it fires in (0 for dead latents).
    max_activation: largest value (0 for dead latents).
    dead: fires in no document.
    hot: fires in more than `hot_frequency` of the documents.
    hot_frequency: the threshold `hot` used.
  """
  num_docs: int
  counts: Int[np.ndarray, "S"]
  frequency: Float[np.ndarray, "S"]
  mean_activation: Float[np.ndarray, "S"]
  max_activation: Float[np.ndarray, "S"]
  dead: Bool[np.ndarray, "S"]
  hot: Bool[np.ndarray, "S"]
  hot_frequency: float

  @property
  def num_latents(self) -> int:
    return int(self.counts.shape[0])

  @property
  def live(self) -> Int[np.ndarray, "live"]:
    """Ids of the latents that fire at least once."""
    return np.flatnonzero(~self.dead)


def _check_codes(values: np.ndarray, indices: np.ndarray, num_latents: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  values, indices = np.asarray(values), np.asarray(indices)
  if values.ndim != 2 or values.shape != indices.shape:
    raise DataError(f"codes must be values [N, K] and indices [N, K] of one shape; got values "
                    f"{values.shape} and indices {indices.shape}")
  if not isinstance(num_latents, (int, np.integer)) or num_latents < 1:
    raise ConfigError(f"num_latents={num_latents!r} must be a positive int")
  if indices.size and (indices.min() < 0 or indices.max() >= num_latents):
    raise DataError(f"latent indices must lie in [0, {num_latents}); found "
                    f"{indices.min()} .. {indices.max()}")
  if not np.isfinite(values).all():
    raise DataError("codes hold non-finite values")
  return values, indices


def check_latent_ids(latents: Sequence[int], num_latents: int) -> Int[np.ndarray, "L"]:
  """``latents`` as an int64 array; ConfigError naming the ids outside [0, num_latents).

  A negative id would otherwise index from the end (latent S-1 for -1) without a word.
  """
  ids = np.asarray(latents).reshape(-1)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ConfigError(f"latent ids must be integers, got {ids.dtype} ({ids[:5].tolist()})")
  bad = ids[(ids < 0) | (ids >= num_latents)]
  if bad.size:
    raise ConfigError(f"latent id(s) {bad[:10].tolist()} out of range [0, {num_latents}): the "
                      f"model has S={num_latents} latents")
  return ids.astype(np.int64)


def activations(values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
                num_latents: int) -> sp.csr_matrix:
  """[N, S] CSR matrix of the codes (zeros dropped, a latent repeated in a row summed)."""
  values, indices = _check_codes(values, indices, num_latents)
  # A copy: scipy's eliminate_zeros compacts the index array it was given, in place.
  return sparse_matrix(values, indices.copy(), int(num_latents))


def latent_stats(values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
                 num_latents: int, *, hot_frequency: float = HOT_FREQUENCY) -> LatentStats:
  """Firing counts, frequencies, mean and max activations, dead and hot latents.

  Args:
    values: [N, K] code values (a value <= 0 is "not firing": TopK's ReLU zeros).
    indices: [N, K] latent ids in [0, num_latents).
    num_latents: S.
    hot_frequency: a latent firing in more than this fraction of documents is hot.
  """
  if not 0 < hot_frequency <= 1:
    raise ConfigError(f"hot_frequency={hot_frequency!r} must lie in (0, 1]")
  a = activations(values, indices, num_latents)
  n = a.shape[0]
  fires = a > 0
  counts = np.asarray(fires.sum(axis=0)).ravel().astype(np.int64)
  total = np.asarray(a.multiply(fires).sum(axis=0)).ravel()
  mean = np.divide(total, counts, out=np.zeros(num_latents), where=counts > 0)
  peak = (np.maximum(np.asarray(a.max(axis=0).todense()).ravel(), 0.0) if n
          else np.zeros(num_latents))
  frequency = counts / max(n, 1)
  return LatentStats(num_docs=n, counts=counts, frequency=frequency,
                     mean_activation=mean.astype(np.float64),
                     max_activation=peak.astype(np.float64), dead=counts == 0,
                     hot=frequency > hot_frequency, hot_frequency=float(hot_frequency))


def coactivation(values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
                 num_latents: int) -> sp.csr_matrix:
  """[S, S] sparse counts: entry (i, j) is the number of documents where both i and j fire.

  The diagonal holds each latent's own firing count. Sparse, because with K of S latents per
  document at most N K^2 pairs exist.
  """
  fires = (activations(values, indices, num_latents) > 0).astype(np.int64)
  return (fires.T @ fires).tocsr()


def latent_families(cooc: sp.spmatrix, *, min_jaccard: float = 0.3,
                    min_count: int = 2) -> Int[np.ndarray, "S"]:
  """Family id of every latent: connected components of the Jaccard co-activation graph.

  Two live latents are joined when they fire together in at least ``min_count`` documents and
  their Jaccard similarity ``c_ij / (c_i + c_j - c_ij)`` is at least ``min_jaccard``. Families
  are numbered 0, 1, ... by decreasing size (ties by smallest member); dead latents get -1.

  Args:
    cooc: [S, S] co-activation counts from `coactivation`.
    min_jaccard: smallest normalised co-activation that joins two latents.
    min_count: smallest number of shared documents that joins two latents.
  """
  if not 0 < min_jaccard <= 1:
    raise ConfigError(f"min_jaccard={min_jaccard!r} must lie in (0, 1]")
  cooc = sp.coo_matrix(cooc)
  if cooc.shape[0] != cooc.shape[1]:
    raise DataError(f"co-activation matrix must be square, got {cooc.shape}")
  s = cooc.shape[0]
  own = np.zeros(s)
  diag = cooc.row == cooc.col
  own[cooc.row[diag]] = cooc.data[diag]
  off = ~diag
  i, j, c = cooc.row[off], cooc.col[off], cooc.data[off].astype(np.float64)
  jaccard = c / np.maximum(own[i] + own[j] - c, 1)
  keep = (jaccard >= min_jaccard) & (c >= min_count)
  graph = sp.coo_matrix((np.ones(keep.sum()), (i[keep], j[keep])), shape=(s, s))
  _, component = sp.csgraph.connected_components(graph, directed=False)
  live = own > 0
  sizes = np.bincount(component[live], minlength=component.max() + 1)
  smallest = np.full(sizes.shape, s)
  np.minimum.at(smallest, component[live], np.flatnonzero(live))
  order = [c for c in np.lexsort((smallest, -sizes)) if sizes[c] > 0]
  renumber = np.full(sizes.shape, -1)
  renumber[order] = np.arange(len(order))
  return np.where(live, renumber[component], -1)


def stats_table(stats: LatentStats, *, labels: dict[int, str] | None = None,
                families: Int[np.ndarray, "S"] | None = None, latents: Sequence[int] | None = None
                ) -> list[dict]:
  """One row (dict) per latent, live latents by decreasing frequency unless ``latents`` is given.

  Columns: latent, count, frequency, mean, max, hot, and label / family when given.
  """
  chosen = (check_latent_ids(latents, stats.num_latents) if latents is not None
            else stats.live[np.argsort(-stats.counts[stats.live], kind="stable")])
  rows = []
  for j in chosen:
    j = int(j)
    row = {"latent": j, "count": int(stats.counts[j]), "frequency": float(stats.frequency[j]),
           "mean": float(stats.mean_activation[j]), "max": float(stats.max_activation[j]),
           "hot": bool(stats.hot[j])}
    if families is not None:
      row["family"] = int(families[j])
    if labels is not None:
      row["label"] = labels.get(j, "")
    rows.append(row)
  return rows


def format_table(rows: list[dict], *, max_rows: int | None = None) -> str:
  """An aligned plain-text table of `stats_table` rows (floats to 4 significant digits)."""
  if not rows:
    return "(no latents)"
  rows = rows[:max_rows] if max_rows else rows
  columns = list(rows[0])
  cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def top_documents(values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
                  num_latents: int, latents: Sequence[int], n: int = 10
                  ) -> tuple[Int[np.ndarray, "L n"], Float[np.ndarray, "L n"]]:
  """The ``n`` documents (row numbers) that activate each latent most, by decreasing activation.

  Returns:
    (rows [L, n] with -1 padding where a latent fires in fewer than n documents, activations
    [L, n] with 0 padding). Ties go to the lower row.
  """
  latents = check_latent_ids(latents, num_latents)
  csc = activations(values, indices, num_latents).tocsc()
  rows = np.full((latents.size, n), -1, dtype=np.int64)
  acts = np.zeros((latents.size, n), dtype=np.float32)
  for out, j in enumerate(latents):
    docs = csc.indices[csc.indptr[j]:csc.indptr[j + 1]]
    vals = csc.data[csc.indptr[j]:csc.indptr[j + 1]]
    firing = vals > 0
    docs, vals = docs[firing], vals[firing]
    order = np.lexsort((docs, -vals))[:n]
    rows[out, :order.size], acts[out, :order.size] = docs[order], vals[order]
  return rows, acts


# ---------------------------------------------------------------------------------------------
# Token evidence (leave-one-token-out)

@dataclasses.dataclass(frozen=True)
class TokenEvidence:
  """How much each token of one text drives each asked-for latent.

  Attributes:
    tokens: the text's tokens as the tokenizer wrote them ([CLS] and [SEP] included).
    offsets: (start, end) character span of each token in the text ((0, 0) for special tokens).
    latents: the L latents asked for.
    pre: [L] pre-activations of those latents for the whole text.
    scores: [T, L] ``pre(text) - pre(text without token t)``; positive: the token pushes the
      latent up. Special tokens score 0 (they are never left out).
  """
  tokens: tuple[str, ...]
  offsets: tuple[tuple[int, int], ...]
  latents: tuple[int, ...]
  pre: Float[np.ndarray, "L"]
  scores: Float[np.ndarray, "T L"]


def _loo_forward(model: Embedder):
  """A jitted ``(ids [W], valid [W]) -> pre-activations [W + 1, S]``: row t < W leaves token t
  out, the last row is the whole text."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, valid):
    m = nnx.merge(graphdef, state)
    width = ids.shape[0]
    keep = jnp.concatenate([~jnp.eye(width, dtype=bool), jnp.ones((1, width), bool)])
    rows_valid = valid[None, :] & keep
    rows_ids = jnp.broadcast_to(ids, rows_valid.shape)
    return m.sae.pre_activations(m.dense(rows_ids, rows_valid))

  return lambda ids, valid: forward(state, ids, valid)


def token_evidence(model: Embedder, tokenizer: Tokenizer, texts: Sequence[str],
                   latents: Sequence[Sequence[int]], *, max_len: int = 256,
                   buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
                   ) -> list[TokenEvidence]:
  """Leave-one-token-out evidence of each text's tokens for the given latents.

  One jitted forward pass per text over a [W + 1, W] batch (W: the text's length bucket), so the
  number of compilations is bounded by the number of buckets used.

  Args:
    model: the trained embedder.
    tokenizer: its tokenizer.
    texts: the texts.
    latents: for each text, the latent ids to explain (e.g. those it activates).
    max_len: token budget (texts are cut as `saejax.retrieval.encode` cuts them).
    buckets: padded widths.
  """
  if len(latents) != len(texts):
    raise DataError(f"latents has {len(latents)} entries for {len(texts)} texts")
  s = model.sae.config.num_latents
  lengths = tuple(b for b in buckets if b < max_len) + (max_len,)
  tokenize(tokenizer, [], max_len)  # raises if the tokenizer adds no [CLS]/[SEP]
  bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
  if bad is not None:
    raise DataError(f"texts[{bad}] is a {type(texts[bad]).__name__}, not a str")
  encodings = truncating_copy(tokenizer, max_len).encode_batch(list(texts))
  forward, pad = _loo_forward(model), pad_id(tokenizer)
  out = []
  for enc, chosen in zip(encodings, latents):
    text_ids = enc.ids
    chosen = check_latent_ids(chosen, s)
    t = len(text_ids)
    ids, valid = _pad([text_ids], 1, _bucket(t, lengths), pad)
    pre = np.asarray(forward(jnp.asarray(ids[0]), jnp.asarray(valid[0])))[:, chosen]
    scores = pre[-1][None, :] - pre[:t]
    special = np.asarray(enc.special_tokens_mask[:t], bool)
    scores[special] = 0.0
    out.append(TokenEvidence(tokens=tuple(enc.tokens[:t]),
                             offsets=tuple(tuple(o) for o in enc.offsets[:t]),
                             latents=tuple(int(j) for j in chosen), pre=pre[-1].copy(),
                             scores=scores))
  return out


# ---------------------------------------------------------------------------------------------
# Fingerprints and stored codes

def check_fingerprint(expected: str, found: str, what: str) -> None:
  """Raise FingerprintError unless ``found`` (stored with ``what``) equals ``expected``."""
  if expected != found:
    raise FingerprintError(f"{what} was made by model {found}, not by this model ({expected}): "
                           f"re-encode with this model instead of mixing models")


@dataclasses.dataclass(frozen=True)
class StoredCodes:
  """TopK codes of a corpus together with the model that made them."""
  values: Float[np.ndarray, "N K"]
  indices: Int[np.ndarray, "N K"]
  num_latents: int
  fingerprint: str


def save_codes(path: str | Path, codes: StoredCodes) -> Path:
  """Write codes and their model fingerprint to one ``.npz`` file."""
  path = Path(path)
  header = json.dumps({"format": CODES_FORMAT, "num_latents": codes.num_latents,
                       "fingerprint": codes.fingerprint})
  with open(path, "wb") as f:
    np.savez(f, values=codes.values, indices=codes.indices, header=np.asarray(header))
  return path


def load_codes(path: str | Path, *, fingerprint: str | None = None) -> StoredCodes:
  """Read codes written by `save_codes`; with ``fingerprint``, refuse another model's codes.

  Raises:
    CheckpointError: no file at ``path``, or one that is not such an .npz (the message names the
      file and what it lacks).
    FingerprintError: another model's codes.
  """
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"no codes file at {path}")
  not_codes = f"{path} is not a saejax codes file (the .npz latents.save_codes writes)"
  try:
    f = np.load(path, allow_pickle=False)
  except (ValueError, EOFError, zipfile.BadZipFile) as e:  # text, JSON, pickled or cut-off bytes
    raise CheckpointError(f"{not_codes}: NumPy cannot read it as an .npz archive") from e
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise CheckpointError(f"{not_codes}: it holds a single array")
  with f:
    missing = [k for k in ("header", "values", "indices") if k not in f]
    if missing:
      raise CheckpointError(f"{not_codes}: it has no {' or '.join(missing)}")
    header = _codes_header(f["header"], path)
    codes = StoredCodes(f["values"], f["indices"], int(header["num_latents"]),
                        str(header["fingerprint"]))
  if fingerprint is not None:
    check_fingerprint(fingerprint, codes.fingerprint, f"codes file {path}")
  return codes


def _codes_header(stored: np.ndarray, path: Path) -> dict:
  """The header of codes file ``path``, checked: format, num_latents and fingerprint."""
  try:
    header = json.loads(str(stored))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: its header is not JSON ({e.msg})") from e
  if not isinstance(header, dict) or header.get("format") != CODES_FORMAT:
    found = header.get("format") if isinstance(header, dict) else header
    raise CheckpointError(f"{path} has format {found!r}, not {CODES_FORMAT!r}")
  missing = [k for k in ("num_latents", "fingerprint") if k not in header]
  if missing:
    raise CheckpointError(f"{path}: its header has no {' or '.join(missing)}: write it with "
                          f"latents.save_codes")
  return header
