"""Fuzzing (hypothesis) of everything that reads input from the wild: the data readers (JSONL, BEIR
folders, HF / TFDS rows), tokenisation and truncation, the weight converter and the index loader.

The contract under test: every input either works or raises one of saejax's own errors
(`saejax.errors.SaejaxError`) with a message; any other exception is a bug. Examples are
derandomised (the same cases on every run) and small; each test prints how many cases it tried and
how they ended (run with -s to see them).

Two profiles: the default is fast and derandomised (CI: the same 780 cases on every run); the long
one draws new random cases on every run, >= 10,000 in all (README, Reliability):

  SAEJAX_FUZZ=long .venv/bin/python -m pytest -p no:xdist -s tests/test_fuzz.py

A failure there prints a `@reproduce_failure` blob; `--hypothesis-seed=N` replays a whole run.
"""

import collections
import json
import os
import struct
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings, strategies as st

from saejax.data import pipeline as data, sources as data_sources
from saejax.data.sources import RecordSource, SourceConfig, open_source
from saejax.data.tokenizer import load_tokenizer
from saejax.errors import SaejaxError
from saejax.hub import convert
from saejax.hub.demo import minilm_dir
from saejax.retrieval import encode
from saejax.retrieval.index import SparseIndex

PROFILES = ("fast", "long")
PROFILE = os.environ.get("SAEJAX_FUZZ") or "fast"
if PROFILE not in PROFILES:
  raise pytest.UsageError(f"SAEJAX_FUZZ={PROFILE!r}: use one of {PROFILES}")
LONG = PROFILE == "long"
# Cases per target (fast, long). The long counts are sized so the whole file runs in ~10-20 min on
# 2 CPU cores: the tokenizer and the converter cost ~50 ms a case, the readers a few ms.
CASES = {"jsonl": (150, 4000), "beir": (120, 3000), "hf/tfds rows": (200, 4000),
         "tokenize": (60, 2000), "convert": (100, 3000), "index": (150, 4000)}


def fuzz_settings(name: str) -> settings:
  """The hypothesis settings of one target under the chosen profile."""
  return settings(max_examples=CASES[name][LONG], deadline=None, derandomize=not LONG,
                  database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _outcome(name: str, fn, *args):
  """Run `fn`: returns its result or None after a SaejaxError; counts how the case ended."""
  try:
    result = fn(*args)
  except SaejaxError as e:
    assert str(e), f"{type(e).__name__} without a message"
    COUNTS[name][type(e).__name__] += 1
    return None
  COUNTS[name]["worked"] += 1
  return result


def _report(name: str):
  counts = COUNTS[name]
  print(f"\nfuzz {name} ({PROFILE}): {sum(counts.values())} cases: {dict(counts)}")
  assert sum(counts.values()) >= CASES[name][LONG]


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(minilm_dir())


# ---------------------------------------------------------------------------------------------
# Text values and lines as they come from the wild

# Control characters, combining marks, emoji, NUL, and the JSON escapes of lone surrogates.
TEXT = st.one_of(st.text(max_size=40),
                 st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
                 st.sampled_from(["", " ", "\x00", "\x1b[31mred", "\u202e", "a\u0301", "🦀" * 5,
                                  "\ud800", "x\udfffy"]),
                 st.builds(lambda w, n: " ".join([w] * n), st.sampled_from(["the", "é", "日本"]),
                           st.integers(100, 3000)))
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
# Well-formed values, so that some cases get past validation and exercise what comes after it.
GOOD_TEXT = st.one_of(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).filter(str.strip),
    st.sampled_from(["what is a kernel", "Linux kernel", "日本語のテキスト", "a\tb"]))
GOOD_RECORD = st.fixed_dictionaries({"query": GOOD_TEXT, "positive": GOOD_TEXT,
                                     "negatives": st.lists(GOOD_TEXT, min_size=1, max_size=2),
                                     "score": st.floats(0, 1), "label": st.sampled_from([1, 0])})
