"""saejax sparse codes in external search engines: Milvus (Lite or a cluster) and JSONL files.

`MilvusIndex` has the search interface of `saejax.retrieval.index.SparseIndex` (``build(values,
indices, num_latents, doc_ids)``, ``search(q_values, q_indices, top_k) -> (scores, doc ids)``) over
a Milvus collection of sparse float vectors: the key of a latent is its dimension index (latent 42
is dimension 42, stable across re-ingests and models of the same dictionary), the metric is the
inner product, the very score saejax trains with, and the index is ``SPARSE_INVERTED_INDEX``
searched with ``drop_ratio_search = 0``: every posting is scored, so results are exact up to float32
summation order (Milvus documentation, "Sparse Vector"). The same client code talks to an embedded
Milvus Lite file (``uri="path.db"``, the `milvus-lite` package; used by the tests) or to a Milvus
server or cluster (``uri="http://host:19530"``).

Built with ``idf_power`` a > 0, it scores the idf-weighted cosine `SparseIndex.build(...,
idf_power=a)` scores: the latents' idf is counted over the documents given to `MilvusIndex.build`,
documents are stored weighted, queries are weighted on the client before they are sent, and the
weights live in a companion collection (``COLLECTION__saejax_idf``, one row: the weights as a
sparse vector, the power as a scalar) that `MilvusIndex.open` reads back. Documents added later
with `MilvusIndex.ingest` are weighted by those weights and not counted in them (the exact index
is built once; rebuild for weights that count every document).

Results follow `saejax.retrieval.index`'s result rule: only scores > 0, descending, ties by lower
doc id, padding -inf / -1. Query weights may be negative (steering suppresses latents this way);
Milvus refuses negative weights, so such a query fetches candidates by its positive part and
rescores them exactly on the client, growing the candidate set until no other document can enter the
top k (`MilvusIndex._search_signed`).

`write_jsonl` / `read_jsonl` hold codes as Seismic / Anserini-style JSONL, one document a line::

  {"id": "42", "content": "text", "vector": {"f00017": 0.83, "f01234": 0.41}}

(Bruch et al., SIGIR 2024, Seismic's JSON input; Anserini's JsonVectorCollection), the files that
engines ingesting from disk read. Latent keys are fixed width, ``f`` then the zero-padded latent id
(at least 5 digits, more when the dictionary needs them), so they sort in latent order as strings.
Seismic reads the weights as floats; Anserini's JsonVectorCollection reads each as an int
(Jackson's ``asInt``, truncating: a unit-norm code's weights, all below 1, would index as
nothing), so files for Anserini are written with ``quantize`` (integer weights
``round(w * quantize)``, as SPLADE's are quantized for it).

Shape letters: N documents, K latents per document code, Q queries, R latents per query code.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from saejax.errors import ConfigError, DataError
from saejax.retrieval.index import (_check_codes, _check_doc_ids, check_idf_power, _check_top_k,
                                    _sum_duplicates, latent_idf, sparse_matrix,
                                    weigh_codes)

# Milvus caps one request: at most 16,384 results per query and 16,384 queries per search.
_MAX_LIMIT = 16384
_QUERY_CHUNK = 1024
_INSERT_CHUNK = 5000
_KEY = re.compile(r"f(\d+)")
# drop_ratio_search = 0: no small query weight is dropped, every posting list is scored (exact).
_SEARCH_PARAMS = {"metric_type": "IP", "params": {"drop_ratio_search": 0.0}}
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # a Python float: no float32 cast in comparisons
# The companion collection of an idf-weighted index (a name Milvus accepts: letters, digits, _).
_IDF_SUFFIX = "__saejax_idf"


def _document_rows(values, indices, doc_ids, latent_weights: Float[np.ndarray, "S"] | None
                   ) -> tuple[Int[np.ndarray, "N"], list[dict[int, float]]]:
  """Checked doc ids and the documents' rows as Milvus stores them (weighted when
  ``latent_weights``), from codes `_check_codes` passed.

  Raises:
    DataError: bad doc ids, a negative value (Milvus stores only
      non-negative sparse weights), or a document without a non-zero latent (Milvus rejects an
      all-zero vector; such a document can never be a hit).
  """
  doc_ids = _check_doc_ids(doc_ids, values.shape[0])
  if (values < 0).any():
    row, col = np.argwhere(values < 0)[0]
    raise DataError(f"document values[{row}, {col}] = {values[row, col]:g} is negative; Milvus "
                    f"stores only non-negative weights (TopK codes are ReLU outputs)")
  if latent_weights is not None:
    values = weigh_codes(values, indices, latent_weights)
  rows = _sparse_rows(values, indices)
  empty = [int(d) for d, r in zip(doc_ids, rows) if not r]
  if empty:
    raise DataError(f"documents {empty[:5]} have no non-zero latent ({len(empty)} such rows); "
                    "drop them before ingesting")
  return doc_ids, rows


def _finite_float32(total: float, weight) -> float | None:
  """``total + weight`` when ``weight`` is a JSON number and the sum a finite float32, else None."""
  if isinstance(weight, bool) or not isinstance(weight, (int, float)):
    return None
  try:
    total += float(weight)
  except OverflowError:  # an int beyond any float
    return None
  return total if abs(total) <= _FLOAT32_MAX else None


def _sparse_rows(values: np.ndarray, indices: np.ndarray) -> list[dict[int, float]]:
  """One ``{latent: weight}`` dict per row, repeated latents summed and zeros dropped."""
  rows = []
  for v, i in zip(values, indices):
    latents, weights = _sum_duplicates(i, v)
    rows.append({int(t): float(w) for t, w in zip(latents, weights)})
  return rows


class MilvusIndex:
  """A Milvus collection of saejax codes with `SparseIndex`'s search interface."""

  def __init__(self, client, collection: str, num_latents: int, idf_power: float = 0.0,
               latent_weights: Float[np.ndarray, "S"] | None = None):
    """Wrap an existing collection; use `MilvusIndex.build` to create and fill one, `open` to
    reopen one (with its idf weights)."""
    self.client, self.collection, self.num_latents = client, collection, int(num_latents)
    self.idf_power = float(idf_power)
    self.latent_weights = latent_weights  # idf^a per latent [S]; None: plain inner product

  @classmethod
  def build(cls, values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
            num_latents: int, doc_ids: Int[np.ndarray, "N"] | None = None, *,
            uri: str | os.PathLike, collection: str = "saejax", overwrite: bool = False,
            idf_power: float = 0.0) -> "MilvusIndex":
    """Create a collection and ingest N document codes.

    Args:
      values, indices, num_latents, doc_ids: as `SparseIndex.build`.
      uri: a Milvus Lite file (``"docs.db"``) or a server (``"http://host:19530"``).
      collection: the collection name.
      overwrite: drop an existing collection of that name (and its idf weights) first.
      idf_power: as `SparseIndex.build`: a > 0 scores the idf-weighted cosine, the idf counted
        over these documents (module docstring); 0 the plain inner product.

    Raises:
      DataError: codes or doc ids that `SparseIndex.build` would refuse.
      ConfigError: pymilvus is missing, the collection exists and `overwrite` is False, or a bad
        idf_power.
    """
    check_idf_power(idf_power)
    values, indices = _check_codes(values, indices, int(num_latents), "document")
    weights = None
    if idf_power:
      codes = sparse_matrix(values, indices, int(num_latents))  # repeats summed, zeros dropped
      weights = latent_idf(np.bincount(codes.indices, minlength=int(num_latents)),
                           codes.shape[0], idf_power)
    # Every check before the first write: a refused build leaves no half-made collection behind.
    doc_ids, rows = _document_rows(values, indices, doc_ids, weights)
    client = _client(uri)
    if client.has_collection(collection):
      if not overwrite:
        raise ConfigError(f"Milvus collection {collection!r} at {uri} exists; pass overwrite=True "
                          "or use MilvusIndex.open")
      client.drop_collection(collection)
    if client.has_collection(collection + _IDF_SUFFIX):
      client.drop_collection(collection + _IDF_SUFFIX)
    try:
      if idf_power:
        _create(client, collection + _IDF_SUFFIX, power=True)
        client.insert(collection + _IDF_SUFFIX, [{
            "id": 0, "power": float(idf_power),
            "vector": {t: float(w) for t, w in enumerate(weights)}}])
        client.flush(collection + _IDF_SUFFIX)
      _create(client, collection)
      index = cls(client, collection, num_latents, idf_power, weights)
      index._insert(doc_ids, rows)
    except BaseException:
      for name in (collection, collection + _IDF_SUFFIX):  # no half-built index to open later
        if client.has_collection(name):
          client.drop_collection(name)
      raise
    return index

  @classmethod
  def open(cls, uri: str | os.PathLike, collection: str, num_latents: int) -> "MilvusIndex":
    """An existing collection (e.g. on a cluster that another process filled)."""
    client = _client(uri)
    if not client.has_collection(collection):
      raise ConfigError(f"Milvus at {uri} has no collection {collection!r}")
    client.load_collection(collection)
    if not client.has_collection(collection + _IDF_SUFFIX):
      return cls(client, collection, num_latents)
    client.load_collection(collection + _IDF_SUFFIX)
    row, = client.query(collection + _IDF_SUFFIX, ids=[0], output_fields=["vector", "power"])
    stored = {int(t): w for t, w in row["vector"].items()}
    # `build` stores a weight (> 0) for every latent of its dictionary: another num_latents is
    # another dictionary (a larger one would give its extra latents weight 1 without a word).
    if max(stored) + 1 != num_latents:
      raise ConfigError(f"the idf weights of Milvus collection {collection!r} cover "
                        f"{max(stored) + 1} latents, not num_latents={num_latents}: open it with "
                        f"the dictionary size it was built with")
    weights = np.ones(int(num_latents), np.float32)
    weights[list(stored)] = list(stored.values())
    return cls(client, collection, num_latents, float(row["power"]), weights)

  def ingest(self, values: Float[np.ndarray, "N K"], indices: Int[np.ndarray, "N K"],
             doc_ids: Int[np.ndarray, "N"] | None = None) -> None:
    """Add (or, for ids already present, replace) document codes.

    Args:
      values, indices: [N, K] document codes, as `SparseIndex.build`.
      doc_ids: [N] distinct integer ids >= 0 (default 0 .. N-1).
    """
    values, indices = _check_codes(values, indices, self.num_latents, "document")
    self._insert(*_document_rows(values, indices, doc_ids, self.latent_weights))

  def _insert(self, doc_ids: Int[np.ndarray, "N"], rows: list[dict[int, float]]) -> None:
    for start in range(0, len(rows), _INSERT_CHUNK):
      self.client.upsert(self.collection, [
          {"id": int(d), "vector": r} for d, r in
          zip(doc_ids[start:start + _INSERT_CHUNK], rows[start:start + _INSERT_CHUNK])])
    self.client.flush(self.collection)

  @property
  def num_docs(self) -> int:
    stats = self.client.get_collection_stats(self.collection)
    return int(stats["row_count"])

  def search(self, q_values: Float[np.ndarray, "Q R"], q_indices: Int[np.ndarray, "Q R"],
             top_k: int = 10) -> tuple[Float[np.ndarray, "Q top_k"], Int[np.ndarray, "Q top_k"]]:
    """Top-``top_k`` documents of each query by inner product, every posting scored.

    Args:
      q_values: [Q, R] query weights (any sign).
      q_indices: [Q, R] query latents in [0, S).
      top_k: results per query (Milvus allows at most 16,384).

    Returns:
      (scores float32 [Q, top_k], doc ids int64 [Q, top_k]) under `saejax.retrieval.index`'s result
      rule.
    """
    top_k = _check_top_k(top_k)
    if top_k > _MAX_LIMIT:
      raise ConfigError(f"top_k={top_k} exceeds Milvus's limit of {_MAX_LIMIT} results per query")
    q_values, q_indices = _check_codes(q_values, q_indices, self.num_latents, "query")
    num_q = q_values.shape[0]
    scores = np.full((num_q, top_k), -np.inf, dtype=np.float32)
    ids = np.full((num_q, top_k), -1, dtype=np.int64)
    rows = _sparse_rows(*self._weighted(q_values, q_indices))
    # Milvus accepts only non-negative weights: queries with a negative (suppressing) weight are
    # answered by `_search_signed`; an empty query has no hit and Milvus refuses it.
    plain = [q for q, r in enumerate(rows) if r and min(r.values()) > 0]
    # Milvus returns whichever documents tied at the cut it meets first: fetch one past the cut,
    # and further for a query whose tie runs to the end of what was fetched (duplicates tie).
    limit = min(top_k + 1, _MAX_LIMIT)
    for start in range(0, len(plain), _QUERY_CHUNK):
      chunk = plain[start:start + _QUERY_CHUNK]
      results = self.client.search(
          self.collection, data=[rows[q] for q in chunk], anns_field="vector", limit=limit,
          output_fields=["id"], search_params=_SEARCH_PARAMS)
      for q, hits in zip(chunk, results):
        hits = self._past_the_cut(rows[q], hits, top_k, limit)
        _fill(scores[q], ids[q], [(float(h["distance"]), int(h["id"])) for h in hits])
    for q, r in enumerate(rows):
      if r and min(r.values()) < 0:
        _fill(scores[q], ids[q], self._search_signed(r, top_k))
    return scores, ids

  def _past_the_cut(self, query: dict[int, float], hits: list, top_k: int, limit: int) -> list:
    """``hits`` (``limit`` fetched), fetched again deeper until the documents tied with the
    ``top_k``-th score end before the last one fetched (so `_fill` sees all of them)."""
    while (len(hits) == limit > top_k and limit < _MAX_LIMIT
           and hits[-1]["distance"] == hits[top_k - 1]["distance"]):
      limit = min(4 * limit, _MAX_LIMIT)
      hits = self.client.search(self.collection, data=[query], anns_field="vector", limit=limit,
                                output_fields=["id"], search_params=_SEARCH_PARAMS)[0]
    return hits

  def _weighted(self, values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked codes weighted as `SparseIndex` weighs them (``idf_power`` > 0)."""
    if self.latent_weights is not None:
      values = weigh_codes(values, indices, self.latent_weights)
    return values, indices

  def _search_signed(self, query: dict[int, float], top_k: int) -> list[tuple[float, int]]:
    """Exact hits of a query with negative weights: candidates from Milvus, rescored here.

    Milvus ranks the candidates by the positive part q+ of the query; every document's true
    score q.d is at most its q+.d, so once the k-th best true score among the first M candidates
    is at least the M-th candidate's q+.d, no document outside them can enter the top k. M grows
    4x until that holds (or Milvus's 16,384 limit: then the best of those candidates).
    """
    positive = {t: w for t, w in query.items() if w > 0}
    if not positive:
      return []  # every score is <= 0: no hit under the result rule
    limit = min(max(4 * top_k, 64), _MAX_LIMIT)
    while True:
      hits = self.client.search(self.collection, data=[positive], anns_field="vector",
                                limit=limit, output_fields=["vector"],
                                search_params=_SEARCH_PARAMS)[0]
      exact = sorted(((float(np.float32(sum(query.get(t, 0.0) * w
                                               for t, w in h["entity"]["vector"].items()))),
                       int(h["id"])) for h in hits), key=lambda h: (-h[0], h[1]))
      complete = len(hits) < limit or limit == _MAX_LIMIT
      # Strictly above: a document not fetched may tie with the k-th and have a lower id.
      if complete or (len(exact) >= top_k and exact[top_k - 1][0] > hits[-1]["distance"]):
        return exact
      limit = min(4 * limit, _MAX_LIMIT)

  def close(self) -> None:
    self.client.close()


def _create(client, collection: str, power: bool = False) -> None:
  """A collection of int64 ids and sparse vectors under an exact inner-product inverted index
  (``power``: with a float field, for the idf weights' companion collection)."""
  from pymilvus import DataType, MilvusClient  # pylint: disable=import-outside-toplevel
  schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
  schema.add_field("id", DataType.INT64, is_primary=True)
  schema.add_field("vector", DataType.SPARSE_FLOAT_VECTOR)
  if power:
    schema.add_field("power", DataType.DOUBLE)
  params = client.prepare_index_params()
  params.add_index(field_name="vector", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
  client.create_collection(collection, schema=schema, index_params=params)


def _fill(scores: np.ndarray, ids: np.ndarray, hits: list[tuple[float, int]]) -> None:
  """Write (score, doc id) hits into one result row under `saejax.retrieval.index`'s result rule."""
  ranked = sorted((h for h in hits if h[0] > 0), key=lambda h: (-h[0], h[1]))
  for j, (score, doc) in enumerate(ranked[:len(ids)]):
    scores[j], ids[j] = score, doc


def _client(uri: str | os.PathLike):
  try:
    from pymilvus import MilvusClient  # pylint: disable=import-outside-toplevel (optional engine)
  except ImportError:
    raise ConfigError("MilvusIndex needs pymilvus (and milvus-lite for a local file): "
                      "pip install pymilvus milvus-lite") from None
  return MilvusClient(str(uri))


# ---------------------------------------------------------------------------------------------
# Seismic / Anserini JSONL

def key_width(num_latents: int) -> int:
  """Digits of a latent key: at least 5 (``f01234``), more for dictionaries over 100,000."""
  if not isinstance(num_latents, (int, np.integer)) or num_latents < 1:
    raise ConfigError(f"num_latents={num_latents!r} must be a positive int")
  return max(5, len(str(int(num_latents) - 1)))


def write_jsonl(path: str | os.PathLike, ids, contents, values: Float[np.ndarray, "N K"],
                indices: Int[np.ndarray, "N K"], num_latents: int,
                latent_weights: Float[np.ndarray, "S"] | None = None, *,
                quantize: int | None = None) -> Path:
  """Write document codes as Seismic / Anserini JSONL (see the module docstring).

  An engine reading the file scores the plain inner product of what is written. To have it rank
  as saejax's idf-weighted index does, pass that index's ``latent_weights`` (`SparseIndex.build(...,
  idf_power=0.5).latent_weights`, or `saejax.retrieval.index.latent_idf` over the corpus's
  document frequencies) and weigh each query with the same weights before sending it
  (`saejax.retrieval.index.weigh_codes`).

  Args:
    path: the file to write (atomically: a temporary file, then a rename).
    ids: N document ids (written as strings).
    contents: N texts (or None for empty contents).
    values, indices: [N, K] codes; zero weights are left out, repeated latents summed.
    num_latents: S, which fixes the key width.
    latent_weights: [S] positive per-latent weights or None; the documents are written as
      `weigh_codes` weighs them (values times their latents' weights, each code rescaled to its
      own norm).
    quantize: None writes float weights (Seismic); an int q writes ``round(w * q)`` as ints,
      weights that round to 0 left out: what Anserini's JsonVectorCollection needs (it reads
      every weight as an int, truncating), e.g. 100 as for SPLADE. Scores are then q times the
      float ones up to rounding, so rankings agree but for near-ties.

  Raises:
    ConfigError: latent_weights not S finite positive numbers, or quantize not a positive int.
    DataError: bad codes, or ids/contents not one per code.
  """
  width = key_width(num_latents)
  if quantize is not None and (isinstance(quantize, bool) or not isinstance(
      quantize, (int, np.integer)) or quantize < 1):
    raise ConfigError(f"quantize={quantize!r} must be None (float weights) or a positive int")
  values, indices = _check_codes(values, indices, int(num_latents), "document")
  if latent_weights is not None:
    weights = np.asarray(latent_weights, np.float32)
    if weights.shape != (int(num_latents),) or not (np.isfinite(weights).all()
                                                    and (weights > 0).all()):
      raise ConfigError(f"latent_weights must be {int(num_latents)} finite positive numbers "
                        f"(one per latent), got shape {weights.shape}")
    values = weigh_codes(values, indices, weights)
  ids, contents = list(ids), list(contents) if contents is not None else None
  n = values.shape[0]
  if len(ids) != n or (contents is not None and len(contents) != n):
    raise DataError(f"{n} codes but {len(ids)} ids and "
                    f"{'no' if contents is None else len(contents)} contents; expected one each")
  path = Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for i, row in enumerate(_sparse_rows(values, indices)):
      if quantize is not None:
        row = {t: q for t, w in row.items() if (q := int(round(w * int(quantize))))}
      record = {"id": str(ids[i]), "content": "" if contents is None else str(contents[i]),
                "vector": {f"f{t:0{width}d}": w for t, w in row.items()}}
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path


def read_jsonl(path: str | os.PathLike, num_latents: int | None = None
               ) -> tuple[list[str], list[str], Float[np.ndarray, "N K"], Int[np.ndarray, "N K"]]:
  """Read a file written by `write_jsonl` (or any Seismic-style JSONL with ``f<digits>`` keys).

  Returns:
    (ids, contents, values float32 [N, K], indices int32 [N, K]) with K the most latents of any
    document; shorter rows are padded with weight 0 at latent 0 (which indexes store as nothing).

  Raises:
    DataError: a line that is not a JSON object with ``id`` and a ``vector`` of ``f<digits>``
      keys and finite numeric weights, or a latent >= num_latents; the message names the line.
  """
  path = Path(path)
  ids, contents, rows = [], [], []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
      if not isinstance(record, dict) or "id" not in record or not isinstance(
          record.get("vector"), dict):
        raise DataError(f"{where}: expected an object with 'id' and a 'vector' object")
      row = {}
      for key, weight in record["vector"].items():
        match = _KEY.fullmatch(key)
        if match is None:
          raise DataError(f"{where}: vector key {key!r} is not 'f' followed by a latent id")
        latent = int(match.group(1))
        limit = np.iinfo(np.int32).max + 1 if num_latents is None else num_latents
        if latent >= limit:
          raise DataError(f"{where}: latent {latent} ({key}) is outside [0, {limit})")
        # "f00001" and "f1" name one latent: its weights add up, as repeats in a code do; the sum
        # is what is stored, so it must be a finite float32 (1e39 is a finite float, not one).
        total = _finite_float32(row.get(latent, 0.0), weight)
        if total is None:
          raise DataError(f"{where}: weight of {key} is {weight!r}; the latent's weight "
                          f"{'' if latent not in row else 'summed over its keys '}is not a "
                          "finite float32 number")
        row[latent] = total
      ids.append(str(record["id"]))
      contents.append(str(record.get("content", "")))
      rows.append(row)
  k = max((len(r) for r in rows), default=0)
  values = np.zeros((len(rows), k), np.float32)
  indices = np.zeros((len(rows), k), np.int32)
  for i, row in enumerate(rows):
    values[i, :len(row)] = list(row.values())
    indices[i, :len(row)] = list(row.keys())
  return ids, contents, values, indices
