"""Text sources for contrastive training: every source yields `{"query", "positive", "negatives"}`.

Readers, all exposed as grain `RandomAccessDataSource`s (random access by index, so shuffling,
sharding and resuming are index arithmetic, never a replayed generator):

- JSONL pairs / triplets with configurable field names (`JsonlTable`): line byte offsets are indexed
  once, each record is read back with one `os.pread`.
- BEIR folders (Thakur et al., 2021, "BEIR: A Heterogeneous Benchmark for Zero-shot Evaluation of
  Information Retrieval Models"): corpus.jsonl + queries.jsonl + qrels/{split}.tsv become
  (query text, relevant document text) pairs, a document being its title and text joined.
- Hugging Face datasets by hub name or local folder (`datasets.load_dataset`) and TFDS through
  `tfds.data_source` (ArrayRecord, no TensorFlow needed); both imported lazily.

`RecordSource` turns any of these row tables into validated records. It scans the table once up
front: rows whose fields are missing or empty, lines that are not JSON, and rows refused by the
configured filter (`min_score`, `label_values`) are settled there, so the record count is exact,
`on_bad_record="skip"` counts are deterministic, and a bad line fails at start-up rather than hours
into training.

`Bm25NegativesSource` adds hard negatives to a source that has none: BM25 (Robertson & Zaragoza,
2009, "The Probabilistic Relevance Framework: BM25 and Beyond"; implementation `bm25s`, Lù 2024)
over the source's own positive documents, as DPR does (Karpukhin et al., 2020, Sec. 3.2): the
top-ranked documents that are not a positive of the same query. Mined once, deterministically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NotRequired, Protocol, TypedDict

import numpy as np
from grain.sources import RandomAccessDataSource

from saejax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

OnBadRecord = Literal["raise", "skip"]

# How many skipped-record messages a source keeps for its warning; the count itself is exact.
_KEPT_SKIP_MESSAGES = 20


class Record(TypedDict):
  """One training example: a query, its relevant document and hard negative documents."""
  query: str
  positive: str
  negatives: list[str]
  source: NotRequired[int]  # the source's index in DataConfig.sources (set by the pipeline)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """Where one source's records come from and which fields hold what.

  For kind "beir" the field names are fixed by the format (queries.jsonl `text`, corpus.jsonl
  `title` + `text`, qrels `score`), so only `split`, `min_score` and `max_records` apply.
  """
  # "jsonl": one JSON object per line; "beir": a BEIR folder; "hf": a Hugging Face hub dataset;
  # "tfds": a TFDS dataset read through tfds.data_source (ArrayRecord).
  kind: Literal["jsonl", "beir", "hf", "tfds"]
  # jsonl: the file; beir: the folder; hf: what datasets.load_dataset takes, a hub name
  # ("sentence-transformers/all-nli") or a local folder of data files named by split
  # (train.parquet, train.jsonl; read offline); tfds: the dataset name ("my_dataset:1.0.0").
  path: str
  # Relative sampling weight in a mixture (normalised over all sources).
  weight: float = 1.0
  # beir: the qrels file qrels/{split}.tsv; hf / tfds: the split to load; unused for jsonl.
  split: str = "train"
  # Field holding the query text (sentence-transformers datasets call it "anchor" or "query").
  query_field: str = "query"
  # Field holding the relevant document text.
  positive_field: str = "positive"
  # Fields holding hard negatives, each a string or a list of strings, read in this order.
  # Empty: the source has none, and they are mined with BM25 when the pipeline asks for some.
  negative_fields: tuple[str, ...] = ()
  # Keep a row only when row[score_field] >= min_score (scored pairs such as STS-B).
  # For beir, min_score applies to the qrels score and defaults to 1 (score 0 = judged irrelevant).
  score_field: str | None = None
  min_score: float | None = None
  # Keep a row only when row[label_field] is one of label_values (MRPC label 1, SICK
  # "ENTAILMENT", CLIMATE-FEVER "SUPPORTS"). Values compare as loaded: 1 is not "1".
  label_field: str | None = None
  label_values: tuple[str | int, ...] = ()
  # hf: the dataset config name ("triplet", "pair"); None for the default config.
  subset: str | None = None
  # tfds: the data_dir holding prepared datasets; None for TFDS's default.
  data_dir: str | None = None
  # Keep only the first max_records good records (small runs, tests); None keeps all.
  max_records: int | None = None

  def __post_init__(self):
    where = f"SourceConfig(kind={self.kind!r}, path={self.path!r})"
    if self.kind not in ("jsonl", "beir", "hf", "tfds"):
      raise ConfigError(f"{where}: kind must be jsonl, beir, hf or tfds")
    if not self.path:
      raise ConfigError(f"{where}: path is empty")
    if not self.weight > 0:
      raise ConfigError(f"{where}: weight must be > 0, got {self.weight}")
    if self.max_records is not None and self.max_records < 1:
      raise ConfigError(f"{where}: max_records must be >= 1 or None, got {self.max_records}")
    if bool(self.label_values) != (self.label_field is not None):
      raise ConfigError(f"{where}: label_field and label_values must be set together")
    if self.kind == "beir":
      if self.negative_fields or self.score_field or self.label_field:
        raise ConfigError(f"{where}: BEIR field names are fixed; negative_fields, score_field and "
                        "label_field do not apply (use min_score for the qrels score)")
    else:
      if not self.query_field or not self.positive_field:
        raise ConfigError(f"{where}: query_field and positive_field must be non-empty")
      if self.min_score is not None and self.score_field is None:
        raise ConfigError(f"{where}: min_score={self.min_score} needs score_field")


class _Table(Protocol):
  """Rows by index, before validation: what every reader provides to `RecordSource`."""
  # Messages about input skipped while loading (BEIR corpus lines), for on_bad_record="skip".
  load_problems: list[str]

  def __len__(self) -> int: ...

  def row(self, i: int) -> Mapping[str, Any]:
    """Row `i` as a mapping; raises DataError naming `where(i)` when it cannot be read."""

  def where(self, i: int) -> str:
    """Where row `i` lives, for error messages ("path line 12", "hf:name[train] row 3")."""


class JsonlTable:
  """A JSONL file read by random access: line offsets are indexed once, rows read with pread.

  Whitespace-only lines are not records and are passed over (a trailing blank line is common).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    if not self.path.is_file():
      raise DataError(f"JSONL file {self.path} does not exist (or is not a file)")
    self.load_problems: list[str] = []
    starts, sizes, numbers = [], [], []
    offset = 0
    with open(self.path, "rb") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          starts.append(offset)
          sizes.append(len(line))
          numbers.append(number)
        offset += len(line)
    self._starts = np.asarray(starts, np.int64)
    self._sizes = np.asarray(sizes, np.int64)
    self._line_numbers = np.asarray(numbers, np.int64)
    self._fd = os.open(self.path, os.O_RDONLY)

  def __len__(self) -> int:
    return len(self._starts)

  def where(self, i: int) -> str:
    return f"{self.path} line {int(self._line_numbers[i])}"

  def row(self, i: int) -> Mapping[str, Any]:
    raw = os.pread(self._fd, int(self._sizes[i]), int(self._starts[i]))
    try:
      row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{self.where(i)}: not valid JSON ({e})") from None
    if not isinstance(row, dict):
      raise DataError(f"{self.where(i)}: expected a JSON object, got {type(row).__name__}")
    return row

  # A file descriptor does not survive pickling (grain worker processes): reopen it.
  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_fd"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fd = os.open(self.path, os.O_RDONLY)

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None