RECORD = st.fixed_dictionaries({}, optional={
    "query": JSON_VALUE | TEXT, "positive": JSON_VALUE | TEXT,
    "negatives": JSON_VALUE | st.lists(TEXT, max_size=3), "score": JSON_VALUE,
    "label": JSON_VALUE})


def _json_line(value) -> bytes:
  # ensure_ascii writes lone surrogates as \ud800 escapes, which json.loads turns back into them.
  return json.dumps(value, ensure_ascii=True).encode() + b"\n"


LINE = st.one_of(*[GOOD_RECORD.map(_json_line)] * 4, RECORD.map(_json_line),
                 JSON_VALUE.map(_json_line),
                 st.binary(max_size=60).map(lambda b: b + b"\n"),
                 st.sampled_from([b"\n", b"  \n", b"\xff\xfe{\n", b'{"query": "a"', b"\r\n"]))


def _read_all(source) -> int:
  records = [source[i] for i in range(len(source))]
  for r in records:
    assert r["query"].strip() and r["positive"].strip()
    r["query"].encode("utf-8")  # every text the source returns can reach the tokenizer
  return len(records)


# ---------------------------------------------------------------------------------------------
# 1. JSONL

def test_fuzz_jsonl_reader():
  @fuzz_settings("jsonl")
  @given(lines=st.lists(LINE, max_size=8), on_bad=st.sampled_from(["raise", "skip"]),
         negatives=st.booleans(), filtered=st.booleans())
  def case(lines, on_bad, negatives, filtered):
    with tempfile.TemporaryDirectory() as tmp:
      path = Path(tmp) / "pairs.jsonl"
      path.write_bytes(b"".join(lines))
      cfg = SourceConfig(kind="jsonl", path=str(path),
                         negative_fields=("negatives",) if negatives else (),
                         score_field="score" if filtered else None,
                         min_score=0.5 if filtered else None)
      source = _outcome("jsonl", lambda: open_source(cfg, num_negatives=int(negatives),
                                                     on_bad_record=on_bad))
      if source is not None:
        _read_all(source)
  case()
  _report("jsonl")


# ---------------------------------------------------------------------------------------------
# 2. BEIR folders

ID = st.sampled_from(["d1", "d2", "q1", "q2", "", "1"])
BEIR_ROW = st.fixed_dictionaries({}, optional={"_id": ID | JSON_VALUE, "title": JSON_VALUE,
                                               "text": TEXT | JSON_VALUE})
BEIR_LINE = st.one_of(BEIR_ROW.map(_json_line), LINE)
GOOD_QUERY = st.fixed_dictionaries({"_id": st.sampled_from(["q1", "q2"]), "text": GOOD_TEXT})
GOOD_DOC = st.fixed_dictionaries({"_id": st.sampled_from(["d1", "d2"]),
                                  "title": GOOD_TEXT | st.just(""), "text": GOOD_TEXT})
GOOD_QREL = st.tuples(st.sampled_from(["q1", "q2"]), st.sampled_from(["d1", "d2"])).map(
    lambda t: f"{t[0]}\t{t[1]}\t1\n".encode())
QRELS_LINE = st.one_of(*[GOOD_QREL] * 4,
    st.tuples(ID, ID, st.sampled_from(["1", "0", "2", "x", "nan", "-1"])).map(
        lambda t: "\t".join(t).encode() + b"\n"),
    st.binary(max_size=30).map(lambda b: b + b"\n"),
    st.just(b"query-id\tcorpus-id\tscore\n"))


