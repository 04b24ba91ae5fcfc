"""Fault injection on the training run: kills at random moments, preemption, damaged checkpoints,
unwritable or full disks, non-finite losses. Each test breaks a real `python -m saejax.train`
process (tiny config, XLA's persistent compilation cache keeps restarts to seconds) and checks that
nothing trained is lost or silently changed.

tests/test_train.py already proves exact resume after one SIGTERM and one kill -9 and the
skip-and-count policy for NaN steps; this file goes further.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from saejax.errors import CheckpointError, ConfigError, SaejaxError
from saejax.hub import checkpoint, trained
from saejax.train import loop

sys.path.insert(0, str(Path(__file__).parent))
from test_train import (REPO, TINY, _assert_same_params, _final_params,  # noqa: E402
                        _fingerprints, _run, _tiny, _wait_for)

STEPS = 16  # checkpoints every 2 steps, the newest 3 kept (tests/tiny_config.py)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
EXIT_BOUND_S = 120  # a hang detector for a preempted run, not a speed target


# `python -m saejax.train` under a file-size limit: writes past it fail with EFBIG, as on a full
# disk (SIGXFSZ, which would kill the process instead, is ignored). Set in the child's own code,
# not in a preexec_fn, which forks a multithreaded (JAX) parent.
LIMITED = ("import resource, runpy, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0})); "
           "runpy.run_module('saejax.train', run_name='__main__', alter_sys=True)")


def _start(workdir: Path, *overrides, steps=STEPS, file_size_limit=None) -> subprocess.Popen:
  entry = (["-c", LIMITED.format(file_size_limit)] if file_size_limit
           else ["-m", "saejax.train"])
  cmd = [sys.executable, *entry, f"--config={TINY}:{steps}", f"--workdir={workdir}", *overrides]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ckpt_dir(workdir: Path) -> Path:
  return workdir / "checkpoints"


def _complete_steps(workdir: Path) -> list[int]:
  d = _ckpt_dir(workdir)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _tmp_dirs(workdir: Path) -> list[str]:
  d = _ckpt_dir(workdir)
  return sorted(p.name for p in d.iterdir() if TMP_SUFFIX in p.name) if d.is_dir() else []


def _state_files(step_dir: Path) -> list[Path]:
  """The array files of a checkpoint's TrainState, largest first."""
  return sorted((p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)),
                key=lambda p: -p.stat().st_size)


