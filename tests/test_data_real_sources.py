"""The hf and tfds readers run for real, offline: datasets written to a temporary folder with
`datasets` and `tensorflow_datasets` themselves, read back through `open_source` (the same
`datasets.load_dataset` / `tfds.data_source` calls a hub id or a prepared TFDS name takes).

Rows are real sentence pairs from ../shared/data (STS-B for the score filter, MRPC for the
label filter); each row gets hard negatives taken from the positives of the next rows that differ
from its own (STS-B repeats sentences: its own positive as a negative is a bad record).
"""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from saejax.data.sources import SourceConfig, open_source
from saejax.errors import DataError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NUM_ROWS = 50

# dataset -> (its file, the extra field kept, the filter: SourceConfig fields and the same rule
# written independently, against which open_source's records are checked).
DATASETS = {
    "stsbenchmark": ("score", dict(score_field="score", min_score=3.0),
                     lambda row: row["score"] >= 3.0),
    "mrpc": ("label", dict(label_field="label", label_values=(1,)),
             lambda row: row["label"] == 1),
}


def rows_of(dataset: str) -> list[dict]:
  """NUM_ROWS rows {query, positive, negative, negatives, score | label} of real text."""
  path = DATA / dataset / "train.jsonl"
  if not path.is_file():
    pytest.skip(f"real data {path} is absent (../shared/data is laid beside the checkout)")
  extra = DATASETS[dataset][0]
  with open(path) as f:
    pairs = [json.loads(line) for _, line in zip(range(NUM_ROWS + 10), f)]
  rows = []
  for i, p in enumerate(pairs[:NUM_ROWS]):
    later = [q["sentence2"] for q in pairs[i + 1:] if q["sentence2"] != p["sentence2"]]
    rows.append({"query": p["sentence1"], "positive": p["sentence2"], "negative": later[0],
                 "negatives": later[1:3], extra: p[extra]})
  return rows


def expected_records(rows: list[dict], keep=lambda row: True) -> list[dict]:
  return [{"query": r["query"], "positive": r["positive"],
           "negatives": [r["negative"], *r["negatives"]]} for r in rows if keep(r)]