def test_fuzz_beir_folder():
  @fuzz_settings("beir")
  @given(corpus=st.lists(st.one_of(*[GOOD_DOC.map(_json_line)] * 4, BEIR_LINE), max_size=5),
         queries=st.lists(st.one_of(*[GOOD_QUERY.map(_json_line)] * 4, BEIR_LINE), max_size=5),
         qrels=st.lists(QRELS_LINE, max_size=6), on_bad=st.sampled_from(["raise", "skip"]))
  def case(corpus, queries, qrels, on_bad):
    with tempfile.TemporaryDirectory() as tmp:
      folder = Path(tmp)
      (folder / "qrels").mkdir()
      # Every id of the good qrels exists unless a fuzzed line redefines or breaks it.
      base_docs = [_json_line({"_id": f"d{i}", "title": "", "text": f"doc {i}"}) for i in (1, 2)]
      base_queries = [_json_line({"_id": f"q{i}", "text": f"query {i}"}) for i in (1, 2)]
      (folder / "corpus.jsonl").write_bytes(b"".join(base_docs + corpus))
      (folder / "queries.jsonl").write_bytes(b"".join(base_queries + queries))
      (folder / "qrels" / "train.tsv").write_bytes(b"".join(qrels))
      source = _outcome("beir", lambda: open_source(SourceConfig(kind="beir", path=tmp),
                                                    on_bad_record=on_bad))
      if source is not None:
        _read_all(source)
  case()
  _report("beir")


# ---------------------------------------------------------------------------------------------
# 3. HF / TFDS rows: whatever `datasets` or `tfds.data_source` hand back for a row (str, bytes,
#    numpy scalars and arrays, lists, None) goes through the same RecordSource validation.

class RowTable:
  """Rows held in memory, as HfTable / TfdsTable expose a dataset split (`_Table` protocol)."""

  def __init__(self, rows):
    self.rows, self.load_problems = rows, []

  def __len__(self):
    return len(self.rows)

  def row(self, i):
    return self.rows[i]

  def where(self, i):
    return f"hf:fuzz[train] row {i}"


NUMPY_VALUE = st.one_of(
    st.binary(max_size=20).map(np.bytes_), TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(-5, 5).map(np.int64), st.floats(width=32).map(np.float32),
    st.lists(TEXT, max_size=3).map(lambda x: np.asarray(x, dtype=object)),
    st.lists(st.binary(max_size=8), max_size=3).map(lambda x: np.asarray(x, dtype=object)),
    st.lists(st.integers(0, 3), min_size=1, max_size=3).map(np.asarray))
ROW = st.fixed_dictionaries({}, optional={k: JSON_VALUE | NUMPY_VALUE | TEXT for k in
                                          ("query", "positive", "negatives", "score", "label")})


def test_fuzz_hf_tfds_rows():
  @fuzz_settings("hf/tfds rows")
  @given(rows=st.lists(st.one_of(*[GOOD_RECORD] * 3, ROW), min_size=1, max_size=5),
         on_bad=st.sampled_from(["raise", "skip"]),
         kind=st.sampled_from(["plain", "negatives", "score", "label"]))
  def case(rows, on_bad, kind):
    _one_table(rows, on_bad, kind)
  case()
  _report("hf/tfds rows")


def _one_table(rows, on_bad, kind):
  cfg = SourceConfig(kind="hf", path="fuzz", negative_fields=("negatives",) * (kind == "negatives"),
                     score_field="score" if kind == "score" else None,
                     min_score=0.0 if kind == "score" else None,
                     label_field="label" if kind == "label" else None,
                     label_values=(1, "yes", b"yes") if kind == "label" else ())
  source = _outcome("hf/tfds rows", lambda: RecordSource(
      RowTable(rows), data_sources._fields_of(cfg), on_bad_record=on_bad,
      min_negatives=1 if kind == "negatives" else 0))
  if source is not None:
    _read_all(source)


# ---------------------------------------------------------------------------------------------
# 4. Tokenisation and truncation

SAFE_TEXT = TEXT.filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t))


def test_fuzz_batch_tokenizer(tokenizer):
  @fuzz_settings("tokenize")
  @given(queries=st.lists(SAFE_TEXT, min_size=1, max_size=3),
         docs=st.lists(SAFE_TEXT, min_size=3, max_size=3),
         max_len=st.sampled_from([2, 3, 8, 64]), padding=st.sampled_from(["bucket", "fixed"]))
  def case(queries, docs, max_len, padding):
    _one_batch(tokenizer, queries, docs, max_len, padding)
  case()
  _report("tokenize")