def read_beir_texts(path: Path, wanted: set[str] | None, text_of, on_bad_record: OnBadRecord = "raise",
                    problems: list[str] | None = None, *, id_fields: Sequence[str] = ("_id",),
                    unique: bool = False) -> dict[str, str]:
  """{id: text_of(row)} for the rows of a JSONL file (BEIR's corpus.jsonl / queries.jsonl) whose id
  is in `wanted` (None: all), in file order.

  Args:
    id_fields: the fields a row's id may be in, first present wins (("_id", "id") for a corpus
      that is BEIR or plain JSONL).
    unique: an id seen twice is a bad line naming it and both lines (else the later row wins).
    on_bad_record: "skip" describes bad lines in `problems` and skips them instead of raising
      (of a repeated id, the first row is kept).
  """
  if not path.is_file():
    raise DataError(f"BEIR file {path} does not exist")
  texts, first = {}, {}
  with open(path, "rb") as f:  # decoded line by line, so a bad byte is named by its line
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line.decode("utf-8"))
        field = next((name for name in id_fields if name in row), id_fields[0])
        key = str(row[field])
      except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        message = (f"{path} line {number}: not a JSON object with an {' or '.join(id_fields)} "
                   f"({type(e).__name__}: {e})")
        if on_bad_record == "raise":
          raise DataError(message) from None
        if problems is not None:
          problems.append(message)
        continue
      if unique:
        if key in first:
          message = (f"{path} line {number}: duplicate {field} {key!r} (first on line "
                     f"{first[key]})")
          if on_bad_record == "raise":
            raise DataError(message)
          if problems is not None:
            problems.append(message)
          continue  # the first row keeps the id
        first[key] = number
      if wanted is None or key in wanted:
        texts[key] = text_of(row)
  return texts


