"""The training data pipeline: text sources -> shuffled, sharded, resumable token batches.

Built on grain, in this order:

  per source: RecordSource (saejax.data.sources) -> shuffle(seed, reshuffled every epoch) -> repeat
  -> MapDataset.mix(weights): the global record stream (random access, the same in every process)
  -> global batches of `global_batch_size` records with no repeated text (below); this process
     keeps rows [shard_index::shard_count]
  -> tokenisation + bucketed padding -> a prefetch thread.

No repeated text in a global batch. InfoNCE scores every query against every document of the
global batch, so a text that appears twice is a false negative: a document that is the positive of
two records (or one record's positive and another's hard negative), or one query twice with two
positives. A global batch never holds two records with the same query text, nor a text that is the
positive of one record and the positive or a (used) hard negative of another. A record that would
break this is deferred: it waits, in stream order, and joins the first later batch it fits, ahead
of unread records. At most `WAITING_BATCHES` global batches' worth of records wait; a repeat beyond
that (a source that repeats a few texts in most records) is dropped, counted in the iterator state
("dropped") and logged. At the end of a finite stream the records of a last, unfilled batch are not yielded (as
`drop_remainder`), nor are the deferred ones; the final state says how many waited.

Resume: the iterator state is {"next_index": batches yielded, "next_record": the first unread
stream position, "deferred": the stream positions of the waiting records, "dropped": n}, all plain
integers, so `get_state`/`set_state` and `grain.checkpoint.CheckpointSave` / `CheckpointRestore`
(Orbax) resume at exactly the next batch. Every process assembles the same global batch (it reads
the texts of all G records, a small part of a step) and tokenises only its own rows, so global
batch i is the same whatever the number of processes: process p holds its rows p, p + P, ...

Batches are dicts of numpy arrays in the layout of InfoNCE with hard negatives (van den Oord et al.,
2018; Karpukhin et al., 2020): d_ids[:, 0] is each query's positive, d_ids[:, 1:] its H hard
negatives, the other rows' documents serve as in-batch negatives.

Tokenisation uses the tokenizer's own post-processor, which adds [CLS] ... [SEP] as the encoder was
trained with, and its own truncation (the final [SEP] survives truncation). Queries and documents
have separate maximum lengths; every truncated text is flagged in the batch (`q_truncated`,
`d_truncated`), never dropped silently.

Length bucketing: each batch is padded to the smallest configured bucket that holds its longest
sequence, so a jitted step compiles at most len(buckets) shapes per input instead of one per length.

Multi-host: `jax.make_array_from_process_local_data` needs every process to contribute arrays of
one shape, but each process buckets its own records and may pick a different T. Either set
`padding="fixed"` (T = max_query_len / max_doc_len always: one shape, more padding), or agree on
the bucket each step: all-gather each process's (Tq, Td), take the maximum and `pad_batch` up to it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Literal, TypedDict

import grain
import numpy as np
from jaxtyping import Bool, Int32
from tokenizers import Tokenizer

from saejax.data.sources import (Bm25NegativesSource, OnBadRecord, Record, RecordSource,
                                 SourceConfig, open_source)
from saejax.data.tokenizer import pad_id, truncating_copy
from saejax.errors import ConfigError, DataError

__all__ = ["Batch", "BatchTokenizer", "DataConfig", "DistinctBatches", "Pipeline", "SourceConfig",
           "bucket_length", "make_iterator", "make_pipeline", "pad_batch"]

log = logging.getLogger(__name__)

# Records that wait for a later batch (they repeat a text of the one being built), in global
# batches: room for chance clusters of repeats in a shuffled stream. Data that needs more repeats a
# few texts in most records, and no queue keeps up with it.
WAITING_BATCHES = 4

# Shape legend: B = per-process batch, Tq / Td = query / document length (a bucket),
# H = hard negatives per query, so each query has 1 + H documents.


class Batch(TypedDict):
  """One per-process batch. Padding positions hold the tokenizer's pad id and valid == False."""
  q_ids: Int32[np.ndarray, "B Tq"]
  q_valid: Bool[np.ndarray, "B Tq"]
  d_ids: Int32[np.ndarray, "B 1+H Td"]
  d_valid: Bool[np.ndarray, "B 1+H Td"]
  q_truncated: Bool[np.ndarray, "B"]  # the query lost tokens to max_query_len
  d_truncated: Bool[np.ndarray, "B 1+H"]  # the document lost tokens to max_doc_len
  source: Int32[np.ndarray, "B"]  # each record's source, its index in DataConfig.sources


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The whole training data pipeline: sources, lengths, batching, negatives, order."""
  # The sources, mixed by their weights; one source is read on its own.
  sources: tuple[SourceConfig, ...]
  # Records per step over all processes; each process takes global_batch_size / process count.
  global_batch_size: int = 32
  # Token budget of a query / a document, [CLS] and [SEP] included; longer texts are truncated
  # (and flagged in the batch).
  max_query_len: int = 64
  max_doc_len: int = 256
  # Allowed padded lengths, increasing; the last must be >= both max lengths (padding="bucket").
  buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
  # "bucket": pad T to the smallest bucket that fits the batch (few compiled shapes);
  # "fixed": T = max_query_len / max_doc_len always (one shape; the safe choice on several hosts).
  padding: Literal["bucket", "fixed"] = "bucket"
  # H, hard negatives per query: read from the sources' negative fields, or mined with BM25 for
  # sources without them. 0 trains on in-batch negatives only.
  num_hard_negatives: int = 0
  # Seed of the shuffle (each source gets its own stream derived from it).
  seed: int = 0
  # Shuffle records (reshuffled every epoch); False reads each source in file order.
  shuffle: bool = True
  # Passes over the data; None repeats forever. With a mixture, ends when a source runs out.
  num_epochs: int | None = None
  # Draw each global batch from one source (picked by weight, as records are otherwise), so a
  # query's in-batch negatives come from its own domain, as sentence-transformers' proportional
  # multi-dataset sampler does; False mixes the sources record by record. A record deferred for a
  # repeated text may still join a later batch of another source.
  batch_by_source: bool = False
  # "raise": a bad record stops the run with its file and line; "skip": drop and count it.
  on_bad_record: OnBadRecord = "raise"
  # grain prefetch: threads reading records ahead, and batches buffered ahead of the training step.
  read_threads: int = 2
  prefetch_batches: int = 4

  def __post_init__(self):
    if not self.sources:
      raise ConfigError("DataConfig.sources is empty")
    if self.global_batch_size < 1:
      raise ConfigError(f"DataConfig.global_batch_size must be >= 1, got {self.global_batch_size}")
    for key in ("max_query_len", "max_doc_len"):
      if getattr(self, key) < 2:  # room for [CLS] and [SEP]
        raise ConfigError(f"DataConfig.{key} must be >= 2, got {getattr(self, key)}")
    if self.padding not in ("bucket", "fixed"):
      raise ConfigError(f"DataConfig.padding must be 'bucket' or 'fixed', got {self.padding!r}")
    if self.padding == "bucket":
      if not self.buckets or any(b <= a for a, b in zip(self.buckets, self.buckets[1:])):
        raise ConfigError(f"DataConfig.buckets must be non-empty and increasing, "
                          f"got {self.buckets}")
      if self.buckets[-1] < max(self.max_query_len, self.max_doc_len):
        raise ConfigError(f"DataConfig.buckets {self.buckets} end below max_query_len="
                          f"{self.max_query_len} / max_doc_len={self.max_doc_len}")
    if self.num_hard_negatives < 0:
      raise ConfigError(f"DataConfig.num_hard_negatives must be >= 0, "
                        f"got {self.num_hard_negatives}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ConfigError(f"DataConfig.num_epochs must be >= 1 or None, got {self.num_epochs}")
    if self.on_bad_record not in ("raise", "skip"):
      raise ConfigError(f"DataConfig.on_bad_record must be 'raise' or 'skip', "
                        f"got {self.on_bad_record!r}")


def bucket_length(longest: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `longest` (buckets increasing)."""
  for bucket in buckets:
    if bucket >= longest:
      return bucket
  raise ConfigError(f"a sequence of {longest} tokens fits no bucket in {tuple(buckets)}")