def _flip_bytes(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01  # one bit: Orbax alone would restore different weights silently
  path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: the batches and parameters every interrupted run must reproduce."""
  workdir = tmp_path_factory.mktemp("reference")
  _run(workdir, steps=STEPS)
  assert _complete_steps(workdir) == [12, 14, 16]
  return workdir


def _same_as_reference(workdir: Path, reference: Path) -> None:
  assert _fingerprints(workdir) == _fingerprints(reference)  # also: a replayed step saw one batch
  _assert_same_params(_final_params(workdir, STEPS), _final_params(reference, STEPS))
  for step in _complete_steps(workdir):
    assert checkpoint.verify_step(_ckpt_dir(workdir) / str(step))


# ---------------------------------------------------------------------------------------------
# 1. Kill anywhere

def _kill_when(proc: subprocess.Popen, workdir: Path, moment) -> tuple[str, str]:
  """SIGKILL `proc` at `moment`; returns what the moment was and the run's output."""
  kind, value = moment
  batches = workdir / "batches.process0.jsonl"
  lines = lambda: len(batches.read_text().splitlines()) if batches.exists() else 0
  seen = lines()
  if kind == "mid-write":  # the value-th asynchronous checkpoint write of this process
    # Past start-up first: the previous kill's temporary directory is only cleaned then.
    _wait_for(lambda: lines() > seen, proc)
    appeared, was_present = 0, False
    while appeared < value:
      present = bool(_tmp_dirs(workdir))
      appeared += present and not was_present
      was_present = present
      if proc.poll() is not None:
        raise AssertionError(f"run ended before the event: {proc.communicate()}")
      time.sleep(0.002)
  elif kind == "batches":  # after `value` more training steps
    _wait_for(lambda: lines() >= seen + value, proc)
  else:  # "seconds" after the start: start-up, restore, compile or training
    time.sleep(value)
  proc.kill()
  out, err = proc.communicate()
  return f"{kind}={value}", out + err


@pytest.mark.slow
def test_killed_at_random_moments_resumes_exactly(tmp_path, reference):
  rng = random.Random(8)
  moments = [("mid-write", 2), ("batches", rng.randint(3, 6)), ("mid-write", rng.randint(1, 3)),
             ("seconds", round(rng.uniform(1.0, 6.0), 2))]
  log = []
  for moment in moments:
    before = _complete_steps(tmp_path)
    proc = _start(tmp_path)
    what, out = _kill_when(proc, tmp_path, moment)
    complete, partial = _complete_steps(tmp_path), _tmp_dirs(tmp_path)
    log.append((what, complete, partial))
    if before and "step " in out:  # it got past start-up: it resumed from the newest whole step
      assert f"resumed from checkpoint step {max(before)}" in out, out
    # What a restart sees: only renamed (whole) steps; each matches its digest or has none yet.
    assert trained.checkpoint_steps(tmp_path) == complete
    for step in complete:
      checkpoint.verify_step(_ckpt_dir(tmp_path) / str(step))
    if moment[0] == "mid-write":
      assert partial, f"{what}: no write was in flight when the kill landed"
      assert max(before, default=0) <= max(complete)  # a killed write costs no older checkpoint
  print("kills (moment, complete steps, partial writes left):", *log, sep="\n  ")
  assert len({tuple(c) for _, c, _ in log}) > 1  # the kills landed at different progress
  out = _run(tmp_path, steps=STEPS)
  assert f"resumed from checkpoint step {max(log[-1][1])}" in out
  assert not _tmp_dirs(tmp_path)  # cleaned at the next start, never restored
  _same_as_reference(tmp_path, reference)


# ---------------------------------------------------------------------------------------------
# 2. Preemption

@pytest.mark.slow
def test_sigterm_storm_saves_whole_checkpoint_and_exits_in_bounded_time(tmp_path):
  proc = _start(tmp_path)
  batches = tmp_path / "batches.process0.jsonl"
  _wait_for(lambda: batches.exists() and len(batches.read_text().splitlines()) >= 3, proc)
  start = time.time()
  while proc.poll() is None and time.time() - start < EXIT_BOUND_S:
    proc.send_signal(signal.SIGTERM)  # the first asks for a checkpoint; the rest hit the save
    time.sleep(0.01)
  if proc.poll() is None:
    proc.kill()
    pytest.fail(f"preempted run did not exit within {EXIT_BOUND_S} s")
  exit_s = time.time() - start
  out, err = proc.communicate()
  assert proc.returncode == 0, out + err
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["preempted"] and summary["latest_checkpoint"] == summary["step"] < STEPS
  assert checkpoint.verify_step(_ckpt_dir(tmp_path) / str(summary["step"]))  # whole and sealed
  assert not _tmp_dirs(tmp_path)
  print(f"preempted at step {summary['step']}, exited {exit_s:.1f} s after the first SIGTERM")
  assert _final_params(tmp_path, summary["step"])  # readable (exact resume: tests/test_train.py)


# ---------------------------------------------------------------------------------------------
# 3. Damaged checkpoints

@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_then_refuses_to_start_over(tmp_path, reference):
  run = tmp_path / "run"
  _run(run, "--config.train.steps=6", steps=STEPS)  # the reference's schedule, stopped at 6
  assert _complete_steps(run) == [2, 4, 6]
  hopeless = tmp_path / "hopeless"
  shutil.copytree(run, hopeless)

  damaged = _state_files(_ckpt_dir(run) / "6")[0]
  _flip_bytes(damaged)
  out = _run(run, steps=STEPS)
  assert f"checkpoint step 6 in {_ckpt_dir(run)} cannot be used" in out
  assert f"{damaged} does not match the SHA-256" in out
  assert "resuming from checkpoint step 4, the newest good one" in out
  assert "resumed from checkpoint step 4" in out
  assert [p.name.split("-")[0] for p in (run / "checkpoints_damaged").iterdir()] == ["6"]
  _same_as_reference(run, reference)  # steps 5 and 6 redone on the same batches

  # No good checkpoint at all: a bit flip, a truncated file whose digest is lost too (only Orbax's
  # own reading can tell), and a mangled data-iterator state.
  ckpts = _ckpt_dir(hopeless)
  _flip_bytes(_state_files(ckpts / "6")[0])
  (ckpts / "4" / checkpoint.DIGEST_FILE).unlink()
  _truncate(_state_files(ckpts / "4")[0])
  (ckpts / "2" / "data_iter" / "process_0-of-1.json").write_text('{"next_ind')
  proc = _start(hopeless)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, out + err
  assert "error: no checkpoint in" in err and "instead of starting over" in err
  assert "step 6: " in err and "does not match the SHA-256" in err
  assert "step 4: " in err and "cannot be restored" in err
  assert "step 2: " in err and "process_0-of-1.json has 10 bytes" in err
  assert _complete_steps(hopeless) == [2, 4, 6] and "step " not in out  # nothing trained


@pytest.mark.slow
def test_damaged_newest_checkpoint_of_a_killed_run_is_caught(tmp_path, reference):
  """A killed run never reaches a later save or a clean exit, so its newest checkpoint must have
  been sealed when Orbax committed it: damage to it is then caught instead of trained on."""
  every = ("--config.train.checkpoint_every=6",)  # steps between commits: a wide window
  proc = _start(tmp_path, *every)
  committed = _ckpt_dir(tmp_path) / "12"  # renamed into place: Orbax committed step 12
  start = time.time()
  while not committed.is_dir():  # polled tightly: the kill lands long before the next save
    if proc.poll() is not None or time.time() - start > 300:
      proc.kill()
      raise AssertionError(f"step 12 never committed: {proc.communicate()}")
    time.sleep(0.002)
  proc.kill()
  proc.communicate()
  steps = _complete_steps(tmp_path)
  assert len(steps) >= 2 and max(steps) >= 12, steps
  for step in steps:  # the newest too: sealed before the commit, not at the next save or exit
    assert checkpoint.verify_step(_ckpt_dir(tmp_path) / str(step)), f"step {step} is unsealed"

  newest, previous = steps[-1], steps[-2]
  damaged = _state_files(_ckpt_dir(tmp_path) / str(newest))[0]
  _flip_bytes(damaged)
  out = _run(tmp_path, *every, steps=STEPS)
  assert f"checkpoint step {newest} in {_ckpt_dir(tmp_path)} cannot be used" in out, out
  assert f"{damaged} does not match the SHA-256" in out
  assert f"resumed from checkpoint step {previous}" in out
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_damaged").iterdir()] == [
      str(newest)]
  _same_as_reference(tmp_path, reference)  # the damaged step's updates redone, exactly