def records(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture()
def datasets(tmp_path, monkeypatch):
  """`datasets`, offline, caching under tmp_path (not ~/.cache)."""
  if importlib.util.find_spec("datasets") is None:
    pytest.skip("the `datasets` package is not installed (pip install -e .[hf])")
  import datasets as hf_datasets  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(hf_datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(hf_datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
  return hf_datasets


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_hf_local_folder_yields_the_rows_written(datasets, tmp_path, dataset):
  rows = rows_of(dataset)
  folder = tmp_path / dataset
  folder.mkdir()
  # Parquet for one, JSON lines for the other: load_dataset picks the builder from the files.
  if dataset == "stsbenchmark":
    datasets.Dataset.from_list(rows).to_parquet(folder / "train.parquet")
  else:
    datasets.Dataset.from_list(rows).to_json(folder / "train.jsonl")
  cfg = SourceConfig("hf", str(folder), negative_fields=("negative", "negatives"))
  source = open_source(cfg, num_negatives=3)
  assert records(source) == expected_records(rows)
  assert source.name == f"hf:{folder}[train]"

  _, filter_fields, keep = DATASETS[dataset]
  filtered = open_source(SourceConfig("hf", str(folder), negative_fields=("negative",),
                                      **filter_fields))
  expected = [dict(r, negatives=r["negatives"][:1]) for r in expected_records(rows, keep)]
  assert 0 < len(expected) < NUM_ROWS  # the filter refuses some rows, not all
  assert records(filtered) == expected
  assert filtered.num_filtered == NUM_ROWS - len(expected) and filtered.num_skipped == 0

  first = open_source(SourceConfig("hf", str(folder), max_records=7, **filter_fields))
  assert [r["query"] for r in records(first)] == [r["query"] for r in expected[:7]]

  with pytest.raises(DataError, match=re.escape(str(folder)) + ".*split 'validation'"):
    open_source(SourceConfig("hf", str(folder), split="validation"))


def test_hf_bad_row_is_named_as_jsonl_names_it(datasets, tmp_path):
  rows = rows_of("stsbenchmark")
  del rows[7]["positive"]  # an Arrow table holds the absent key as null
  rows[12]["negatives"] = [rows[12]["negatives"][0], "  "]
  folder = tmp_path / "bad"
  folder.mkdir()
  datasets.Dataset.from_list(rows).to_parquet(folder / "train.parquet")
  jsonl = tmp_path / "bad.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))

  for kind, path, row_7, row_12 in [("hf", folder, f"hf:{folder}[train] row 7", "row 12"),
                                    ("jsonl", jsonl, f"{jsonl} line 8", "line 13")]:
    cfg = SourceConfig(kind, str(path), negative_fields=("negatives",))
    with pytest.raises(DataError, match=re.escape(f"{row_7}: missing field 'positive'")):
      open_source(cfg)
    skipping = open_source(cfg, on_bad_record="skip")
    assert skipping.num_skipped == 2 and len(skipping) == NUM_ROWS - 2
    assert re.search(re.escape(row_12) + r": field 'negatives\[1\]' is empty", skipping.skipped[1])
    good = [r for i, r in enumerate(rows) if i not in (7, 12)]
    assert records(skipping) == [dict(e, negatives=e["negatives"][1:])
                                 for e in expected_records(good)]


# ----------------------------------------------------------------------------- TFDS


@pytest.fixture()
def tfds():
  if importlib.util.find_spec("tensorflow_datasets") is None:
    pytest.skip("the `tensorflow-datasets` package is not installed (pip install -e .[tfds])")
  if importlib.util.find_spec("array_record") is None:
    pytest.skip("the `array_record` package is not installed (pip install -e .[tfds])")
  import tensorflow_datasets  # pylint: disable=import-outside-toplevel
  return tensorflow_datasets


def build_tfds(tfds, data_dir: Path, dataset_name: str, rows: list[dict], extra: dict) -> None:
  """Prepares `rows` as TFDS dataset `dataset_name` 1.0.0, array_record format, no TensorFlow.

  A GeneratorBasedBuilder (not store_as_tfds_dataset, whose isinstance(tf.data.Dataset) check
  imports TensorFlow); unregistered, so data_source finds the dataset from its files alone, as
  it would one prepared elsewhere.
  """
  text = tfds.features.Text()
  features = tfds.features.FeaturesDict({"query": text, "positive": text, "negative": text,
                                         "negatives": tfds.features.Sequence(text), **extra})

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      # DatasetInfo directly: dataset_info_from_configs reads metadata beside the builder's code.
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate(rows)  # keys in write order; with shuffling off, the read order too

  Builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_tfds_array_record_yields_the_rows_written(tfds, tmp_path, dataset):
  rows = rows_of(dataset)
  extra_field, filter_fields, keep = DATASETS[dataset]
  name = f"saejax_{dataset}"
  build_tfds(tfds, tmp_path, name, rows, {extra_field: np.float64 if extra_field == "score"
                                          else np.int64})
  assert (tmp_path / name / "1.0.0" / f"{name}-train.array_record-00000-of-00001").is_file()

  cfg = SourceConfig("tfds", f"{name}:1.0.0", data_dir=str(tmp_path),
                     negative_fields=("negative", "negatives"))
  assert records(open_source(cfg, num_negatives=3)) == expected_records(rows)

  # The label filter compares numpy int64 labels as their value; scores stay float64.
  filtered = open_source(SourceConfig("tfds", name, data_dir=str(tmp_path), **filter_fields))
  expected = [dict(r, negatives=[]) for r in expected_records(rows, keep)]
  assert 0 < len(expected) < NUM_ROWS
  assert records(filtered) == expected and filtered.num_filtered == NUM_ROWS - len(expected)


def test_tfds_bad_row_is_named(tfds, tmp_path):
  rows = rows_of("mrpc")[:5]
  rows[3]["positive"] = "   "  # TFDS cannot store a row without a field; an empty one it can
  build_tfds(tfds, tmp_path, "saejax_bad", rows, {"label": np.int64})
  cfg = SourceConfig("tfds", "saejax_bad", data_dir=str(tmp_path))
  with pytest.raises(DataError, match=re.escape("tfds:saejax_bad[train] row 3: field 'positive' "
                                                "is empty")):
    open_source(cfg)
  skipping = open_source(cfg, on_bad_record="skip")
  assert records(skipping) == [dict(e, negatives=[]) for e in
                               expected_records(rows[:3] + rows[4:])]
  with pytest.raises(DataError, match="'saejax_bad' split 'test'"):
    open_source(SourceConfig("tfds", "saejax_bad", split="test", data_dir=str(tmp_path)))