def _one_batch(tokenizer, queries, docs, max_len, padding):
  batch_fn = data.BatchTokenizer(tokenizer, max_query_len=max_len, max_doc_len=max_len,
                                 num_negatives=2, buckets=(2, 8, 64), padding=padding)
  records = [{"query": q, "positive": docs[0], "negatives": docs[1:]} for q in queries]
  batch = _outcome("tokenize", batch_fn, records)
  assert batch is not None  # every str is a valid text; nothing here may be refused
  for ids, valid, cut in ((batch["q_ids"], batch["q_valid"], batch["q_truncated"]),
                          (batch["d_ids"].reshape(-1, batch["d_ids"].shape[-1]),
                           batch["d_valid"].reshape(-1, batch["d_valid"].shape[-1]),
                           batch["d_truncated"].reshape(-1))):
    lengths = valid.sum(-1)
    assert (lengths <= max_len).all() and (lengths >= 2).all()
    assert (ids[:, 0] == tokenizer.token_to_id("[CLS]")).all()
    assert (ids[np.arange(len(ids)), lengths - 1] == tokenizer.token_to_id("[SEP]")).all()
    assert (~cut | (lengths == max_len)).all()  # a truncated text fills its budget


@pytest.mark.parametrize("max_len", [512, 8192])
def test_texts_of_8192_plus_tokens_are_truncated_and_flagged(tokenizer, max_len):
  long = " ".join(f"w{i}" for i in range(9000))  # > 2 tokens a word: ~18,000 tokens
  ids, truncated = encode.tokenize(tokenizer, [long, "short text", ""], max_len)
  assert [len(x) for x in ids][0] == max_len and truncated.tolist() == [True, False, False]
  assert ids[0][-1] == tokenizer.token_to_id("[SEP]") and ids[2] == [101, 102]
  batch = data.BatchTokenizer(tokenizer, max_query_len=16, max_doc_len=max_len, num_negatives=0,
                              padding="fixed")([{"query": long, "positive": long, "negatives": []}])
  assert batch["q_valid"].sum() == 16 and batch["d_valid"].sum() == max_len
  assert batch["q_truncated"].all() and batch["d_truncated"].all()


# ---------------------------------------------------------------------------------------------
# 5. Weight converter