@pytest.mark.slow
def test_unsealed_checkpoint_is_used_only_after_every_sealed_one(tmp_path, reference):
  """A step without a digest (an older saejax's, or a synchronous save killed between commit and
  seal) cannot be checked: resuming prefers an older sealed step and sets the unsealed one aside."""
  _run(tmp_path, "--config.train.steps=6", steps=STEPS)
  assert _complete_steps(tmp_path) == [2, 4, 6]
  (_ckpt_dir(tmp_path) / "6" / checkpoint.DIGEST_FILE).unlink()
  out = _run(tmp_path, steps=STEPS)
  assert "resumed from checkpoint step 4" in out and "unsealed checkpoints [6] were moved" in out
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_unsealed").iterdir()] == ["6"]
  _same_as_reference(tmp_path, reference)

  only = tmp_path / "only-unsealed"  # no sealed step at all: used, with a warning
  _run(only, "--config.train.steps=2", steps=STEPS)
  for step in _complete_steps(only):
    (_ckpt_dir(only) / str(step) / checkpoint.DIGEST_FILE).unlink()
  out = _run(only, "--config.train.steps=4", steps=STEPS)
  assert "checkpoint step 2 in" in out and "has no digest" in out, out
  assert "resumed from checkpoint step 2" in out


def test_verify_step_names_the_damage(tmp_path, reference):
  step_dir = tmp_path / "16"
  shutil.copytree(_ckpt_dir(reference) / "16", step_dir)
  assert checkpoint.verify_step(step_dir)
  files = _state_files(step_dir)
  _truncate(files[0])
  with pytest.raises(checkpoint.DamagedCheckpointError, match=f"{files[0]} has .* bytes"):
    checkpoint.verify_step(step_dir)
  shutil.copyfile(_ckpt_dir(reference) / "16" / files[0].relative_to(step_dir), files[0])
  files[1].unlink()
  with pytest.raises(checkpoint.DamagedCheckpointError, match=f"{files[1]} is missing"):
    checkpoint.verify_step(step_dir)
  (step_dir / checkpoint.DIGEST_FILE).write_text("{not json")
  with pytest.raises(checkpoint.DamagedCheckpointError, match="saejax_digest.json is unreadable"):
    checkpoint.verify_step(step_dir)
  (step_dir / checkpoint.DIGEST_FILE).unlink()
  assert checkpoint.verify_step(step_dir) is False  # unsealed: left to Orbax's own checks


