"""`python -m saejax.hub.corpus`: a corpus encoded over 8 fake CPU devices, over 2 processes, and
resumed after a stop, gives the index that `encode_sparse` on one device gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saejax import cli
from saejax.hub import corpus, trained
from saejax.retrieval import encode
from saejax.retrieval.index import IDF_POWER, SparseIndex

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _finish, _free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_DOCS, SHARD = 45, 10  # 5 shards, the last one short
WORDS = ("audio video play ogg files license free software network server client library python "
         "kernel driver font image editor game music").split()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
  """45 documents of 1-40 words; every third has a title."""
  rng = np.random.default_rng(0)
  file = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
  rows = [{"id": f"doc{i}", "title": str(rng.choice(WORDS)) if i % 3 == 0 else "",
           "text": " ".join(rng.choice(WORDS, rng.integers(1, 41)))} for i in range(NUM_DOCS)]
  file.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return file


@pytest.fixture(scope="module")
def reference(tiny_run, corpus_file):
  """`encode_sparse` in this process on one device: (config, model, tokenizer, ids, codes)."""
  config, model, tok = trained.load_run(tiny_run)
  ids, texts = corpus.read_corpus(corpus_file)
  codes = encode.encode_sparse(model, tok, texts, config=encode.EncodeConfig(
      max_len=int(config.data.max_doc_len), batch_size=16, progress=False))
  return config, model, tok, ids, texts, codes


def _command(run: Path, corpus_path: Path, out: Path, *flags: str) -> list[str]:
  return [sys.executable, "-m", "saejax.hub.corpus", f"--run={run}", f"--corpus={corpus_path}",
          f"--out={out}", f"--shard-size={SHARD}", "--batch-size=8", *flags]


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _run(cmd: list[str], devices: int) -> str:
  proc = subprocess.run(cmd, cwd=REPO, env=_env(devices), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stderr


def _assert_matches(out: Path, reference) -> None:
  """The merged index and every shard hold `encode_sparse`'s codes; search agrees."""
  _, model, tok, ids, texts, codes = reference
  index, got_ids = corpus.load_index(out)
  assert got_ids == ids
  for shard in range(-(-NUM_DOCS // SHARD)):
    values, indices = corpus.read_shard(corpus.shard_file(out, shard))
    rows = slice(shard * SHARD, (shard + 1) * SHARD)
    np.testing.assert_array_equal(indices, codes.indices[rows])
    np.testing.assert_allclose(values, codes.values[rows], atol=1e-5, rtol=0)
  expected = SparseIndex.build(codes.values, codes.indices, model.sae.config.num_latents,
                               idf_power=IDF_POWER)  # the command's default
  np.testing.assert_array_equal(index.offsets, expected.offsets)
  np.testing.assert_array_equal(index.docs, expected.docs)
  np.testing.assert_allclose(index.weights, expected.weights, atol=1e-5, rtol=0)
  q = encode.encode_sparse(model, tok, ["play ogg audio files", "free software license",
                                        texts[7], texts[30]],
                           config=encode.EncodeConfig(max_len=64, batch_size=4, progress=False))
  got, want = index.search(q.values, q.indices, top_k=10), expected.search(q.values, q.indices,
                                                                           top_k=10)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)


def test_eight_devices_give_the_one_device_codes(tiny_run, corpus_file, reference, tmp_path):
  log = _run(_command(tiny_run, corpus_file, tmp_path / "out"), 8)
  assert "5 shards here, batch 8 over 8 local devices" in log, log
  assert sum(f"shard {s}: encoded {n} documents" in log
             for s, n in [(0, 10), (1, 10), (2, 10), (3, 10), (4, 5)]) == 5, log
  _assert_matches(tmp_path / "out", reference)


def test_resume_skips_finished_shards_and_redoes_a_damaged_one(tiny_run, corpus_file, reference,
                                                                tmp_path):
  out = tmp_path / "out"
  log = _run(_command(tiny_run, corpus_file, out, "--max-shards-this-run=3"), 2)
  assert "stopping after 3 shards" in log, log
  assert sorted(p.name for p in (out / "shards").iterdir()) == [
      f"shard-0000{i}.npz" for i in range(3)]  # no temporary file left behind
  assert not (out / "index").exists()
  first = corpus.shard_file(out, 0).stat().st_mtime_ns
  damaged = corpus.shard_file(out, 2)
  damaged.write_bytes(damaged.read_bytes()[:100])  # a truncated file, e.g. a disk filled up

  # The same run and corpus under other paths (symlinks) are the same inputs: shards are kept.
  (tmp_path / "run-link").symlink_to(tiny_run)
  (tmp_path / "corpus-link.jsonl").symlink_to(corpus_file)
  log = _run(_command(tmp_path / "run-link", tmp_path / "corpus-link.jsonl", out), 2)
  assert "shard 0: complete on disk, skipped" in log and "shard 1: complete on disk" in log, log
  assert "shard 0: encoded" not in log and "shard 1: encoded" not in log, log
  assert f"warning: shard 2 ({damaged}) is damaged: unreadable" in log, log
  assert all(f"shard {s}: encoded" in log for s in (2, 3, 4)), log
  assert corpus.shard_file(out, 0).stat().st_mtime_ns == first
  _assert_matches(out, reference)

  # Merging again from the shards alone re-encodes nothing and writes the same index.
  log = _run(_command(tiny_run, corpus_file, out, "--merge-only"), 1)
  assert "encoded" not in log and "merged 5 shards" in log, log
  _assert_matches(out, reference)


@pytest.mark.slow  # two processes joined by jax.distributed
def test_two_processes_encode_disjoint_shards(tiny_run, corpus_file, reference, tmp_path):
  out = tmp_path / "out"
  coordinator = f"--coordinator-address=127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(_command(tiny_run, corpus_file, out, coordinator,
                                     "--num-processes=2", f"--process-id={i}"),
                            cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = _finish(procs)
  encoded = [{s for s in range(5) if f"process {i}/2: shard {s}: encoded" in logs[i]}
             for i in range(2)]
  assert encoded == [{0, 2, 4}, {1, 3}], logs
  assert "merged 5 shards" in logs[0] and "merged" not in logs[1], logs
  _assert_matches(out, reference)