def beir_document(row: Mapping[str, Any]) -> str:
  # BEIR's own evaluation (and sentence-transformers') embeds a document as "title text".
  title, text = str(row.get("title") or "").strip(), str(row.get("text") or "").strip()
  return f"{title} {text}" if title and text else title or text


class BeirTable:
  """A BEIR folder as rows {"query", "positive", "score"}: one row per qrels judgement.

  Only the queries and documents that the qrels split references are held in memory. An ``_id``
  that appears twice in corpus.jsonl or queries.jsonl is a bad line, as in evaluation
  (`saejax.data.beir.load_beir`): which of the two texts a judgement meant is unknowable.
  """

  def __init__(self, folder: str | os.PathLike, split: str, on_bad_record: OnBadRecord):
    self.folder = Path(folder)
    if not self.folder.is_dir():
      raise DataError(f"BEIR folder {self.folder} does not exist")
    self.qrels_path = self.folder / "qrels" / f"{split}.tsv"
    if not self.qrels_path.is_file():
      raise DataError(f"BEIR qrels file {self.qrels_path} does not exist (split {split!r})")
    self.load_problems: list[str] = []
    self._lines: list[tuple[int, list[str]]] = []
    with open(self.qrels_path, "rb") as f:  # decoded line by line, so a bad byte is named
      for number, raw in enumerate(f, start=1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          message = f"{self.qrels_path} line {number}: not UTF-8 ({e})"
          if on_bad_record == "raise":
            raise DataError(message) from None
          self.load_problems.append(message)
          continue
        fields = line.rstrip("\r\n").split("\t")
        if number == 1 and fields[0] == "query-id":
          continue  # the header row
        if line.strip():
          self._lines.append((number, fields))
    query_ids = {fields[0] for _, fields in self._lines}
    doc_ids = {fields[1] for _, fields in self._lines if len(fields) > 1}
    self._queries = read_beir_texts(self.folder / "queries.jsonl", query_ids,
                                      lambda r: str(r.get("text") or "").strip(),
                                      on_bad_record, self.load_problems, unique=True)
    self._docs = read_beir_texts(self.folder / "corpus.jsonl", doc_ids, beir_document,
                                   on_bad_record, self.load_problems, unique=True)

  def __len__(self) -> int:
    return len(self._lines)

  def where(self, i: int) -> str:
    return f"{self.qrels_path} line {self._lines[i][0]}"

  def row(self, i: int) -> Mapping[str, Any]:
    fields = self._lines[i][1]
    if len(fields) != 3:
      raise DataError(f"{self.where(i)}: expected 3 tab-separated fields "
                      f"(query-id, corpus-id, score), got {len(fields)}")
    query_id, doc_id, score = fields
    try:
      score = float(score)
    except ValueError:
      raise DataError(f"{self.where(i)}: score {score!r} is not a number") from None
    if query_id not in self._queries:
      raise DataError(f"{self.where(i)}: query-id {query_id!r} is not in "
                      f"{self.folder / 'queries.jsonl'}")
    if doc_id not in self._docs:
      raise DataError(f"{self.where(i)}: corpus-id {doc_id!r} is not in "
                      f"{self.folder / 'corpus.jsonl'}")
    return {"query": self._queries[query_id], "positive": self._docs[doc_id], "score": score}


class HfTable:
  """A Hugging Face dataset split (hub name or local folder) from `datasets.load_dataset`
  (Arrow, memory-mapped)."""

  def __init__(self, name: str, subset: str | None, split: str):
    self.name, self.split = name, split
    self.load_problems: list[str] = []
    try:
      import datasets  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise DataError(f"source kind 'hf' ({name!r}) needs the `datasets` package: "
                      "pip install datasets") from None
    try:
      self._ds = datasets.load_dataset(name, subset, split=split)
    # load_dataset raises many types (ConnectionError, FileNotFoundError, DatasetNotFoundError,
    # ValueError for a bad split); all mean the same thing to a user: this name cannot be loaded.
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DataError(f"could not load Hugging Face dataset {name!r} (subset {subset!r}, split "
                      f"{split!r}): {type(e).__name__}: {e}. Is the hub reachable (HF_HUB_OFFLINE "
                      "unset) or the dataset in the local cache?") from e

  def __len__(self) -> int:
    return len(self._ds)

  def where(self, i: int) -> str:
    return f"hf:{self.name}[{self.split}] row {i}"

  def row(self, i: int) -> Mapping[str, Any]:
    return self._ds[int(i)]


class TfdsTable:
  """A TFDS split through `tfds.data_source`: random access on ArrayRecord, no TensorFlow graph."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    self.name, self.split = name, split
    self.load_problems: list[str] = []
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise DataError(f"source kind 'tfds' ({name!r}) needs the `tensorflow-datasets` package: "
                      "pip install tensorflow-datasets array_record") from None
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
    # tfds raises DatasetNotFoundError, AssertionError or ValueError for a missing or unprepared
    # dataset (or one stored as TFRecord, which has no random access); say which name failed.
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise DataError(f"could not open TFDS dataset {name!r} split {split!r} (data_dir "
                      f"{data_dir!r}) as a random-access data source: {type(e).__name__}: {e}. "
                      "It must be prepared in array_record format.") from e

  def __len__(self) -> int:
    return len(self._ds)

  def where(self, i: int) -> str:
    return f"tfds:{self.name}[{self.split}] row {i}"

  def row(self, i: int) -> Mapping[str, Any]:
    return self._ds[int(i)]


def _text(value: Any, field: str, where: str) -> str:
  """A non-empty string from a field value (TFDS gives bytes)."""
  if isinstance(value, (bytes, np.bytes_)):
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: field {field!r} is not UTF-8 ({e})") from None
  if not isinstance(value, str):
    raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:  # JSON may escape lone surrogates ("\ud800"); tokenizers refuse
    raise DataError(f"{where}: field {field!r} is not valid Unicode: lone surrogate "
                    f"{value[e.start]!r} at character {e.start}") from None
  if not value.strip():
    raise DataError(f"{where}: field {field!r} is empty")
  return value


def _texts(value: Any, field: str, where: str) -> list[str]:
  """A list of non-empty strings from a field holding one string or a list of them."""
  if isinstance(value, (str, bytes, np.bytes_)):
    return [_text(value, field, where)]
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_text(v, f"{field}[{j}]", where) for j, v in enumerate(value)]
  raise DataError(f"{where}: field {field!r} must be a string or a list of strings, "
                  f"got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class _Fields:
  """Which row fields make a record, and which rows to keep."""
  query: str
  positive: str
  negatives: tuple[str, ...]
  score: str | None
  min_score: float | None
  label: str | None
  label_values: tuple[str | int, ...]


def _fields_of(cfg: SourceConfig) -> _Fields:
  if cfg.kind == "beir":
    min_score = 1.0 if cfg.min_score is None else cfg.min_score
    return _Fields("query", "positive", (), "score", min_score, None, ())
  return _Fields(cfg.query_field, cfg.positive_field, cfg.negative_fields, cfg.score_field,
                 cfg.min_score, cfg.label_field, cfg.label_values)


def _field(row: Mapping[str, Any], field: str, where: str) -> Any:
  if field not in row:
    raise DataError(f"{where}: missing field {field!r} (fields: {sorted(row)})")
  if row[field] is None:  # null is missing: an Arrow table (hf) stores a key a row lacks as null
    raise DataError(f"{where}: missing field {field!r} (null)")
  return row[field]


class RecordSource(RandomAccessDataSource[Record]):
  """Validated, filtered records of one table, by index.

  Attributes:
    num_skipped: rows dropped as bad under on_bad_record="skip" (0 under "raise").
    num_filtered: good rows refused by the score / label filter.
    num_false_negatives: good rows dropped because one of the hard negatives a batch reads is
      the positive's own text (mined triplets hold such rows: MS MARCO keeps one passage under
      several ids); trained on, the positive would be scored as its own negative.
    skipped: the first few skip messages (file and line, and why).
  """

  def __init__(self, table: _Table, fields: _Fields, *, on_bad_record: OnBadRecord = "raise",
               min_negatives: int = 0, max_records: int | None = None, name: str = ""):
    self._table, self._fields, self._min_negatives = table, fields, min_negatives
    self.name = name or type(table).__name__
    self.num_skipped = len(table.load_problems)
    self.skipped = list(table.load_problems[:_KEPT_SKIP_MESSAGES])
    self.num_filtered = self.num_false_negatives = 0
    self._rows = self._scan(on_bad_record, max_records)
    if not len(self._rows):
      raise DataError(f"source {self.name}: no usable records ({self.num_skipped} skipped as bad, "
                      f"{self.num_filtered} refused by the filter)")
    if self.num_skipped:
      log.warning("source %s: skipped %d bad records; first: %s", self.name, self.num_skipped,
                  self.skipped[0])

  def _scan(self, on_bad_record: OnBadRecord, max_records: int | None) -> np.ndarray:
    """Table indices of the first `max_records` good rows that pass the filter."""
    kept = []
    for i in range(len(self._table)):
      if max_records is not None and len(kept) == max_records:
        break
      try:
        row, where = self._table.row(i), self._table.where(i)
        if not self._passes_filter(row, where):
          self.num_filtered += 1
          continue
        record = self._record(row, where)  # validates the text fields
        if record["positive"] in record["negatives"][:self._min_negatives]:
          if not self.num_false_negatives:
            log.warning("source %s: %s: a hard negative repeats the positive; such rows are "
                        "dropped (count in record_counts)", self.name, where)
          self.num_false_negatives += 1
          continue
      except DataError as e:
        if on_bad_record == "raise":
          raise
        self.num_skipped += 1
        if len(self.skipped) < _KEPT_SKIP_MESSAGES:
          self.skipped.append(str(e))
        continue
      kept.append(i)
    return np.asarray(kept, np.int64)

  def _passes_filter(self, row: Mapping[str, Any], where: str) -> bool:
    f = self._fields
    if f.min_score is not None:
      score = _field(row, f.score, where)
      if isinstance(score, bool) or not isinstance(score, (int, float, np.number)):
        raise DataError(f"{where}: score field {f.score!r} must be a number, got {score!r}")
      if score < f.min_score:
        return False
    if f.label is not None:
      label = _field(row, f.label, where)
      label = label.item() if isinstance(label, np.generic) else label  # TFDS: numpy scalars
      if not isinstance(label, (str, bytes, int, float)):  # `in` on an array is ambiguous
        raise DataError(f"{where}: label field {f.label!r} must be one string or number, "
                        f"got {type(label).__name__}")
      if label not in f.label_values:
        return False
    return True

  def _record(self, row: Mapping[str, Any], where: str) -> Record:
    f = self._fields
    query = _text(_field(row, f.query, where), f.query, where)
    positive = _text(_field(row, f.positive, where), f.positive, where)
    negatives = [t for name in f.negatives for t in _texts(_field(row, name, where), name, where)]
    if len(negatives) < self._min_negatives:
      raise DataError(f"{where}: {len(negatives)} negatives in {f.negatives}, "
                      f"{self._min_negatives} needed")
    return {"query": query, "positive": positive, "negatives": negatives}

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> Record:
    i = int(self._rows[index])
    return self._record(self._table.row(i), self._table.where(i))

  def __repr__(self) -> str:
    return f"RecordSource({self.name}, {len(self)} records)"


def _bm25_top(corpus: Sequence[str], queries: Sequence[str], k: int) -> np.ndarray:
  """[len(queries), k] corpus indices ranked by BM25 (bm25s, English stopwords)."""
  import bm25s  # pylint: disable=import-outside-toplevel  (import costs ~1 s; only mining needs it)
  # bm25s sets its own logger to DEBUG on import, which floods a training log with its chatter.
  logging.getLogger("bm25s").setLevel(logging.WARNING)
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize(list(corpus), stopwords="en", show_progress=False),
                  show_progress=False)
  query_tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
  # numpy top-k (not bm25s' "auto", which picks JAX): deterministic and leaves devices alone.
  docs, _ = retriever.retrieve(query_tokens, k=k, show_progress=False, backend_selection="numpy",
                               n_threads=0)
  return np.asarray(docs)


def mine_bm25_negatives(queries: Sequence[str], positives: Sequence[str],
                        num_negatives: int) -> tuple[np.ndarray, np.ndarray]:
  """BM25 hard negatives for (query, positive) pairs, drawn from the pairs' own positives.

  Args:
    queries: query text of each pair.
    positives: positive document text of each pair.
    num_negatives: H, negatives per pair.

  Returns:
    (negatives, doc_pair): negatives[i] holds H indices into the unique positive documents,
    ranked by BM25 for queries[i], never a document that is the positive of any pair with the
    same query text (a query with several relevant documents gets none of them as negatives);
    doc_pair[j] is the first pair whose positive is unique document j.
  """
  docs, doc_pair, positive_doc = {}, [], np.empty(len(positives), np.int64)
  for i, text in enumerate(positives):
    if text not in docs:
      docs[text] = len(docs)
      doc_pair.append(i)
    positive_doc[i] = docs[text]
  excluded: dict[str, set[int]] = {}
  for query, doc in zip(queries, positive_doc):
    excluded.setdefault(query, set()).add(int(doc))
  unique_queries = list(excluded)
  most_excluded = max(len(s) for s in excluded.values())
  if len(docs) - most_excluded < num_negatives:
    raise DataError(f"cannot mine {num_negatives} BM25 negatives: the source has only {len(docs)} "
                    f"distinct positive documents and a query with {most_excluded} positives")
  ranked = _bm25_top(list(docs), unique_queries, min(len(docs), num_negatives + most_excluded))
  per_query = {}
  for query, ranking in zip(unique_queries, ranked):
    per_query[query] = [int(d) for d in ranking if d not in excluded[query]][:num_negatives]
  negatives = np.asarray([per_query[q] for q in queries], np.int64).reshape(-1, num_negatives)
  return negatives, np.asarray(doc_pair, np.int64)


class Bm25NegativesSource(RandomAccessDataSource[Record]):
  """Records of `base` with H BM25-mined hard negatives, computed once at construction.

  Only indices are kept: a negative is read back as the positive of another record of `base`,
  so memory is N x H integers, not the texts.
  """

  def __init__(self, base: RecordSource, num_negatives: int):
    self.base, self.name = base, base.name
    records = [base[i] for i in range(len(base))]
    negatives, doc_record = mine_bm25_negatives([r["query"] for r in records],
                                                [r["positive"] for r in records], num_negatives)
    self._negative_records = doc_record[negatives]

  def __len__(self) -> int:
    return len(self.base)

  def negative_indices(self, index: int) -> np.ndarray:
    """Indices of the records of `base` whose positives are record `index`'s negatives."""
    return self._negative_records[index]

  def __getitem__(self, index: int) -> Record:
    record = self.base[index]
    negatives = [self.base[int(j)]["positive"] for j in self._negative_records[index]]
    return {"query": record["query"], "positive": record["positive"], "negatives": negatives}

  def __repr__(self) -> str:
    return f"Bm25NegativesSource({self.name}, {len(self)} records)"