class BatchTokenizer:
  """grain `batch_fn`: a list of records -> a `Batch` of bucketed, padded token ids."""

  def __init__(self, tokenizer: Tokenizer, *, max_query_len: int, max_doc_len: int,
               num_negatives: int, buckets: Sequence[int] = (),
               padding: Literal["bucket", "fixed"] = "bucket"):
    # The post-processor is what adds [CLS] ... [SEP]; without it the encoder sees bare text.
    if tokenizer.post_processor is None:
      raise ConfigError("the tokenizer has no post-processor, so it would add no [CLS]/[SEP]; "
                        "load the model's own tokenizer.json")
    self._query_tok = truncating_copy(tokenizer, max_query_len)
    self._doc_tok = truncating_copy(tokenizer, max_doc_len)
    self.pad_id = pad_id(tokenizer)
    self.max_query_len, self.max_doc_len = max_query_len, max_doc_len
    self.num_negatives, self.buckets, self.padding = num_negatives, tuple(buckets), padding

  def _pad(self, texts: list[str], tokenizer: Tokenizer, max_len: int):
    encodings = tokenizer.encode_batch(texts)
    lengths = np.asarray([len(e.ids) for e in encodings])
    width = max_len if self.padding == "fixed" else bucket_length(lengths.max(), self.buckets)
    ids = np.full((len(texts), width), self.pad_id, np.int32)
    for row, encoding in zip(ids, encodings):
      row[:len(encoding.ids)] = encoding.ids
    valid = np.arange(width) < lengths[:, None]
    # Truncation with stride 0 moves the cut-off tokens into `overflowing`.
    truncated = np.asarray([bool(e.overflowing) for e in encodings])
    return ids, valid, truncated

  def __call__(self, records: Sequence[Record]) -> Batch:
    h = self.num_negatives
    docs = []
    for record in records:
      if len(record["negatives"]) < h:
        raise DataError(f"a record has {len(record['negatives'])} negatives, {h} needed "
                        f"(query {record['query'][:60]!r})")
      docs += [record["positive"], *record["negatives"][:h]]
    q_ids, q_valid, q_truncated = self._pad([r["query"] for r in records], self._query_tok,
                                            self.max_query_len)
    d_ids, d_valid, d_truncated = self._pad(docs, self._doc_tok, self.max_doc_len)
    b = len(records)
    return {"q_ids": q_ids, "q_valid": q_valid,
            "d_ids": d_ids.reshape(b, 1 + h, -1), "d_valid": d_valid.reshape(b, 1 + h, -1),
            "q_truncated": q_truncated, "d_truncated": d_truncated.reshape(b, 1 + h),
            "source": np.asarray([r.get("source", 0) for r in records], np.int32)}