def test_user_errors_are_one_line(tiny_run, corpus_file, tmp_path, capsys):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "a", "text": "x"}\n{"text": "no id"}\n')
  dup = tmp_path / "dup.jsonl"
  dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
  cases = [
      ([f"--run={tiny_run}", f"--corpus={tmp_path / 'nope.jsonl'}"], "does not exist"),
      ([f"--run={tiny_run}", f"--corpus={tmp_path}"], "has no corpus.jsonl"),
      ([f"--run={tiny_run}", f"--corpus={empty}"], "holds no documents"),
      ([f"--run={tiny_run}", f"--corpus={bad}"], "bad.jsonl line 2: not a JSON object"),
      ([f"--run={tiny_run}", f"--corpus={dup}"], "line 2: duplicate id 'a' (first on line 1)"),
      ([f"--run={tmp_path}", f"--corpus={corpus_file}"], "has no config.json"),
      # Refused before the manifest pins them: the merge-only case after them finds none.
      ([f"--run={tiny_run}", f"--corpus={corpus_file}", "--max-len=1"], "must be an int >= 2"),
      ([f"--run={tiny_run}", f"--corpus={corpus_file}", "--max-len=100000"],
       "--max-len 100000 exceeds the encoder's position table"),
      ([f"--run={tiny_run}", f"--corpus={corpus_file}", "--merge-only"], "shard 0"),
  ]
  for argv, expected in cases:
    with pytest.raises(SystemExit) as e:
      cli.run(corpus.main, [*argv, f"--out={tmp_path / 'out'}", "--shard-size=10"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("error: ") and expected in last, (argv, err)
    assert "Traceback" not in err and err.count("error: ") == 1, (argv, err)
  # Shards of other settings are never mixed in: another k in the same --out is refused.
  with pytest.raises(SystemExit):
    cli.run(corpus.main, [f"--run={tiny_run}", f"--corpus={corpus_file}",
                          f"--out={tmp_path / 'out'}", "--shard-size=10", "--k=4"])
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "holds shards of other inputs (k differ" in err, err
  assert err.count("\n") == 1, err


SPLIT_CHECK = """
import sys, jax, numpy as np
from saejax import sharding
from saejax.hub import trained
from saejax.retrieval import encode
_, model, _ = trained.load_run(sys.argv[1])
mesh = sharding.make_mesh(sharding.MeshConfig(data=-1), jax.local_devices())
values, indices = encode.sparse_code(model, mesh=mesh)(np.full((8, 16), 5, np.int32),
                                                       np.ones((8, 16), bool))
print(len(jax.local_devices()), len(values.sharding.device_set),
      [s.data.shape[0] for s in values.addressable_shards])
# No texts: empty codes of the right width, nothing encoded.
_, tok = trained.load_run(sys.argv[1])[1:]
empty = encode.encode_sparse(model, tok, [], config=encode.EncodeConfig(batch_size=8), mesh=mesh)
print("empty", empty.values.shape)
try:
  encode.encode_sparse(model, tok, ["a", "b"], config=encode.EncodeConfig(batch_size=6), mesh=mesh)
except Exception as e:
  print("indivisible", type(e).__name__, e)
"""


def test_each_device_encodes_its_rows_of_the_batch(tiny_run):
  """With a mesh, `sparse_code` splits a batch of 8 over 8 devices: one row each."""
  out = subprocess.run([sys.executable, "-c", SPLIT_CHECK, str(tiny_run)], cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert "8 8 [1, 1, 1, 1, 1, 1, 1, 1]" in lines, out.stdout
  assert "empty (0, 8)" in lines, out.stdout
  assert lines[-1].startswith("indivisible ConfigError a batch of 6 texts does not split over "
                              "the 8 data-parallel devices"), out.stdout


def test_a_run_without_an_sae_is_one_line(tiny_run, corpus_file, tmp_path, monkeypatch, capsys):
  config, model, tok = trained.load_run(tiny_run)
  model.sae = None  # what a sae.enabled=False run (the dense ablation) loads as
  monkeypatch.setattr(corpus.trained, "load_run", lambda run: (config, model, tok))
  with pytest.raises(SystemExit) as e:
    cli.run(corpus.main, [f"--run={tiny_run}", f"--corpus={corpus_file}",
                          f"--out={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith("error: run ") and "has no SAE" in err, err
  assert err.count("\n") == 1 and not (tmp_path / "out").exists(), err


@pytest.mark.parametrize("flag", ["--out", "--corpus"])
def test_a_bucket_url_for_out_or_corpus_is_refused(tiny_run, corpus_file, tmp_path, monkeypatch,
                                                   capsys, flag):
  """The shards, manifest and index are written with local file calls: --out gs://b/x used to
  become a local directory ./gs:/b/x (on several hosts, one per host, never merged)."""
  monkeypatch.chdir(tmp_path)
  given = {"--run": str(tiny_run), "--corpus": str(corpus_file), "--out": str(tmp_path / "out"),
           flag: "gs://bucket/index"}
  with pytest.raises(SystemExit) as e:
    cli.run(corpus.main, [f"{k}={v}" for k, v in given.items()])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.startswith(f"error: {flag} gs://bucket/index") and (
      "local" in err), err
  assert err.count("\n") == 1 and not (tmp_path / "gs:").exists(), err


def test_a_line_without_text_or_title_is_refused(tmp_path):
  """A Pyserini/Anserini JSONL ({"id", "contents"}) used to be read as empty texts: every document
  got the same code, with no warning."""
  file = tmp_path / "pyserini.jsonl"
  file.write_text('{"id": "a", "contents": "free software"}\n{"id": "b", "contents": "audio"}\n')
  with pytest.raises(corpus.DataError, match=r"pyserini.jsonl: document 'a' has no text or title "
                     r"field \(its fields: contents, id\)"):
    corpus.read_corpus(file)
  # An empty text, or a title alone, is a document (BEIR corpora hold some).
  ok = tmp_path / "ok.jsonl"
  ok.write_text('{"_id": "a", "title": "t", "text": ""}\n{"_id": "b", "title": "only"}\n')
  assert corpus.read_corpus(ok) == (["a", "b"], ["t", "only"])


def test_processes_that_start_together_agree_on_one_manifest(tmp_path, monkeypatch):
  """Two processes find no manifest; the other one writes its own (another checkpoint: training
  still saving while the hosts loaded the newest) before this one does. This one must compare
  with it, not overwrite it and go on encoding shards of other settings into the same --out."""
  out = tmp_path / "out"
  theirs = {"format": corpus.FORMAT, "model_fingerprint": "step1500", "k": 8, "max_len": 64}
  mine = {**theirs, "model_fingerprint": "step2000"}
  manifest, is_file = out / corpus.MANIFEST, corpus.Path.is_file
  first = []

  def racing_is_file(self):
    if self == manifest and not first:  # checked before the other process wrote its manifest
      first.append(True)
      corpus._write_atomic(manifest, lambda f: f.write(json.dumps(theirs).encode()))
      return False
    return is_file(self)

  monkeypatch.setattr(corpus.Path, "is_file", racing_is_file)
  with pytest.raises(corpus.ConfigError, match="model_fingerprint differ"):
    corpus._check_manifest(out, mine)
  assert json.loads(manifest.read_text()) == theirs
  assert [p.name for p in out.iterdir()] == [corpus.MANIFEST]  # no temporary file left


def test_shards_without_a_readable_manifest_are_not_reused(tmp_path):
  """A shard holds its codes and ids, not the model or settings that made them: with the
  manifest gone or damaged, shards on disk are refused (reusing them could merge two models'
  codes into one index), while a damaged manifest with no shards behind it is simply replaced."""
  out = tmp_path / "out"
  settings = {"format": corpus.FORMAT, "model_fingerprint": "step2000", "k": 8, "max_len": 64}
  corpus._check_manifest(out, settings)
  (out / corpus.MANIFEST).write_text('{"format": ')  # damaged, no shards yet
  corpus._check_manifest(out, settings)
  assert json.loads((out / corpus.MANIFEST).read_text()) == settings
  (out / corpus.SHARDS).mkdir()
  (out / corpus.SHARDS / "shard-00000.npz").write_bytes(b"codes of some model")
  for damage in ('{"format": ', None):
    if damage is None:
      (out / corpus.MANIFEST).unlink()
    else:
      (out / corpus.MANIFEST).write_text(damage)
    with pytest.raises(corpus.ConfigError, match="holds shards but .*manifest.json is missing or "
                                                 "unreadable"):
      corpus._check_manifest(out, settings)