TINY_BERT = dict(model_type="bert", architectures=["BertModel"], vocab_size=40, hidden_size=8,
                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                 max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12,
                 hidden_act="gelu")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny BERT written by saejax.hub.convert.save_hf: config.json + model.safetensors."""
  arch = convert.architecture(TINY_BERT)
  cfg = arch.config_cls.from_hf_config(TINY_BERT)
  out = convert.save_hf(cfg, arch.build(cfg, rngs=nnx.Rngs(0)), tmp_path_factory.mktemp("hf"))
  convert.load_hf(out)  # the unmutated file loads
  return out


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
  n = struct.unpack("<Q", raw[:8])[0]
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header: dict, body: bytes) -> bytes:
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + body


DTYPES = ["F16", "BF16", "F32", "F64", "I8", "I32", "I64", "U8", "BOOL", "F8_E4M3", "XX"]


@st.composite
def mutated_safetensors(draw, raw: bytes) -> bytes:
  header, body = _split_safetensors(raw)
  names = sorted(k for k in header if k != "__metadata__")
  kind = draw(st.sampled_from(["truncate", "bytes", "dtype", "shape", "offsets", "header",
                               "drop", "rename"]))
  if kind == "truncate":
    return raw[:draw(st.integers(0, len(raw) - 1))]
  if kind == "bytes":  # overwrite a few bytes anywhere, header included
    at = draw(st.integers(0, len(raw) - 1))
    junk = draw(st.binary(min_size=1, max_size=16))
    return raw[:at] + junk + raw[at + len(junk):]
  name = draw(st.sampled_from(names))
  entry = header[name]
  if kind == "dtype":  # same bytes, another dtype (sizes may then disagree)
    entry["dtype"] = draw(st.sampled_from(DTYPES))
  elif kind == "shape":
    entry["shape"] = draw(st.lists(st.integers(0, 64), max_size=3))
  elif kind == "offsets":
    entry["data_offsets"] = sorted(draw(st.lists(st.integers(-2, len(body) + 8), min_size=2,
                                                 max_size=2)))
  elif kind == "header":
    entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUE)
  elif kind == "drop":
    del header[name]
  else:
    header[name + draw(st.text(min_size=1, max_size=3))] = header.pop(name)
  return _join_safetensors(header, body)


@st.composite
def consistent_wrong_tensor(draw, tensors: dict) -> dict:
  """A well-formed file whose one tensor has a wrong dtype or shape."""
  tensors = dict(tensors)
  name = draw(st.sampled_from(sorted(tensors)))
  value = tensors[name]
  if draw(st.booleans()):
    tensors[name] = value.astype(draw(st.sampled_from([np.float16, np.float64, np.int32,
                                                       np.int8, np.bool_, np.uint8])))
  else:
    shape = tuple(draw(st.lists(st.integers(1, 20), min_size=1, max_size=3)))
    tensors[name] = np.zeros(shape, np.float32)
  return tensors


def test_fuzz_weight_converter(hf_dir):
  @fuzz_settings("convert")
  @given(data_=st.data())
  def case(data_):
    _one_checkpoint(hf_dir, data_)
  case()
  _report("convert")


def _one_checkpoint(hf_dir, data_):
  from safetensors.numpy import load_file, save_file
  raw = (hf_dir / "model.safetensors").read_bytes()
  with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "config.json").write_text((hf_dir / "config.json").read_text())
    if data_.draw(st.booleans()):
      (Path(tmp) / "model.safetensors").write_bytes(data_.draw(mutated_safetensors(raw)))
    else:
      save_file(data_.draw(consistent_wrong_tensor(load_file(hf_dir / "model.safetensors"))),
                Path(tmp) / "model.safetensors")
    result = _outcome("convert", convert.load_hf, tmp)
    if result is not None:
      for leaf in jax.tree.leaves(nnx.state(result[1], nnx.Param)):
        assert leaf.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# 6. Index loader

@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  values = rng.random((30, 4), dtype=np.float32)
  indices = np.stack([rng.choice(64, 4, replace=False) for _ in range(30)]).astype(np.int32)
  return SparseIndex.build(values, indices, num_latents=64).save(
      tmp_path_factory.mktemp("idx") / "index")


@st.composite
def damaged_index(draw, files: dict[str, bytes]) -> dict[str, bytes]:
  files = dict(files)
  name = draw(st.sampled_from(sorted(files)))
  kind = draw(st.sampled_from(["truncate", "bytes", "delete", "swap", "array", "header"]))
  if kind == "truncate":
    files[name] = files[name][:draw(st.integers(0, max(0, len(files[name]) - 1)))]
  elif kind == "bytes":
    at = draw(st.integers(0, len(files[name]) - 1))
    junk = draw(st.binary(min_size=1, max_size=8))
    files[name] = files[name][:at] + junk + files[name][at + len(junk):]
  elif kind == "delete":
    del files[name]
  elif kind == "swap":  # a well-formed file in the wrong place
    other = draw(st.sampled_from(sorted(files)))
    files[name], files[other] = files[other], files[name]
  elif kind == "array":  # a valid .npy of another dtype / shape / contents
    import io
    buf = io.BytesIO()
    dtype = draw(st.sampled_from([np.int64, np.int32, np.float32, np.float16, np.float64]))
    length = draw(st.integers(0, 80))
    np.save(buf, (np.arange(length) * draw(st.sampled_from([1, -1, 0, 3]))).astype(dtype))
    files[draw(st.sampled_from([f for f in sorted(files) if f.endswith(".npy")]))] = buf.getvalue()
  else:
    header = json.loads(files.get("header.json", b"{}") or b"{}") if name == "header.json" else {}
    if name == "header.json" and isinstance(header, dict):
      header[draw(st.sampled_from(sorted(header) or ["num_docs"]))] = draw(JSON_VALUE)
      files[name] = json.dumps(header).encode()
  return files


def test_fuzz_index_loader(index_dir):
  @fuzz_settings("index")
  @given(data_=st.data())
  def case(data_):
    _one_index(index_dir, data_)
  case()
  _report("index")


def _one_index(index_dir, data_):
  original = {p.name: p.read_bytes() for p in index_dir.iterdir()}
  files = data_.draw(damaged_index(original))
  with tempfile.TemporaryDirectory() as tmp:
    for name, raw in files.items():
      (Path(tmp) / name).write_bytes(raw)
    index = _outcome("index", SparseIndex.load, tmp)
    if index is not None:  # what loads must also search without touching memory out of bounds
      q_idx = np.array([[0, 5, 63]], np.int32)
      scores, ids = index.search(np.ones((1, 3), np.float32), q_idx, top_k=5)
      assert scores.shape == ids.shape == (1, 5)


# ---------------------------------------------------------------------------------------------
# The bugs fuzzing found, pinned as plain examples

def test_found_lone_surrogate_in_jsonl_is_a_data_error(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text('{"query": "ok", "positive": "fine"}\n{"query": "a\\ud800b", "positive": "x"}\n')
  with pytest.raises(SaejaxError, match=f"{path} line 2: field 'query' is not valid Unicode"):
    open_source(SourceConfig(kind="jsonl", path=str(path)))
  assert len(open_source(SourceConfig(kind="jsonl", path=str(path)), on_bad_record="skip")) == 1


def test_found_non_utf8_beir_lines_are_data_errors(tmp_path):
  (tmp_path / "qrels").mkdir()
  (tmp_path / "corpus.jsonl").write_bytes(b'{"_id": "d1", "text": "doc"}\n\xff\xfe\n')
  (tmp_path / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "query"}\n')
  (tmp_path / "qrels" / "train.tsv").write_bytes(b"q1\td1\t1\n\x80\n")
  cfg = SourceConfig(kind="beir", path=str(tmp_path))
  with pytest.raises(SaejaxError, match=r"train.tsv line 2: not UTF-8"):
    open_source(cfg)
  source = open_source(cfg, on_bad_record="skip")
  assert len(source) == 1 and source.num_skipped == 2  # the corpus line and the qrels line


def test_found_array_label_is_a_data_error():
  cfg = SourceConfig(kind="hf", path="fuzz", label_field="label", label_values=(1,))
  rows = [{"query": "q", "positive": "p", "label": np.asarray([1, 1])}]
  with pytest.raises(SaejaxError, match="row 0: label field 'label' must be one string or number"):
    RecordSource(RowTable(rows), data_sources._fields_of(cfg))
  rows[0]["label"] = np.int64(1)  # a numpy scalar label (TFDS) compares as its value
  assert len(RecordSource(RowTable(rows), data_sources._fields_of(cfg))) == 1


@pytest.mark.parametrize("damage", ["token", "shape"])
def test_found_damaged_npy_header_is_a_checkpoint_error(index_dir, tmp_path, damage):
  # The long run's crash: numpy parses a .npy header as a Python literal, and a damaged quote
  # escaped as tokenize.TokenError. A header claiming a huge shape made np.load try to allocate it.
  for p in index_dir.iterdir():
    (tmp_path / p.name).write_bytes(p.read_bytes())
  raw = (tmp_path / "doc_ids.npy").read_bytes()
  old, new = {"token": (b"{'descr'", b"{[descr'"), "shape": (b"(30,), ", b"(9999999999999,)")}[damage]
  (tmp_path / "doc_ids.npy").write_bytes(raw.replace(old, new, 1))
  with pytest.raises(SaejaxError, match=r"doc_ids\.npy is truncated or not a \.npy array"):
    SparseIndex.load(tmp_path)
