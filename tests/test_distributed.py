"""Multi-process training on one machine (2 processes x 2 CPU devices over gloo), launch detection,
and the chunked contrastive loss."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from saejax.data import pipeline as data
from saejax.data.tokenizer import load_tokenizer
from saejax.errors import ConfigError
from saejax.hub import build, convert
from saejax.sae import chunked_nce, losses
from saejax.train import distributed, loop

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_config.py"
STEPS = 16


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: Path, devices: int, *flags: str) -> subprocess.Popen:
  """`python -m saejax.train` on the tiny config, fixed padding, a metrics row every step."""
  cmd = [sys.executable, "-m", "saejax.train", f"--config={TINY}:{STEPS}",
         "--config.data.padding=fixed", "--config.train.log_every=1", f"--workdir={workdir}",
         *flags]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _start_pair(workdir: Path, *flags: str) -> list[subprocess.Popen]:
  coordinator = f"--coordinator_address=127.0.0.1:{_free_port()}"
  return [_start(workdir, 2, coordinator, "--num_processes=2", f"--process_id={i}", *flags)
          for i in range(2)]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
  """Wait for every process; on a failure or a timeout kill the others and show all outputs."""
  outs, deadline = [], time.time() + timeout
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=max(deadline - time.time(), 1))[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert all(p.returncode == 0 for p in procs), "\n=====\n".join(outs)
  return outs


def _wait_for(predicate, procs, timeout: float = 300):
  deadline = time.time() + timeout
  while not predicate():
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      for p in procs:
        p.kill()
      outs = [p.communicate()[0] for p in procs]
      raise AssertionError("the run ended or stalled before the event:\n" + "\n=====\n".join(outs))
    time.sleep(0.05)


def _losses(workdir: Path) -> dict[int, float]:
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"a step was logged twice (by two processes?): {steps}"
  return {r["step"]: r["loss"] for r in rows}


def _params(workdir: Path, step: int):
  """The checkpoint's parameters, read into this one-device process (another topology)."""
  path = workdir / "checkpoints" / str(step) / "state"
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          ckptr.metadata(path).item_metadata.tree)
    return ckptr.restore(path, target)["params"]


def _tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(str(STEPS))
  config.data.padding = "fixed"
  return config


