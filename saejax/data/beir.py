"""A BEIR split in memory, for evaluation: corpus, queries and graded relevance judgements.

    data = load_beir("../shared/data/scifact", "test", max_docs=0)

Documents are read as "title text" like BEIR (`saejax.data.sources.beir_document`). Bad input: a
qrels line naming a document or query that is not in the corpus or queries file is an error (a
judgement that cannot be met would silently lower every system's recall), as is an `_id` that
appears twice in corpus.jsonl or queries.jsonl (error naming the id and both lines); a judged
query whose text is empty is skipped, counted in `BeirData.skipped_empty_queries` and logged as a
warning. With ``max_docs`` the corpus is subsampled: see `load_beir`.

A split ``test~train`` is the test queries none of whose relevant documents is relevant to a query
of the train split: documents a model trained on the train pairs has never been shown. SciFact is
the case in point (196 of its 300 test claims have a relevant abstract among the train pairs).
"""

import dataclasses
import logging
from pathlib import Path

import numpy as np

from saejax.data.sources import beir_document, read_beir_texts
from saejax.errors import DataError

Qrels = dict[str, dict[str, int]]


@dataclasses.dataclass(frozen=True)
class BeirData:
  """A BEIR split in memory: texts in parallel with their ids, and graded relevance judgements."""
  doc_ids: tuple[str, ...]
  docs: tuple[str, ...]
  query_ids: tuple[str, ...]
  queries: tuple[str, ...]
  qrels: Qrels  # query id -> {doc id: relevance}; every query has a relevance > 0
  skipped_empty_queries: tuple[str, ...] = ()  # judged queries left out: their text is empty


def read_qrels(path: Path) -> Qrels:
  """BEIR qrels TSV (``query-id  corpus-id  score``, optional header) as {query: {doc: score}}."""
  if not path.is_file():
    raise DataError(f"BEIR qrels file {path} does not exist")
  qrels: Qrels = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      fields = line.rstrip("\r\n").split("\t")
      if (number == 1 and fields[0] == "query-id") or not line.strip():
        continue
      if len(fields) != 3:
        raise DataError(f"{path} line {number}: expected 3 tab-separated fields "
                        f"(query-id, corpus-id, score), got {len(fields)}")
      try:
        score = int(fields[2])
      except ValueError:
        raise DataError(f"{path} line {number}: score {fields[2]!r} is not an integer") from None
      qrels.setdefault(fields[0], {})[fields[1]] = score
  return qrels


def _relevant(judged: dict[str, int]) -> set[str]:
  return {d for d, s in judged.items() if s > 0}


def _subsample(doc_ids: list[str], qrels: Qrels, max_docs: int,
               rng: np.random.Generator) -> tuple[set[str], Qrels]:
  """(kept doc ids, kept qrels): every relevant doc of every kept query, then random distractors.

  Relevant documents may fill at most half of the sample (else ranking would be trivial); when the
  split has more, a random subset of queries is kept whose relevant documents fit.
  """
  relevant = {q: _relevant(judged) for q, judged in qrels.items()}
  budget = max_docs // 2
  if len(set().union(*relevant.values())) > budget:
    kept_docs, kept_queries = set(), []
    for q in rng.permutation(sorted(relevant)):
      if len(kept_docs | relevant[q]) <= budget:
        kept_docs |= relevant[q]
        kept_queries.append(str(q))
    if not kept_queries:
      raise DataError(f"max_docs={max_docs} leaves no room for the relevant documents of any "
                      f"query; raise max_docs")
    qrels = {q: qrels[q] for q in sorted(kept_queries)}
  keep = set().union(*map(_relevant, qrels.values()))
  others = [d for d in doc_ids if d not in keep]
  extra = min(max_docs - len(keep), len(others))
  keep |= {others[i] for i in rng.choice(len(others), extra, replace=False)}
  return keep, qrels