# ---------------------------------------------------------------------------------------------
# 4. Unwritable workdir, full disk

def test_workdir_under_a_file_fails_at_start(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  with pytest.raises(CheckpointError, match=f"{blocker / 'run'} is not writable"):
    loop.train(_tiny(), blocker / "run")
  proc = _start(blocker / "run")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2 and "is not writable (NotADirectoryError" in err, out + err


def test_read_only_workdir_fails_at_start(tmp_path):
  """A workdir its user may not write (chmod 0o500) fails at start, naming the PermissionError.
  Root writes through the mode bits (CAP_DAC_OVERRIDE): as root, the run is started without the
  two capabilities that bypass them (util-linux's setpriv), so the mode bits bind it as a user."""
  workdir = tmp_path / "ro"
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    if os.geteuid() != 0:
      with pytest.raises(CheckpointError, match=r"is not writable \(PermissionError"):
        loop.train(_tiny(), workdir)
    else:
      drop = [shutil.which("setpriv") or "setpriv",
              "--bounding-set=-dac_override,-dac_read_search"]
      try:  # a container may forbid dropping capabilities (no CAP_SETPCAP)
        able = subprocess.run([*drop, "true"], capture_output=True).returncode == 0
      except FileNotFoundError:
        able = False
      if not able:
        pytest.skip("running as root, and util-linux's setpriv cannot drop CAP_DAC_OVERRIDE here")
      out = subprocess.run([*drop, sys.executable, "-m", "saejax.train", f"--config={TINY}:6",
                            f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
      assert out.returncode == 2, out.stdout + out.stderr
      assert out.stderr.strip().splitlines()[-1].startswith(
          f"error: {workdir} is not writable (PermissionError: Permission denied)"), out.stderr
    assert not any(workdir.iterdir())  # nothing was written before the refusal
  finally:
    workdir.chmod(0o700)


def test_failed_checkpoint_write_is_reported_and_keeps_last_good(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  # 1 MB: logs still fit, the state's largest array file (~3 MB) does not.
  proc = _start(tmp_path, "--config.train.steps=20", file_size_limit=1_000_000)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, out + err
  assert "error: writing checkpoint step 18" in err and "File too large" in err
  assert "The newest complete checkpoint is step 16, left untouched" in err
  assert _complete_steps(tmp_path) == [12, 14, 16]
  assert checkpoint.verify_step(_ckpt_dir(tmp_path) / "16")
  _assert_same_params(_final_params(tmp_path, 16), _final_params(reference, 16))


# ---------------------------------------------------------------------------------------------
# 5. Numerical faults

@pytest.mark.slow
def test_infinite_loss_stops_run_with_last_good_checkpoint_loadable(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  proc = _start(tmp_path, "--config.train.steps=30", "--config.loss.w_fvu=inf",
                "--config.train.max_consecutive_skips=3", "--config.train.log_every=1")
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 2, out + err
  assert ("3 consecutive steps had a non-finite loss or gradient" in err
          and "The last good checkpoint is step 16" in err), err
  losses = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()[-3:]]
  assert [r["skipped"] for r in losses] == [1, 2, 3] and not np.isfinite(losses[-1]["loss"])
  assert _complete_steps(tmp_path) == [12, 14, 16]  # nothing saved during the streak
  assert checkpoint.verify_step(_ckpt_dir(tmp_path) / "16")
  _assert_same_params(_final_params(tmp_path, 16), _final_params(reference, 16))


def test_nonfinite_streak_stops_between_logging_steps(tmp_path):
  """The streak limit is checked every step (one step late, so the host never waits for the step
  it just dispatched), not only on logging steps: with log_every=50 a run must not go on to step 30
  or 50 before it notices."""
  config = _tiny(steps=12)
  config.train.max_consecutive_skips = 3
  config.train.log_every = 50
  loop.train(config, tmp_path)  # 12 good steps, checkpoints up to 12
  config.train.steps = config.optim.total_steps = 40
  config.loss.temperature = float("nan")  # injected fault: every step from 13 on is NaN
  with pytest.raises(SaejaxError, match=r"3 consecutive steps had a non-finite loss or gradient, "
                                        r"up to step 15 .*last good checkpoint is step 12"):
    loop.train(config, tmp_path)
  ran = max(_fingerprints(tmp_path))  # every step that took a batch, in both runs
  assert 15 <= ran <= 16, f"the run went on to step {ran}; the limit was reached at step 15"
  assert _complete_steps(tmp_path)[-1] == 12  # nothing saved during the streak


def test_load_run_skips_a_damaged_newest_checkpoint(tmp_path, caplog):
  """Evaluation and export read runs through `trained.load_run`: the same digest check and
  newest-good fallback as resuming; an explicitly requested damaged step is an error. A good
  checkpoint loads without warnings (Orbax's "Metadata file does not exist" included)."""
  run = tmp_path / "run"
  _run(run, "--config.train.steps=4", steps=STEPS)
  assert _complete_steps(run)[-2:] == [2, 4]
  with caplog.at_level(logging.WARNING):
    _, good, _ = trained.load_run(run, step=2)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
  _flip_bytes(_state_files(_ckpt_dir(run) / "4")[0])
  _, model, _ = trained.load_run(run)
  _assert_same_params(nnx.state(model, nnx.Param), nnx.state(good, nnx.Param))
  with pytest.raises(CheckpointError, match="step 4.*SHA-256"):
    trained.load_run(run, step=4)



def test_load_run_prefers_a_sealed_checkpoint_to_a_newer_unsealed_one(tmp_path, caplog):
  """An unsealed step (no digest: its files cannot be checked) is not loaded while a sealed one
  reads, the same order as resuming (`checkpoint.restore_order`); alone, it loads with a warning."""
  run = tmp_path / "run"
  _run(run, "--config.train.steps=4", steps=STEPS)
  _, step2, _ = trained.load_run(run, step=2)
  _, step4, _ = trained.load_run(run, step=4)
  (_ckpt_dir(run) / "4" / checkpoint.DIGEST_FILE).unlink()
  with caplog.at_level(logging.WARNING):
    _, model, _ = trained.load_run(run)
  _assert_same_params(nnx.state(model, nnx.Param), nnx.state(step2, nnx.Param))
  assert "skipped checkpoints [4]" in caplog.text
  caplog.clear()
  for older in _complete_steps(run)[:-1]:
    shutil.rmtree(_ckpt_dir(run) / str(older))
  with caplog.at_level(logging.WARNING):
    _, model, _ = trained.load_run(run)
  _assert_same_params(nnx.state(model, nnx.Param), nnx.state(step4, nnx.Param))
  assert "checkpoint 4" in caplog.text and "unsealed" in caplog.text

# ---------------------------------------------------------------------------------------------
# 6. Command-line mistakes: one line naming the fix, and nothing left behind

def _train_cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "saejax.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_misspelt_override_names_section_key_and_nearest_keys(tmp_path):
  workdir = tmp_path / "run"
  for override, section, key, nearest in (("--config.sae.kk=3", "config.sae", "kk", "k"),
                                          ("--config.sea.k=3", "config", "sea", "sae")):
    out = _train_cli("--config", "configs/quickstart.py", override, "--workdir", str(workdir))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr  # one line, no traceback
    assert out.stderr.startswith(f"error: {override.split('=')[0]}: {section} has no key "
                                 f"'{key}'; did you mean {nearest}? its keys are "), out.stderr
    assert not workdir.exists()


def test_missing_config_file_is_one_line_and_makes_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  out = _train_cli("--config=configs/no_such_config.py", f"--workdir={workdir}")
  assert out.returncode == 2, out.stdout + out.stderr
  assert not workdir.exists()
  assert out.stderr.splitlines() == [
      "error: --config configs/no_such_config.py: no such config file (e.g. configs/quickstart.py)"]
  config = _tiny()  # in-process too: a config error is found before the workdir is made
  config.unlock()
  config.loss.w_typo = 1.0
  with pytest.raises(ConfigError, match=r"config.loss has unknown keys \['w_typo'\]"):
    loop.train(config, workdir)
  assert not workdir.exists()