def _expected_fingerprints(process: int, count: int) -> list[str]:
  """The hashes of the first `count` batches of `process`'s shard, read here directly."""
  config = _tiny_config()
  tokenizer = load_tokenizer(convert.resolve(config.model.tokenizer),
                             vocab_size=config.model.hf_config.vocab_size)
  it = data.make_iterator(build.data_config(config), tokenizer, shard_index=process,
                          shard_count=2)
  return [loop._fingerprint(next(it)) for _ in range(count)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: one process with 4 devices, the same global batches."""
  workdir = tmp_path_factory.mktemp("one_process")
  _finish([_start(workdir, 4)])
  return workdir


@pytest.mark.slow  # four trainer processes; process 1 cannot use the compilation cache (JAX
# writes it from process 0 only, and on CPU the key differs per process)
def test_two_processes_match_one_and_resume_exactly_after_preemption(tmp_path, one_process):
  procs = _start_pair(tmp_path)
  second = tmp_path / "batches.process1.jsonl"
  _wait_for(lambda: second.exists() and len(second.read_text().splitlines()) >= 3, procs)
  procs[1].send_signal(signal.SIGTERM)  # only process 1 gets the notice
  outs = _finish(procs)
  for i, out in enumerate(outs):
    assert f"process {i}/2 (explicit): 2 local of 4 devices, platform cpu" in out, out
  stopped = json.loads((tmp_path / "summary.json").read_text())
  assert stopped["preempted"] and 3 <= stopped["step"] < STEPS, outs[0]
  assert stopped["latest_checkpoint"] == stopped["step"]  # both joined the save on the way out
  for i in range(2):  # both stopped after the same step
    assert len((tmp_path / f"batches.process{i}.jsonl").read_text().splitlines()) == \
        stopped["step"]

  outs = _finish(_start_pair(tmp_path))  # resume from the checkpoint
  assert json.loads((tmp_path / "summary.json").read_text())["step"] == STEPS
  two, one = _losses(tmp_path), _losses(one_process)  # only process 0 writes metrics
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-4, atol=1e-4)
  for i in range(2):  # each process read its own shard, each batch once, across the restart
    rows = [json.loads(x) for x in
            (tmp_path / f"batches.process{i}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["batch"] for r in rows] == _expected_fingerprints(i, STEPS)
  restored, reference = _params(tmp_path, STEPS), _params(one_process, STEPS)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # three trainer processes
def test_head_refit_on_two_processes_matches_one(tmp_path):
  """Stage 3 (``warmstart.refit``) on two hosts: each process refits the same head from a whole copy
  of the final encoder, and the state placed back on the global mesh equals one process's. The
  head batches are k-means topics, which process 0 computes for all."""
  flags = ("--config.warmstart.refit=True", "--config.train.steps=4",
           "--config.optim.total_steps=4", "--config.warmstart.batch_groups=topics",
           "--config.warmstart.topics=2")
  (one,) = _finish([_start(tmp_path / "one", 4, *flags)])
  outs = _finish(_start_pair(tmp_path / "two", *flags))
  for out in (one, outs[0]):  # stage 1, then the refit after the last step
    assert out.count("warm start: SAE on") == 2, out
  two, reference = _params(tmp_path / "two", 4), _params(tmp_path / "one", 4)
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(reference), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_bucket_padding_is_refused_with_several_processes():
  distributed.check_padding("bucket", process_count=1)
  distributed.check_padding("fixed", process_count=4)
  with pytest.raises(ConfigError, match=r"padding='bucket'.*4 processes.*padding=fixed"):
    distributed.check_padding("bucket", process_count=4)


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, method", [
    ({}, "single"),
    (SLURM, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, "single"),  # one task (an interactive allocation)
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, "single"),  # not under srun
    ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, "single"),
])
def test_detect_reads_the_environment(env, method):
  assert distributed.detect(env=env, on_tpu_vm=False).method == method


def test_detect_explicit_flags_win_and_must_be_complete():
  launch = distributed.detect("10.0.0.1:1234", 4, 3, env=SLURM, on_tpu_vm=True)
  assert launch == distributed.Launch("explicit", "10.0.0.1:1234", 4, 3)
  assert distributed.detect(env={}, on_tpu_vm=True).method == "tpu"
  with pytest.raises(ConfigError, match=r"got --coordinator_address but not --num_processes, "
                                        r"--process_id"):
    distributed.detect("10.0.0.1:1234", env={})
  with pytest.raises(ConfigError, match=r"--process_id=4 is not in \[0, --num_processes=4\)"):
    distributed.detect("10.0.0.1:1234", 4, 4, env={})
  with pytest.raises(ConfigError, match="HOST:PORT"):
    distributed.detect("10.0.0.1", 4, 0, env={})


EXPLICIT_UNDER_SLURM = """
import sys
import jax
from saejax.train import distributed
distributed.initialize(distributed.Launch("explicit", sys.argv[1], 1, 0))
print("visible", jax.config.values["jax_cuda_visible_devices"])  # set from local_device_ids
jax.distributed.shutdown()
"""


def test_an_explicit_launch_under_slurm_keeps_every_local_device():
  """gpu_slurm.sh runs one process per node with explicit flags: JAX (really initialised here,
  one process, SLURM's variables set) must not read SLURM_LOCALID into one device per process."""
  env = {**os.environ, **SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "3"}
  out = subprocess.run([sys.executable, "-c", EXPLICIT_UNDER_SLURM, f"127.0.0.1:{_free_port()}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "process 0/1 (explicit)" in out.stdout
  assert out.stdout.strip().splitlines()[-1] == "visible all"


def _codes(rng, *shape):
  return jnp.asarray(np.maximum(rng.normal(size=shape), 0), jnp.float32)  # ReLU'd like SAE codes


@pytest.mark.parametrize("b, h, num_blocks", [(8, 0, 4), (12, 2, 3), (16, 1, 16), (6, 1, 1)])
def test_chunked_info_nce_equals_info_nce_with_gradients(b, h, num_blocks):
  rng = np.random.default_rng(b + h)
  args = (_codes(rng, b, 32), _codes(rng, b, 32), _codes(rng, b, h, 32))
  full = jax.value_and_grad(lambda *a: losses.info_nce(*a, 0.5), (0, 1, 2), has_aux=True)
  chunked = jax.jit(jax.value_and_grad(
      lambda *a: chunked_nce.chunked_info_nce(*a, 0.5, num_blocks), (0, 1, 2), has_aux=True))
  (loss, metrics), grads = full(*args)
  (c_loss, c_metrics), c_grads = chunked(*args)
  np.testing.assert_allclose(c_loss, loss, rtol=1e-6)
  assert c_metrics.keys() == metrics.keys()
  for k in metrics:
    np.testing.assert_allclose(c_metrics[k], metrics[k], rtol=1e-6, err_msg=k)
  for g, c in zip(grads, c_grads):
    np.testing.assert_allclose(c, g, rtol=1e-5, atol=1e-6)


def test_chunked_info_nce_bounds_the_score_memory():
  b, s = 2048, 64
  x, neg = jax.ShapeDtypeStruct((b, s), jnp.float32), jax.ShapeDtypeStruct((b, 1, s), jnp.float32)

  def temp_bytes(loss_fn):
    grad = jax.jit(jax.grad(lambda *a: loss_fn(*a)[0], (0, 1, 2)))
    return grad.lower(x, x, neg).compile().memory_analysis().temp_size_in_bytes

  full = temp_bytes(lambda *a: losses.info_nce(*a, 0.5))
  chunked = temp_bytes(lambda *a: chunked_nce.chunked_info_nce(*a, 0.5, 16))
  score_matrix = b * 2 * b * 4  # one fp32 [B, 2B] matrix: 32 MiB
  assert full >= score_matrix > 2 * chunked, (full, chunked)


def test_chunked_info_nce_rejects_blocks_that_do_not_divide():
  rng = np.random.default_rng(0)
  with pytest.raises(ConfigError, match="num_blocks=3 .* dividing the batch of 8"):
    chunked_nce.chunked_info_nce(_codes(rng, 8, 4), _codes(rng, 8, 4), _codes(rng, 8, 0, 4),
                                 1.0, 3)


# ---- launch scripts: --dry-run output, and the TPU worker commands run against a local tmux ----

STAND_IN_TRAINER = """#!/bin/bash
# Stands in for `python -m saejax.train` on a worker: records its arguments, then runs until
# SIGTERM, which it answers like the trainer (checkpoint, exit 0).
printf '%s\\n' "$@" > "$HOME/argv"
trap 'echo checkpointed > "$HOME/stopped"; exit 0' TERM
while true; do sleep 0.1; done
"""


def _script(name: str, *args: str, env: dict | None = None) -> list[list[str]]:
  out = subprocess.run(["bash", str(REPO / "launch" / name), *args], cwd=REPO, text=True,
                       capture_output=True, timeout=60, env={**os.environ, **(env or {})})
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()]


def _option(argv: list[str], name: str) -> str:
  return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def _install_picks_a_python_saejax_runs_on(command: str):
  """The worker's install command, run here on a stand-in worker whose python3 is too old and
  whose only newer Python is python3.11 (what apt adds on the Ubuntu 22.04 TPU images): the venv
  is made by python3.11, and pip installs into it."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    home, bin_dir = Path(tmp) / "home", Path(tmp) / "bin"
    home.mkdir()
    bin_dir.mkdir()
    fake_python = ('#!/bin/bash\necho "$(basename "$0") $*" >> "$HOME/log"\n'
                   'mkdir -p "$3/bin"; printf \'#!/bin/bash\\necho "pip $*" >> "$HOME/log"\\n\' > "$3/bin/pip"\n'
                   'chmod +x "$3/bin/pip"\n')
    for name in ("python3", "python3.11"):
      (bin_dir / name).write_text(fake_python)
      (bin_dir / name).chmod(0o755)
    for tool in ("mkdir", "chmod", "basename"):  # nothing else on PATH: no real Python is found
      (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"HOME": str(home), "PATH": str(bin_dir)}
    out = subprocess.run([shutil.which("bash"), "-c", command], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    log = (home / "log").read_text().splitlines()
    assert log[0] == f"python3.11 -m venv {home}/saejax-venv", log
    assert log[-1] == f"pip install -q -e {home}/saejax[tpu]", log


TRICKY = "--config.model.tokenizer=/data/it's a dir"  # a quote and spaces survive two shells


def test_tpu_pod_dry_run_prints_every_step():
  where = ["--zone=us-central2-b", "--project=proj"]
  lines = _script("tpu_pod.sh", "--dry-run", "--name", "sae-v4", "--zone", "us-central2-b",
                  "--project", "proj", "--accelerator", "v4-32", "--run", "base1", "--workdir",
                  "gs://b/runs/base1", "create", "copy", "install", "run", "logs", "stop",
                  "delete", "--", "--config.sae.k=32", TRICKY)
  create, archive, scp, untar, install, run, logs, stop, delete = lines
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sae-v4", *where,
                    "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  assert archive[0] == "git" and archive[-3:] == ["-o", "/tmp/saejax-sae-v4.tar.gz", "HEAD"]
  assert scp[4:] == ["scp", "/tmp/saejax-sae-v4.tar.gz", "sae-v4:saejax.tar.gz", *where,
                     "--worker=all"]
  for ssh in (untar, install, run, stop):
    assert ssh[4:6] == ["ssh", "sae-v4"] and "--worker=all" in ssh
  assert "pip install -q -e ~/saejax'[tpu]'" in _option(install, "command")
  _install_picks_a_python_saejax_runs_on(_option(install, "command"))
  assert logs[-2:] == ["--worker=0", "--command=tail -n 100 -F $HOME/saejax-runs/base1.log"]
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "sae-v4", *where, "--quiet"]
  remote = shlex.split(_option(run, "command"))
  assert remote[:5] == ["mkdir", "-p", "$HOME/saejax-runs", "&&", "tmux"]
  assert remote[5:9] == ["new-session", "-d", "-s", "base1"]
  inner = shlex.split(remote[9])
  trainer = inner[inner.index("exec") + 1:inner.index(">>")]
  assert trainer == ["$HOME/saejax-venv/bin/python", "-m", "saejax.train",
                     "--config=configs/base.py", "--workdir=gs://b/runs/base1",
                     "--config.sae.k=32", TRICKY]
  assert "kill -TERM $pid" in _option(stop, "command")
  assert not any("pkill" in " ".join(x) or "killall" in " ".join(x) for x in lines)


def test_tpu_pod_refuses_missing_settings():
  out = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), "--dry-run", "--name", "x",
                        "--zone", "z", "run"], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "step 'run' needs --run NAME" in out.stderr


@pytest.mark.skipif(shutil.which("tmux") is None,
                    reason="tmux is not installed (the TPU workers' session manager)")
def test_tpu_pod_worker_commands_run_status_and_stop_by_recorded_pid(tmp_path):
  """The `run`, `status` and `stop` commands a worker receives, run here with a real tmux."""
  home = tmp_path / "home"
  (home / "saejax").mkdir(parents=True)
  trainer = home / "saejax-venv" / "bin" / "python"
  trainer.parent.mkdir(parents=True)
  trainer.write_text(STAND_IN_TRAINER)
  trainer.chmod(0o755)
  # A private tmux server (its socket under tmp_path): nothing else's sessions are touched.
  env = {**os.environ, "HOME": str(home), "TMUX_TMPDIR": str(tmp_path)}
  run, status, stop = (_option(line, "command") for line in _script(
      "tpu_pod.sh", "--dry-run", "--name", "t", "--zone", "z", "--run", "base1", "--workdir",
      "gs://b/r", "--stop-wait", "30", "run", "status", "stop", "--", TRICKY))
  worker = lambda command: subprocess.run(["bash", "-c", command], env=env, text=True,  # noqa: E731
                                          capture_output=True, timeout=60)
  unrelated = subprocess.Popen(["sleep", "60"])
  try:
    assert worker(run).returncode == 0
    pid_file = home / "saejax-runs" / "base1.pid"
    deadline = time.time() + 30
    while not (home / "argv").exists() and time.time() < deadline:
      time.sleep(0.05)
    assert (home / "argv").read_text().splitlines() == [
        "-m", "saejax.train", "--config=configs/base.py", "--workdir=gs://b/r", TRICKY]
    pid = int(pid_file.read_text())
    assert "saejax.train" in Path(f"/proc/{pid}/cmdline").read_text()
    assert f"running pid {pid}" in worker(status).stdout
    assert worker(stop).returncode == 0
    assert (home / "stopped").read_text().strip() == "checkpointed"  # SIGTERM, not SIGKILL
    assert not Path(f"/proc/{pid}").exists()
    assert "no session base1" in worker(status).stdout
    pid_file.write_text(f"{unrelated.pid}\n")  # a stale file naming a reused PID
    assert worker(stop).returncode == 0
    assert unrelated.poll() is None  # not a saejax.train process: left alone
  finally:
    unrelated.kill()
    unrelated.wait()
    subprocess.run(["tmux", "kill-server"], env=env, capture_output=True, timeout=30)


def test_gpu_slurm_dry_run_and_each_task_gets_its_process_id(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
  (venv / "bin" / "python").chmod(0o755)
  slurm = {"SLURM_JOB_ID": "777", "SLURM_JOB_NAME": "sae", "SLURM_JOB_NODELIST": "gpu-7,gpu-8",
           "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(tmp_path),
           "CONFIG": "configs/large.py", "WORKDIR": "/shared/runs/large 1", "VENV": str(venv)}
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  (srun,) = _script("gpu_slurm.sh", "--dry-run", "--", TRICKY, env={**env, **slurm})
  assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "--label", "bash", "-c"]
  for procid in ("0", "13"):  # what srun's tasks 0 and 13 would run
    task = subprocess.run(["bash", "-c", srun[5]], env={**env, "SLURM_PROCID": procid},
                          capture_output=True, text=True, timeout=60)
    assert task.returncode == 0, task.stderr
    port = 20000 + 777 % 20000
    assert task.stdout.splitlines() == [
        "-m", "saejax.train", "--config=configs/large.py", "--workdir=/shared/runs/large 1",
        f"--coordinator_address=gpu-7:{port}", "--num_processes=16", TRICKY,
        f"--process_id={procid}"]
  (default,) = _script("gpu_slurm.sh", "--dry-run", env=env)  # outside SLURM: a stand-in job
  assert "--coordinator_address=gpu-node-1:32345" in shlex.split(default[5])


SHARDED_NCE = """
import jax, numpy as np
from saejax import sharding
from saejax.sae import losses
from saejax.sae.chunked_nce import chunked_info_nce
mesh = sharding.make_mesh(sharding.MeshConfig(data=4))
rng = np.random.default_rng(0)
args = [jax.device_put(np.maximum(rng.normal(size=shape), 0).astype(np.float32),
                       sharding.batch_sharding(mesh, len(shape)))
        for shape in ((32, 64), (32, 64), (32, 1, 64))]
def run(loss):
  (value, _), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(*args)
  return float(value), grads
full, full_grads = run(lambda *a: losses.info_nce(*a, 0.1))
chunked, chunked_grads = run(lambda *a: chunked_info_nce(*a, 0.1, 4))
assert abs(full - chunked) <= 1e-5 * abs(full), (full, chunked)
for g, c in zip(full_grads, chunked_grads):
  np.testing.assert_allclose(np.asarray(c), np.asarray(g), rtol=1e-5, atol=1e-6)
  assert c.sharding.spec == g.sharding.spec  # gradients stay batch-sharded
print("OK", chunked_grads[0].sharding.spec)
"""


def test_chunked_info_nce_on_a_batch_sharded_over_4_devices():
  out = subprocess.run([sys.executable, "-c", SHARDED_NCE], cwd=REPO, capture_output=True,
                       text=True, timeout=300,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