def unseen(qrels: Qrels, seen: Qrels, where: str = "") -> Qrels:
  """The queries of ``qrels`` none of whose relevant documents is relevant in ``seen`` (``where``:
  the seen qrels' file, for the error)."""
  seen_docs = set().union(*map(_relevant, seen.values()))
  kept = {q: j for q, j in qrels.items() if not _relevant(j) & seen_docs}
  if not kept:
    raise DataError(f"every query has a relevant document that is relevant in {where or 'seen'}: "
                    "no unseen query is left")
  return kept


def load_beir(folder: str | Path, split: str, *, max_docs: int = 0, seed: int = 0) -> BeirData:
  """Load a BEIR split, optionally subsampled to ``max_docs`` documents.

  ``split`` may be ``SPLIT~SEEN`` (e.g. ``test~train``): the queries of SPLIT none of whose
  relevant documents is relevant in the qrels of SEEN, for a model trained on SEEN's pairs.

  Only queries with at least one relevant judgement (score > 0) are kept; judged queries whose
  text is empty are skipped with a logged warning and listed in ``skipped_empty_queries``.
  Subsampling keeps every relevant document of the kept queries and fills the rest with random
  other documents; if the relevant documents alone would take more than half of ``max_docs``,
  queries are first subsampled at random until theirs fit in half.

  Args:
    folder: BEIR folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv.
    split: qrels split name, or ``SPLIT~SEEN``.
    max_docs: documents to keep (0 = all).
    seed: seed of the subsample.

  Raises:
    DataError: a missing file, a malformed qrels line, a qrels line naming an unknown query or
      document, a duplicate ``_id`` in corpus.jsonl or queries.jsonl, no judged query left
      (also after leaving out the queries SEEN covers).
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"BEIR folder {folder} does not exist")
  split, _, seen = split.partition("~")
  qrels_path = folder / "qrels" / f"{split}.tsv"
  qrels = {q: j for q, j in read_qrels(qrels_path).items() if any(s > 0 for s in j.values())}
  if not qrels:
    raise DataError(f"{qrels_path} has no query with a relevant (score > 0) document")
  if seen:
    seen_path = folder / "qrels" / f"{seen}.tsv"
    qrels = unseen(qrels, read_qrels(seen_path), str(seen_path))
  corpus = read_beir_texts(folder / "corpus.jsonl", None, beir_document, unique=True)
  all_queries = read_beir_texts(folder / "queries.jsonl", None,
                                lambda r: str(r.get("text") or "").strip(), unique=True)
  for q, judged in qrels.items():
    if q not in all_queries:
      raise DataError(f"{qrels_path}: query-id {q!r} is not in {folder / 'queries.jsonl'}")
    missing = [d for d in judged if d not in corpus]
    if missing:
      raise DataError(f"{qrels_path}: corpus-ids {missing[:3]} of query {q!r} are not in "
                      f"{folder / 'corpus.jsonl'}")
  # An empty query cannot be encoded meaningfully; scoring it 0 would charge every system alike
  # for a data error, so it is left out, and said so.
  empty = tuple(sorted(q for q in qrels if not all_queries[q]))
  if empty:
    logging.warning("%s: %d judged queries have empty text and are skipped (first: %s)",
                    folder / "queries.jsonl", len(empty), list(empty[:3]))
    qrels = {q: j for q, j in qrels.items() if all_queries[q]}
    if not qrels:
      raise DataError(f"{qrels_path}: every judged query has empty text in "
                      f"{folder / 'queries.jsonl'}")
  doc_ids = list(corpus)
  if max_docs and max_docs < len(doc_ids):
    keep, qrels = _subsample(doc_ids, qrels, max_docs, np.random.default_rng(seed))
    doc_ids = [d for d in doc_ids if d in keep]
  query_ids = sorted(qrels)
  return BeirData(tuple(doc_ids), tuple(corpus[d] for d in doc_ids), tuple(query_ids),
                  tuple(all_queries[q] for q in query_ids), qrels, empty)