def _table(cfg: SourceConfig, on_bad_record: OnBadRecord) -> _Table:
  if cfg.kind == "jsonl":
    return JsonlTable(cfg.path)
  if cfg.kind == "beir":
    return BeirTable(cfg.path, cfg.split, on_bad_record)
  if cfg.kind == "hf":
    return HfTable(cfg.path, cfg.subset, cfg.split)
  return TfdsTable(cfg.path, cfg.split, cfg.data_dir)


def open_source(cfg: SourceConfig, *, num_negatives: int = 0,
                on_bad_record: OnBadRecord = "raise") -> RecordSource | Bm25NegativesSource:
  """The records of one configured source, with at least `num_negatives` negatives each.

  Args:
    cfg: the source.
    num_negatives: H. A source with negative fields must give at least H per record (fewer is
      a bad record); a source without them gets H BM25-mined negatives.
    on_bad_record: "raise" a DataError naming the file and line, or "skip" and count.

  Returns:
    A grain RandomAccessDataSource of `Record`s.
  """
  if num_negatives < 0:
    raise ConfigError(f"num_negatives must be >= 0, got {num_negatives}")
  name = f"{cfg.kind}:{cfg.path}" + (f"[{cfg.split}]" if cfg.kind != "jsonl" else "")
  source = RecordSource(_table(cfg, on_bad_record), _fields_of(cfg), on_bad_record=on_bad_record,
                        min_negatives=num_negatives if cfg.negative_fields else 0,
                        max_records=cfg.max_records, name=name)
  if num_negatives and not cfg.negative_fields:
    return Bm25NegativesSource(source, num_negatives)
  return source