def pad_batch(batch: Batch, *, q_len: int, d_len: int, pad_id: int) -> Batch:
  """`batch` padded on the right to query length `q_len` and document length `d_len`.

  For multi-host bucketing: after the processes agree on the largest bucket, each pads up to it.
  """
  def grow(x: np.ndarray, width: int, fill) -> np.ndarray:
    if width < x.shape[-1]:
      raise ConfigError(f"pad_batch cannot shrink length {x.shape[-1]} to {width}")
    pad = [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
    return np.pad(x, pad, constant_values=fill)
  return {**batch,
          "q_ids": grow(batch["q_ids"], q_len, pad_id),
          "q_valid": grow(batch["q_valid"], q_len, False),
          "d_ids": grow(batch["d_ids"], d_len, pad_id),
          "d_valid": grow(batch["d_valid"], d_len, False)}


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None and shard_count is None:
    options = grain.sharding.ShardByJaxProcess()
    return options.shard_index, options.shard_count
  if shard_index is None or shard_count is None:
    raise ConfigError(f"give both shard_index and shard_count or neither "
                      f"(got {shard_index}, {shard_count})")
  if not 0 <= shard_index < shard_count:
    raise ConfigError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
  return shard_index, shard_count


def _source_seed(seed: int, i: int) -> int:
  # Independent shuffle streams per source; grain wants a seed in [0, 2**32).
  return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def _tag_source(index: int, record: Record) -> Record:
  return {**record, "source": index}


class _Unblocked(grain.MapDataset):
  """The records of a stream of equal-size blocks (lists), in order: record i is
  ``parent[i // size][i % size]``."""

  def __init__(self, parent: grain.MapDataset, size: int):
    super().__init__(parent)
    self._size = size

  def __len__(self) -> int:
    return min(len(self._parent) * self._size, sys.maxsize)  # a repeated stream is sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[index // self._size][index % self._size]


class _BatchTexts:
  """The texts one global batch already holds; `admits` refuses a record that would repeat one."""

  def __init__(self, num_negatives: int):
    self.num_negatives = num_negatives
    self.queries: set[str] = set()
    self.positives: set[str] = set()
    self.negatives: set[str] = set()

  def admits(self, record: Record) -> bool:
    """True (and the record's texts are now held) when the record repeats no text of the batch."""
    negatives = record["negatives"][:self.num_negatives]  # only these reach the batch
    if (record["query"] in self.queries or record["positive"] in self.positives
        or record["positive"] in self.negatives or not self.positives.isdisjoint(negatives)):
      return False
    self.queries.add(record["query"])
    self.positives.add(record["positive"])
    self.negatives.update(negatives)
    return True


class DistinctBatches(grain.IterDataset):
  """This process's rows of each global batch of `global_batch_size` records of `stream` with no
  repeated text (module docstring): lists of records, before tokenisation."""

  def __init__(self, stream: grain.MapDataset, *, global_batch_size: int, num_negatives: int,
               num_records: int, shard_index: int, shard_count: int,
               read_options: grain.ReadOptions):
    """`num_records`: records in the sources (an epoch); a batch that refuses that many records in
    a row gives up with a DataError instead of reading a repeated stream forever."""
    super().__init__()
    self.stream, self.global_batch_size = stream, global_batch_size
    self.num_negatives, self.num_records = num_negatives, num_records
    self.shard_index, self.shard_count, self.read_options = shard_index, shard_count, read_options

  def __iter__(self) -> "_DistinctBatchIterator":
    return _DistinctBatchIterator(self)


class _DistinctBatchIterator(grain.DatasetIterator):
  """Assembles the global batches in stream order; its state is a few integers (module docstring)."""

  def __init__(self, ds: DistinctBatches):
    super().__init__()
    self._ds = ds
    self._batches, self._next_record, self._dropped = 0, 0, 0
    self._deferred: list[tuple[int, Record]] = []  # (stream position, record), oldest first
    self._reader: Iterator[Record] | None = None  # reads the stream from _next_record on

  def _read(self) -> Iterator[Record]:
    if self._reader is None:
      self._reader = iter(self._ds.stream[self._next_record:].to_iter_dataset(
          self._ds.read_options))
    return self._reader

  def _reset_reader(self):
    if self._reader is not None:
      self._reader.close()
    self._reader = None

  def __next__(self) -> list[Record]:
    try:
      return self._next_batch()
    except BaseException:
      # The reader may have moved past the last batch yielded: restart it there, so the state
      # (and a retry) still describe exactly the next batch.
      self._reset_reader()
      raise

  def _next_batch(self) -> list[Record]:
    g = self._ds.global_batch_size
    texts, batch, waiting = _BatchTexts(self._ds.num_negatives), [], []
    for item in self._deferred:  # the oldest waiting records go first
      (batch if len(batch) < g and texts.admits(item[1]) else waiting).append(item)
    position, dropped, refused = self._next_record, 0, 0
    reader = self._read()
    while len(batch) < g:
      record = next(reader)  # StopIteration at the end of a finite stream; no state changed
      if texts.admits(record):
        batch.append((position, record))
        refused = 0
      else:
        refused += 1
        if refused >= self._ds.num_records:  # about an epoch: no record of the data fits
          raise DataError(
              f"global batch {self._batches}: the last {refused} records read all repeat a query "
              f"or document of the {len(batch)} already in it; the data has too few distinct "
              f"texts for global_batch_size={g}")
        if len(waiting) < WAITING_BATCHES * g:
          waiting.append((position, record))
        else:
          dropped += 1
      position += 1
    self._batches, self._next_record, self._deferred = self._batches + 1, position, waiting
    if dropped:
      self._dropped += dropped
      log.warning("global batch %d: dropped %d records that repeat a text of the batch while %d "
                  "others wait (%d dropped so far)", self._batches - 1, dropped, len(waiting),
                  self._dropped)
    return [record for _, record in batch[self._ds.shard_index::self._ds.shard_count]]

  def get_state(self) -> dict:
    return {"next_index": self._batches, "next_record": self._next_record,
            "deferred": [position for position, _ in self._deferred], "dropped": self._dropped}

  def set_state(self, state: dict):
    self._reset_reader()
    self._batches = int(state["next_index"])
    # A checkpoint from before batches deferred repeats holds only next_index: batch n began at
    # stream record n * G and nothing waited.
    self._next_record = int(state.get("next_record", self._batches * self._ds.global_batch_size))
    self._deferred = [(int(p), self._ds.stream[int(p)]) for p in state.get("deferred", ())]
    self._dropped = int(state.get("dropped", 0))


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """This process's view of the data: the record stream, its batches and the sources behind them."""
  # The global record stream (shuffled, repeated, mixed), before batching; every process builds
  # the same one.
  stream: grain.MapDataset
  # This process's rows of each global batch, as records (before tokenisation).
  record_batches: DistinctBatches
  # The same batches tokenised: `Batch`es of `batch_size` rows.
  batches: grain.IterDataset
  # The opened sources, in config order (`record_counts`: what each kept and dropped).
  sources: tuple[RecordSource | Bm25NegativesSource, ...]
  batch_size: int
  shard_index: int
  shard_count: int
  prefetch_batches: int

  def iterator(self) -> grain.DatasetIterator:
    """A fresh checkpointable iterator over `batches` (get_state / set_state, Orbax handler),
    tokenising up to `prefetch_batches` batches ahead in a thread."""
    return iter(grain.experimental.ThreadPrefetchIterDataset(
        self.batches, prefetch_buffer_size=self.prefetch_batches))

  def record_counts(self) -> dict[str, dict[str, int]]:
    """Per source: records kept, bad records skipped, rows refused by the filter, rows dropped
    because a hard negative they would train with is their positive."""
    counts = {}
    for source in self.sources:
      base = source.base if isinstance(source, Bm25NegativesSource) else source
      counts[base.name] = {"records": len(base), "skipped": base.num_skipped,
                           "filtered": base.num_filtered,
                           "false_negatives": base.num_false_negatives}
    return counts


def make_pipeline(cfg: DataConfig, tokenizer: Tokenizer, *, shard_index: int | None = None,
                  shard_count: int | None = None) -> Pipeline:
  """Opens the sources (mining BM25 negatives where needed) and builds this process's pipeline.

  Args:
    cfg: the data config.
    tokenizer: the encoder's tokenizer (its post-processor adds the special tokens).
    shard_index: this process's shard; None with shard_count None means jax.process_index().
    shard_count: number of shards; None with shard_index None means jax.process_count().

  Returns:
    The `Pipeline`; `pipeline.iterator()` yields `Batch`es.
  """
  shard_index, shard_count = _shard(shard_index, shard_count)
  if cfg.global_batch_size % shard_count:
    raise ConfigError(f"DataConfig.global_batch_size={cfg.global_batch_size} is not divisible by "
                      f"the {shard_count} processes (shards)")
  batch_size = cfg.global_batch_size // shard_count
  sources = tuple(open_source(s, num_negatives=cfg.num_hard_negatives,
                              on_bad_record=cfg.on_bad_record) for s in cfg.sources)
  parts = []
  for i, source in enumerate(sources):
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
      ds = ds.shuffle(seed=_source_seed(cfg.seed, i))
    parts.append(ds.repeat(cfg.num_epochs).map(functools.partial(_tag_source, i)))
  weights = [s.weight for s in cfg.sources]
  if len(parts) == 1:
    stream = parts[0]
  elif cfg.batch_by_source:  # mix blocks of one global batch each, then read them record by record
    blocks = [part.batch(cfg.global_batch_size, drop_remainder=True, batch_fn=list)
              for part in parts]
    stream = _Unblocked(grain.MapDataset.mix(blocks, weights=weights), cfg.global_batch_size)
  else:
    stream = grain.MapDataset.mix(parts, weights=weights)
  # Records are read ahead one global batch at a time (each process reads all of its texts).
  read_options = grain.ReadOptions(num_threads=cfg.read_threads,
                                   prefetch_buffer_size=cfg.global_batch_size)
  record_batches = DistinctBatches(stream, global_batch_size=cfg.global_batch_size,
                                   num_negatives=cfg.num_hard_negatives,
                                   num_records=sum(len(s) for s in sources),
                                   shard_index=shard_index, shard_count=shard_count,
                                   read_options=read_options)
  batch_fn = BatchTokenizer(tokenizer, max_query_len=cfg.max_query_len,
                            max_doc_len=cfg.max_doc_len, num_negatives=cfg.num_hard_negatives,
                            buckets=cfg.buckets, padding=cfg.padding)
  return Pipeline(stream=stream, record_batches=record_batches,
                  batches=record_batches.map(batch_fn), sources=sources, batch_size=batch_size,
                  shard_index=shard_index, shard_count=shard_count,
                  prefetch_batches=cfg.prefetch_batches)


def make_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, shard_index: int | None = None,
                  shard_count: int | None = None) -> grain.DatasetIterator:
  """This process's checkpointable batch iterator (see `make_pipeline` for the arguments)."""
  return make_pipeline(cfg, tokenizer, shard_index=shard_index, shard_count=shard_count).iterator()
