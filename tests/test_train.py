"""The training loop end to end: checkpoints, exact resume, sharding, configs, non-finite steps."""

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from saejax.errors import ConfigError, SaejaxError
from saejax.hub import build
from saejax.hub.state import (OptimConfig, clip_by_global_norm, init_state, make_optimizer,
                               schedule)
from saejax.sae import topk as sae_lib
from saejax.train import loop, step as step_lib

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_config.py"


def _load_config(path: Path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _tiny(steps=6, **updates):
  config = _load_config(TINY, str(steps))
  for dotted, value in updates.items():
    section, key = dotted.split(".")
    config[section][key] = value
  return config




def _run(workdir: Path, *overrides, steps=6, env=None, wait=True):
  cmd = [sys.executable, "-m", "saejax.train", f"--config={TINY}:{steps}", f"--workdir={workdir}",
         *overrides]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, **(env or {})})
  if wait:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out
  return proc


def _fingerprints(workdir: Path) -> dict[int, str]:
  """step -> batch hash; a step seen twice (after a kill) must have seen the same batch."""
  seen: dict[int, str] = {}
  for line in (workdir / "batches.process0.jsonl").read_text().splitlines():
    row = json.loads(line)
    assert seen.setdefault(row["step"], row["batch"]) == row["batch"], row
  return seen


def _final_params(workdir: Path, step: int):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(workdir / "checkpoints" / str(step) / "state")["params"]


def _assert_same_params(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tiny_state(optim: OptimConfig, config=None):
  """(graphdef, params, tx, step-0 state) of the tiny config's model under `optim`."""
  _, model = build.build_model(config or _tiny(), nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(optim, params)
  return graphdef, params, tx, init_state(model, tx)


def _random_batch(seed: int, docs_per_query: int) -> dict:
  """4 queries of 8 tokens, each with `docs_per_query` documents of 12 tokens."""
  rng = np.random.default_rng(seed)
  return {"q_ids": rng.integers(1000, 2000, (4, 8)).astype(np.int32),
          "q_valid": np.ones((4, 8), bool),
          "d_ids": rng.integers(1000, 2000, (4, docs_per_query, 12)).astype(np.int32),
          "d_valid": np.ones((4, docs_per_query, 12), bool)}


def _wait_for(predicate, proc, timeout=300):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"run ended before the event: {proc.communicate()[0]}")
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  out = _run(workdir, steps=40)
  return workdir, out


def test_run_writes_checkpoints_logs_and_summary(uninterrupted):
  workdir, out = uninterrupted
  assert "step     40/40" in out and "done: step 40" in out
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 40 and summary["latest_checkpoint"] == 40
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [36, 38, 40]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {"loss", "info_nce", "fvu", "auxk", "l0", "dead_fraction", "hot_fraction", "grad_norm",
          "param_norm", "update_norm", "lr_encoder", "lr_sae", "tokens_per_s"} <= rows[-1].keys()
  # l0 of step 39, recomputed: checkpoint 38's encoder on the 39th batch, then a NumPy TopK SAE.
  from saejax.data import pipeline as data
  from saejax.hub import trained
  assert rows[38]["step"] == 39
  _, model, tokenizer = trained.load_run(workdir, step=38)
  batches = data.make_iterator(build.data_config(_tiny(40)), tokenizer, shard_index=0,
                               shard_count=1)
  batch = [next(batches) for _ in range(39)][-1]
  assert loop._fingerprint(batch) == _fingerprints(workdir)[39]
  b, n_docs, t_d = batch["d_ids"].shape
  v = np.concatenate([model.dense(batch["q_ids"], batch["q_valid"]), model.dense(
      batch["d_ids"].reshape(b * n_docs, t_d), batch["d_valid"].reshape(b * n_docs, t_d))])
  sae = {name: np.asarray(getattr(model.sae, name)[...]) for name in ("w_enc", "b_lat", "b_pre")}
  pre = (v - sae["b_pre"]) @ sae["w_enc"] + sae["b_lat"]
  top8 = -np.sort(-pre, axis=1)[:, :8]
  assert rows[38]["l0"] == pytest.approx((top8 > 0).sum(1).mean(), abs=1e-6)
  best = summary["best_metrics"]
  assert best["loss"]["value"] == min(r["loss"] for r in rows)
  assert best["accuracy"]["value"] == max(r["accuracy"] for r in rows)
  assert rows[best["loss"]["step"] - 1]["loss"] == best["loss"]["value"]
  assert summary["curves"] == str(workdir / "curves.png") and (workdir / "curves.png").stat().st_size
  config = json.loads((workdir / "config.json").read_text())
  assert config["sae"]["k"] == 8 and (workdir / "code_version.txt").read_text().strip()


def test_resume_after_sigterm_is_exact(tmp_path, uninterrupted):
  reference, _ = uninterrupted
  proc = _run(tmp_path, steps=40, wait=False)
  batches = tmp_path / "batches.process0.jsonl"
  _wait_for(lambda: batches.exists() and len(batches.read_text().splitlines()) >= 5, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  stopped_at = json.loads((tmp_path / "summary.json").read_text())
  assert stopped_at["preempted"] and 5 <= stopped_at["step"] < 40, out
  assert stopped_at["latest_checkpoint"] == stopped_at["step"]  # saved on the way out
  _run(tmp_path, steps=40)
  assert _fingerprints(tmp_path) == _fingerprints(reference)
  _assert_same_params(_final_params(tmp_path, 40), _final_params(reference, 40))


def test_a_refused_resume_leaves_the_run_loadable(tmp_path, uninterrupted):
  """Resuming with a shape-changing override fails, and the run's config.json (what load_run and
  export rebuild the model from) still describes its checkpoints."""
  import shutil
  from saejax.hub import trained
  reference, _ = uninterrupted
  run = tmp_path / "run"
  shutil.copytree(reference, run)
  before = (run / "config.json").read_text()
  proc = _run(run, "--config.sae.num_latents=64", steps=40, wait=False)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode != 0, out
  assert (run / "config.json").read_text() == before
  _, model, _ = trained.load_run(run)
  assert model.sae.config.num_latents == 128


def test_resume_after_kill9_is_exact(tmp_path, uninterrupted):
  reference, _ = uninterrupted
  proc = _run(tmp_path, steps=40, wait=False)
  _wait_for(lambda: (tmp_path / "checkpoints" / "4").is_dir(), proc)  # renamed = complete
  proc.kill()
  proc.wait()
  _run(tmp_path, steps=40)
  assert _fingerprints(tmp_path) == _fingerprints(reference)
  _assert_same_params(_final_params(tmp_path, 40), _final_params(reference, 40))


SHARDED = """
import json, sys
import jax
from saejax.train import loop
sys.path.insert(0, "tests")
import tiny_config
config = tiny_config.get_config("4")
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = {mesh}
config.train.log_every = 1
summary, state, _ = loop.train(config, sys.argv[1])
# Read the shardings the params actually have after training (not what the rules would say).
unsharded = [f"{{jax.tree_util.keystr(path)}} {{x.shape}}"
             for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
             if x.size >= 1024 and x.sharding.is_fully_replicated]
print("RESULT" + json.dumps({{"devices": jax.device_count(), "replicated": unsharded}}))
"""


def _sharded_run(workdir, mesh, devices):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run([sys.executable, "-c", SHARDED.format(mesh=mesh), str(workdir)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT")[-1])
  losses = [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return result, losses


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  """The reference of both meshes below: the same run on one device (made once)."""
  return _sharded_run(tmp_path_factory.mktemp("single"), (1, 1, 1), 1)


@pytest.mark.parametrize("mesh", [(4, 2, 1), (2, 2, 2)])
def test_sharded_run_matches_single_device(tmp_path, mesh, single_device_run):
  single, single_losses = single_device_run
  sharded, sharded_losses = _sharded_run(tmp_path / "sharded", mesh, 8)
  assert single["devices"] == 1 and sharded["devices"] == 8
  assert len(single_losses) == len(sharded_losses) == 4
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-4)
  assert sharded["replicated"] == []  # every parameter with >= 1024 elements is sharded


def test_every_config_file_loads_and_builds():
  """Each configs/*.py: get_config() and its runlocal variant build the model abstractly."""
  files = sorted((REPO / "configs").glob("*.py"))
  assert files
  for file in files:
    for arg in (None, "runlocal"):
      config = _load_config(file, arg)
      model = nnx.eval_shape(lambda: build.build_model(config, nnx.Rngs(0),
                                                       load_weights=False)[1])
      assert model.encoder is not None
      build.data_config(config)  # sources and fields are valid
      for section, cls in (("loss", step_lib.LossConfig), ("optim", OptimConfig)):
        build.from_section(cls, config[section], section)
      assert config.train.steps > 0, file


def test_unknown_config_key_fails_at_start(tmp_path):
  out = subprocess.run([sys.executable, "-m", "saejax.train", f"--config={TINY}",
                        f"--workdir={tmp_path}", "--config.sae.kk=3"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "kk" in out.stderr
  config = _tiny()
  config.unlock()
  config.loss.w_typo = 1.0
  with pytest.raises(ConfigError, match=r"config.loss has unknown keys \['w_typo'\]"):
    build.from_section(step_lib.LossConfig, config.loss, "loss")


def test_nonfinite_steps_are_skipped_and_counted():
  optim = OptimConfig(warmup_steps=1, total_steps=10)
  graphdef, _, tx, state = _tiny_state(optim)
  batch = _random_batch(seed=0, docs_per_query=1)
  step = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, optim_cfg=optim)
  bad = step_lib.LossConfig(temperature=float("nan"))  # injected: NaN loss and gradients
  new, metrics = jax.jit(functools.partial(step, loss_cfg=bad))(state, batch)
  assert not np.isfinite(float(metrics["loss"])) and int(new.skipped) == 1
  assert int(new.consecutive_skips) == 1 and int(new.step) == 1
  _assert_same_params(new.params, state.params)
  _assert_same_params(new.opt_state, state.opt_state)
  good_step = jax.jit(functools.partial(step, loss_cfg=step_lib.LossConfig()))
  good, first = good_step(new, batch)  # the warm-up starts at lr 0: a second step moves the params
  # The logged rate is the one applied: optax did not count the skipped step.
  assert float(first["lr_sae"]) == 0.0
  good, second = good_step(good, batch)
  assert float(second["lr_sae"]) == pytest.approx(float(schedule(optim, optim.lr_sae)(1)))
  assert int(good.consecutive_skips) == 0 and int(good.skipped) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good.params),
                                                       jax.tree.leaves(state.params))]
  assert all(changed)


def test_unlogged_steps_train_the_same_and_skip_only_the_logged_metrics():
  """`train_step(..., log=False)` (the loop's steps between log lines) makes the same update; only
  the metrics no one reads (norms over every parameter, latent-health curves) are NaN, and one
  compiled step serves both."""
  optim = OptimConfig(warmup_steps=0, total_steps=10)
  graphdef, _, tx, state = _tiny_state(optim)
  batch = _random_batch(seed=3, docs_per_query=1)
  step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                   loss_cfg=step_lib.LossConfig(), optim_cfg=optim))
  logged, m_on = step(state, batch, True)
  quiet, m_off = step(state, batch, False)
  assert step._cache_size() == 1
  _assert_same_params(quiet.params, logged.params)
  _assert_same_params(quiet.opt_state, logged.opt_state)
  np.testing.assert_array_equal(quiet.since_fired, logged.since_fired)
  health = {"param_norm", "update_norm", "dead_fraction_window", "hot_fraction", "freq_median",
            "freq_max", "enc_norm_p50", "b_lat_p95"}
  assert all(np.isnan(float(m_off[key])) for key in health)
  for key in ("loss", "grad_norm", "l0", "info_nce"):
    assert float(m_off[key]) == float(m_on[key]) and np.isfinite(float(m_on[key]))
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(logged.params)]).astype(np.float64)
  np.testing.assert_allclose(float(m_on["param_norm"]), np.sqrt(np.sum(flat ** 2)), rtol=1e-5)
  assert float(m_on["update_norm"]) > 0
  w_enc = np.asarray(logged.params["sae"]["w_enc"].get_value())
  np.testing.assert_allclose(float(m_on["enc_norm_p50"]),
                             np.percentile(np.linalg.norm(w_enc, axis=0), 50), rtol=1e-5)


def test_too_many_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path):
  config = _tiny(steps=12)
  config.train.max_consecutive_skips = 3
  config.train.log_every = 1
  loop.train(config, tmp_path)  # 12 good steps, checkpoints up to 12
  config.train.steps = config.optim.total_steps = 30
  config.loss.temperature = float("nan")  # injected fault: every later step is NaN
  with pytest.raises(SaejaxError, match=r"3 consecutive steps had a non-finite loss.*"
                                        r"last good checkpoint is step 12"):
    loop.train(config, tmp_path)
  assert (tmp_path / "checkpoints" / "12").is_dir()


def test_a_finite_dataset_ends_the_run_with_a_checkpoint_and_a_summary(tmp_path):
  """config.data.num_epochs running out before train.steps stops the run cleanly: the last step
  trained is checkpointed and summary.json says why the run stopped short."""
  config = _tiny(steps=500)
  config.data.num_epochs = 1
  config.data.sources[0]["max_records"] = 48  # a handful of batches of 8
  summary, _, _ = loop.train(config, tmp_path)
  assert summary["data_ended"] and 0 < summary["step"] < 500
  assert summary["latest_checkpoint"] == summary["step"]
  assert (tmp_path / "checkpoints" / str(summary["step"])).is_dir()
  assert json.loads((tmp_path / "summary.json").read_text())["data_ended"]
  # Skipping stage 1's pairs past the end of the data is said, not a bare StopIteration.
  with pytest.raises(ConfigError, match=r"fresh_stage2 skips the 64 pairs .* ended after 6 "
                                        r"global batches"):
    loop.skip_stage_one_pairs(iter(range(6)), 64, 8)


def test_batch_split_is_checked_before_anything_runs(tmp_path):
  config = _tiny()
  config.optim.grad_accum = 3
  with pytest.raises(ConfigError, match=r"global_batch_size=8 does not split into "
                                        r"config.optim.grad_accum=3"):
    loop.train(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # refused before the workdir was made
  four = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 1})  # 4 data devices
  loop.check_batch_split(16, 2, four)
  with pytest.raises(ConfigError, match=r"micro-batch of 6 records .* over the 4 data-parallel"):
    loop.check_batch_split(12, 2, four)


def test_stage_one_heads_train_on_whole_batches():
  """A stage-1 / stage-3 head's batch is whole: grad_accum is the end-to-end step's setting."""
  optim = OptimConfig(grad_accum=4, warmup_steps=10)
  head = loop.head_optim(optim, _tiny(steps=6).warmstart)
  assert head.grad_accum == 1 and head.freeze_encoder


def test_best_metrics_skip_non_finite_values(tmp_path):
  writer = loop.MetricWriter(tmp_path, 30)
  for step, loss in ((10, 1.0), (20, float("nan")), (30, 3.0)):
    writer.write(step, {"loss": loss}, 0.0)
  writer.close()
  assert writer.best["loss"] == {"value": 1.0, "step": 10}


def test_frozen_encoder_and_dense_ablation():
  config = _tiny()
  optim = OptimConfig(warmup_steps=1, total_steps=10, freeze_encoder=True)
  graphdef, _, tx, state = _tiny_state(optim, config)
  batch = _random_batch(seed=1, docs_per_query=2)
  frozen_step = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                          loss_cfg=step_lib.LossConfig(), optim_cfg=optim))
  new, _ = frozen_step(*frozen_step(state, batch)[:1], batch)  # step 1 has lr 0 (warm-up)
  _assert_same_params(new.params["encoder"], state.params["encoder"])
  assert not np.array_equal(new.params["sae"]["w_enc"].get_value(),
                            state.params["sae"]["w_enc"].get_value())
  w_dec = np.asarray(new.params["sae"]["w_dec"].get_value())
  np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, rtol=1e-5)

  config.sae.enabled = False
  _, dense = build.build_model(config, nnx.Rngs(0))
  assert dense.sae is None
  graphdef, params = nnx.split(dense, nnx.Param)
  optim = OptimConfig(warmup_steps=1, total_steps=10)
  tx = make_optimizer(optim, params)
  state = init_state(dense, tx)
  new, metrics = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                           loss_cfg=step_lib.LossConfig(), optim_cfg=optim))(
      state, batch)
  assert np.isfinite(float(metrics["info_nce"])) and new.since_fired is None


def test_clip_by_global_norm_matches_optax_with_its_state():
  """The scalar-multiply clip gives optax's clipped gradients (above, at and below the threshold,
  an all-zero tree), takes a norm the caller already has, and keeps optax's state, so old
  checkpoints still load."""
  rng = np.random.default_rng(0)
  tree = {"a": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
          "b": {"c": jnp.asarray(rng.standard_normal(7), jnp.float32)}}
  norm = float(optax.tree.norm(tree))
  for max_norm in (norm / 4, norm, 4 * norm, 1.0):
    ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    got, state = ours.update(tree, ours.init(tree))
    want, _ = theirs.update(tree, theirs.init(tree))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=0), got, want)
    assert jax.tree.structure(state) == jax.tree.structure(theirs.init(tree))
    assert float(optax.tree.norm(got)) == pytest.approx(min(norm, max_norm), rel=1e-6)
  # A norm the caller already has is used as given, also through optax.chain (the step's path):
  # told |g| is twice what it is, the clip to |g| halves every gradient.
  chained = optax.chain(clip_by_global_norm(norm), optax.identity())
  got, _ = chained.update(tree, chained.init(tree), grad_norm=jnp.float32(2 * norm))
  jax.tree.map(lambda g, t: np.testing.assert_allclose(g, t / 2, rtol=1e-6), got, tree)
  zeros = jax.tree.map(jnp.zeros_like, tree)
  got, _ = clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(got))
  for bad in (0.0, -1.0):
    with pytest.raises(ConfigError, match="clip_norm"):
      OptimConfig(clip_norm=bad)


def test_gradient_accumulation_averages_micro_batch_gradients():
  batch = _random_batch(seed=2, docs_per_query=1)
  loss_cfg = step_lib.LossConfig()
  optim = OptimConfig(warmup_steps=1, total_steps=10, grad_accum=2)
  graphdef, params, tx, state = _tiny_state(optim)
  new, metrics = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                           optim_cfg=optim, loss_cfg=loss_cfg))(state, batch)

  def grads(half):
    micro = {k: v[2 * half:2 * half + 2] for k, v in batch.items()}
    loss = lambda p: step_lib.compute_loss(nnx.merge(graphdef, p), micro, state.since_fired,
                                           state.step, loss_cfg)[0]
    return jax.grad(loss)(params)

  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads(0), grads(1))
  mean = step_lib._project_decoder_grad(mean, params)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(step_lib._tree_norm(mean)),
                             rtol=1e-5)
  assert int(new.step) == 1


def test_step_update_is_the_optimiser_applied_to_its_gradients():
  """One step's parameters and moments are what the optimiser alone (computing |g| itself) makes of
  the step's gradients, with the clip active: the norm the step hands the clip is the true one."""
  batch = _random_batch(seed=4, docs_per_query=1)
  loss_cfg = step_lib.LossConfig()
  optim = OptimConfig(warmup_steps=0, total_steps=10, clip_norm=1e-3)
  graphdef, params, tx, state = _tiny_state(optim)
  new, metrics = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                           optim_cfg=optim, loss_cfg=loss_cfg))(state, batch)
  def loss(p):
    return step_lib.compute_loss(nnx.merge(graphdef, p), batch, state.since_fired, state.step,
                                 loss_cfg)[0]

  grads = step_lib._project_decoder_grad(jax.grad(loss)(params), params)
  assert float(optax.tree.norm(grads)) > 10 * optim.clip_norm  # the clip changes the update
  updates, opt_state = make_optimizer(optim, params).update(grads, state.opt_state, params)
  want = optax.apply_updates(params, updates)
  want["sae"]["w_dec"].set_value(sae_lib.normalize_decoder(want["sae"]["w_dec"].get_value()))
  for got, ref in ((new.params, want), (new.opt_state, opt_state)):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), got, ref)
  assert np.isfinite(float(metrics["loss"]))


def test_modernbert_recipe_trains_end_to_end(tmp_path):
  """configs/base.py shrunk to a random 2-layer ModernBERT: the real recipe's path runs, and its
  first step's loss is what NumPy computes from checkpoint 1 on the first batch."""
  from scipy.special import logsumexp
  from saejax.data import pipeline as data
  from saejax.hub import trained
  config = _load_config(REPO / "configs" / "base.py", "runlocal")
  config.train.log_batch_fingerprints = True
  summary, state, _ = loop.train(config, tmp_path)
  assert summary["step"] == 3 and int(state.step) == 3
  first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  # Step 1 runs at learning rate 0 (warm-up from 0), so checkpoint 1 holds the parameters (after
  # b_pre init and warm start) that computed step 1's loss; the FLOPS weights ramp from 0 too.
  assert first["step"] == 1 and first["lr_encoder"] == first["lr_sae"] == 0.0
  _, model, tokenizer = trained.load_run(tmp_path, step=1)
  batch = next(data.make_iterator(build.data_config(config), tokenizer, shard_index=0,
                                  shard_count=1))
  assert loop._fingerprint(batch) == _fingerprints(tmp_path)[1]
  b, t_d = batch["d_ids"].shape[0], batch["d_ids"].shape[-1]  # no hard negatives here
  v_q = np.asarray(model.dense(batch["q_ids"], batch["q_valid"]), np.float64)
  v_d = np.asarray(model.dense(batch["d_ids"].reshape(b, t_d), batch["d_valid"].reshape(b, t_d)),
                   np.float64)
  sae = {n: np.asarray(getattr(model.sae, n)[...], np.float64)
         for n in ("w_enc", "b_lat", "b_pre", "w_dec")}
  k, tau = config.sae.k, config.loss.temperature

  def code(v):  # z = ReLU(TopK(W_enc (v - b_pre) + b_lat))
    pre = (v - sae["b_pre"]) @ sae["w_enc"] + sae["b_lat"]
    return np.where(pre >= -np.sort(-pre, axis=1)[:, k - 1:k], np.maximum(pre, 0), 0)

  def info_nce(q, d):  # cosine similarities at temperature tau, in-batch negatives
    q, d = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, d))
    logits = q @ d.T / tau
    return np.mean(logsumexp(logits, axis=1) - np.diag(logits))

  z_q, z_d = code(v_q), code(v_d)
  v, z = np.concatenate([v_q, v_d]), np.concatenate([z_q, z_d])
  fvu = ((v - (z @ sae["w_dec"] + sae["b_pre"])) ** 2).sum() / ((v - v.mean(0)) ** 2).sum()
  expected = {"info_nce": info_nce(z_q, z_d), "dense/info_nce": info_nce(v_q, v_d), "fvu": fvu,
              "l0": (z > 0).sum(1).mean()}
  for key, value in expected.items():
    assert first[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  auxk = config.loss.w_auxk * first["auxk"]
  assert first["loss"] == pytest.approx(
      expected["info_nce"] + config.loss.w_dense_contrastive * expected["dense/info_nce"]
      + config.loss.w_fvu * fvu + auxk, rel=1e-4)


def test_recipe_defaults_equal_the_library_defaults():
  """One source of truth: every field of the config schema that a library dataclass also declares
  has the same default in both (recipe.py is what users read; the dataclasses what code builds)."""
  import dataclasses
  from saejax.eval.quickeval import EvalConfig
  from saejax.sae import topk as sae_lib
  from saejax.train import recipe
  c = recipe.default_config()
  # (section, dataclass, every defaulted field in the section): the eval section leaves the token
  # budgets to the data section, and batch size, seed and progress bars to EvalConfig.
  pairs = ((c.loss, step_lib.LossConfig, True), (c.optim, OptimConfig, True),
           (c.sae, sae_lib.SAEConfig, True), (c.eval, EvalConfig, False))
  for section, cls, complete in pairs:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in section.items():
      if name not in fields or fields[name].default is dataclasses.MISSING:
        continue
      assert value == fields[name].default, (cls.__name__, name, value, fields[name].default)
    missing = [n for n, f in fields.items()
               if n not in section and f.default is not dataclasses.MISSING]
    assert not missing or not complete, (cls.__name__, missing)


def test_warm_start_trains_the_sae_on_frozen_embeddings_only():
  """Stage 1 moves the SAE (its contrastive loss falls) and leaves the encoder untouched, with mixed
  batches and with batches of one k-means topic; the topic batches are really used (the two heads
  differ)."""
  from saejax.data import pipeline as data
  trained = {}
  for batch_groups in ("", "topics"):
    config = _tiny(steps=2)
    config.warmstart.steps, config.warmstart.pairs, config.warmstart.batch_size = 30, 64, 32
    config.warmstart.lr = 3e-3
    config.warmstart.batch_groups, config.warmstart.topics = batch_groups, 2
    _, model = build.build_model(config, nnx.Rngs(0))
    enc_before = jax.tree.map(np.asarray, nnx.state(model.encoder, nnx.Param))
    w_enc_before = np.asarray(model.sae.w_enc[...])
    tok = loop.load_tokenizer(config.model.tokenizer, vocab_size=30522)
    batches = data.make_iterator(build.data_config(config), tok)
    loss_cfg = build.from_section(step_lib.LossConfig, config.loss, "loss")
    optim_cfg = build.from_section(OptimConfig, config.optim, "optim")
    history = loop.warm_start_sae(model, batches, config.warmstart, loss_cfg, optim_cfg,
                                   log_every=10)
    assert len(history) == 3 and history[-1]["info_nce"] < history[0]["info_nce"]
    trained[batch_groups] = np.asarray(model.sae.w_enc[...])
    assert not np.allclose(trained[batch_groups], w_enc_before)
    _assert_same_params(enc_before, jax.tree.map(np.asarray, nnx.state(model.encoder, nnx.Param)))
  assert not np.allclose(trained[""], trained["topics"])


def test_stage_one_pools_each_text_once(monkeypatch):
  """Stage 1 pools pairs from many pipeline batches (each free of repeats only within itself): a
  query or positive already in the pool, as either, is left out, so no head batch can hold a
  pair's own positive as a negative. Planted: a repeated query, a repeated document, and a
  document equal to another pair's query."""
  from saejax.train import headtrain
  config = _tiny()
  _, model = build.build_model(config, nnx.Rngs(0))
  q = [[101, 102], [103], [105, 106], [107, 108], [101, 102], [109], [111], [113],
       [115], [117], [119], [121]]
  d = [[131], [132], [133], [134], [135], [136], [133], [137], [138], [139], [140], [107, 108]]

  def batch(rows):
    pad = lambda texts: (np.array([t + [0] * (2 - len(t)) for t in texts], np.int32),  # noqa: E731
                         np.array([[True] * len(t) + [False] * (2 - len(t)) for t in texts]))
    (q_ids, q_valid), (d_ids, d_valid) = pad([q[r] for r in rows]), pad([d[r] for r in rows])
    return {"q_ids": q_ids, "q_valid": q_valid, "d_ids": d_ids[:, None], "d_valid": d_valid[:, None],
            "source": np.zeros(len(rows), np.int32)}

  pooled = {}

  def capture(sae, q_v, d_v, *args, **kwargs):
    pooled.update(q=q_v, d=d_v)
    return sae, None, []

  monkeypatch.setattr(headtrain, "train_head", capture)
  ws = config.warmstart
  ws.pairs, ws.batch_size = 12, 4
  loop.warm_start_sae(model, iter([batch(range(i, i + 4)) for i in (0, 4, 8)]), ws,
                      step_lib.LossConfig(), OptimConfig())
  assert len(pooled["q"]) == 9  # rows 4, 6 and 11 left out
  texts = np.concatenate([pooled["q"], pooled["d"]]).round(5)
  assert len(np.unique(texts, axis=0)) == 18  # distinct texts embed apart; repeats would not


def test_warm_start_refuses_an_unknown_batch_grouping():
  config = _tiny(steps=2)
  config.warmstart.batch_groups = "topic"
  with pytest.raises(ConfigError, match=r"batch_groups='topic': expected '' \(mixed batches\), "
                                        r"'source' or 'topics'"):
    loop.warm_start_sae(None, iter(()), config.warmstart, None, None)


def test_head_refit_fits_a_fresh_sae_to_the_final_encoder(tmp_path):
  """``config.warmstart.refit``: the run ends with its encoder unchanged and a fresh head trained as
  stage 1 on that encoder's embeddings - exactly `loop.refit_head` applied to the same run without
  it - and that head is what the last checkpoint holds."""
  from saejax.data import pipeline as data
  from saejax.hub import trained

  def config(refit):
    c = _tiny(steps=3)
    c.warmstart.steps, c.warmstart.pairs, c.warmstart.batch_size = 10, 32, 16
    c.warmstart.lr, c.warmstart.refit = 3e-3, refit
    return c

  _, plain, graphdef = loop.train(config(False), tmp_path / "plain")
  _, refit, _ = loop.train(config(True), tmp_path / "refit")
  _assert_same_params(refit.params["encoder"], plain.params["encoder"])
  assert int(refit.step) == 3 and not np.asarray(refit.since_fired).any()

  c = config(True)
  expected = nnx.merge(graphdef, plain.params)
  batches = data.make_iterator(build.data_config(c),
                               loop.load_tokenizer(c.model.tokenizer, vocab_size=30522))
  loop.refit_head(expected, batches, c.warmstart, c.train.seed,
                  build.from_section(step_lib.LossConfig, c.loss, "loss"),
                  build.from_section(OptimConfig, c.optim, "optim"))
  w_plain = np.asarray(plain.params["sae"]["w_enc"].get_value())
  w_expected = np.asarray(expected.sae.w_enc[...])
  assert not np.allclose(w_expected, w_plain)
  np.testing.assert_allclose(np.asarray(refit.params["sae"]["w_enc"].get_value()), w_expected,
                             rtol=1e-5, atol=1e-6)
  _, saved, _ = trained.load_run(tmp_path / "refit")
  np.testing.assert_allclose(np.asarray(saved.sae.w_enc[...]), w_expected, rtol=1e-5, atol=1e-6)

  c.warmstart.steps = 0
  with pytest.raises(ConfigError, match=r"config.warmstart.refit.*steps is 0"):
    loop.train(c, tmp_path / "no_head_steps")


def _with_head(steps=3, **updates):
  """The tiny config with a 10-step stage 1 on 32 pairs (then ``updates``)."""
  return _tiny(steps=steps, **{"warmstart.steps": 10, "warmstart.pairs": 32,
                               "warmstart.batch_size": 16, "warmstart.lr": 3e-3, **updates})


def test_a_kept_stage_one_head_is_loaded_only_from_the_same_inputs(tmp_path, monkeypatch):
  """WORKDIR/stage1 keeps the stage-1 head; a run given ``warmstart.init_from`` loads it instead of
  training one and ends exactly where the run that trained it ended (stage 2 does not depend on how
  the head came); other inputs (a stage-1 setting, the encoder's weights) or a damaged file are
  errors that say so, before the new run's workdir exists when the config alone tells."""
  from saejax.errors import CheckpointError
  from saejax.train import stage1
  _, first, _ = loop.train(_with_head(), tmp_path / "first")
  assert (tmp_path / "first" / "stage1" / "head.json").is_file()

  def no_stage_one(*args, **kwargs):
    raise AssertionError("stage 1 trained although a matching head was kept")

  monkeypatch.setattr(loop, "warm_start_sae", no_stage_one)
  reuse = _with_head(**{"warmstart.init_from": str(tmp_path / "first")})
  _, second, _ = loop.train(reuse, tmp_path / "second")
  _assert_same_params(second.params, first.params)
  assert (tmp_path / "second" / "stage1" / "head.json").is_file()  # it can be started from too

  other = _with_head(**{"warmstart.init_from": str(tmp_path / "first"), "warmstart.pairs": 24})
  with pytest.raises(ConfigError, match=r"\(1 differ\): warmstart.pairs: 32 there, 24 here"):
    loop.train(other, tmp_path / "other")
  assert not (tmp_path / "other").exists()
  # The same config over other encoder weights: caught when the encoder is built (its digest).
  _, model = build.build_model(reuse, nnx.Rngs(0))
  record = stage1.fingerprint(reuse, loop.head_optim(build.from_section(
      OptimConfig, reuse.optim, "optim"), reuse.warmstart), model.encoder)
  untrained = np.asarray(model.sae.w_enc[...])
  stage1.load(tmp_path / "first", model.sae, record)
  with np.load(tmp_path / "first" / "stage1" / "head.npz") as kept:
    np.testing.assert_array_equal(np.asarray(model.sae.w_enc[...]), kept["w_enc"])
    assert not np.allclose(kept["w_enc"], untrained)
  # A seal written before a field joined stage1._NOT_READ records that field: it is not compared;
  # a field stage 1 reads still is.
  seal = tmp_path / "first" / "stage1" / "head.json"
  kept_seal = seal.read_text()
  body = json.loads(kept_seal)
  body["fingerprint"]["loss"]["w_dense_contrastive"] = 0.5
  seal.write_text(json.dumps(body))
  stage1.load(tmp_path / "first", model.sae, record)
  body["fingerprint"]["loss"]["w_contrastive"] = 123.0
  seal.write_text(json.dumps(body))
  with pytest.raises(ConfigError, match=r"\(1 differ\): loss.w_contrastive: 123.0 there"):
    stage1.load(tmp_path / "first", model.sae, record)
  seal.write_text(kept_seal)
  nnx.update(model.encoder, jax.tree.map(lambda x: x + 1e-3, nnx.state(model.encoder, nnx.Param)))
  moved = stage1.fingerprint(reuse, loop.head_optim(build.from_section(
      OptimConfig, reuse.optim, "optim"), reuse.warmstart), model.encoder)
  with pytest.raises(ConfigError, match=r"encoder_sha256"):
    stage1.load(tmp_path / "first", model.sae, moved)

  head = tmp_path / "first" / "stage1" / "head.npz"
  data = bytearray(head.read_bytes())
  data[len(data) // 2] ^= 1
  head.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match=r"head.npz: its SHA-256 is not the one head.json"):
    loop.train(reuse, tmp_path / "damaged")
  with pytest.raises(CheckpointError, match=r"no stage-1 head \(head.json missing\)"):
    loop.train(_with_head(**{"warmstart.init_from": str(tmp_path / "other")}), tmp_path / "none")
  with pytest.raises(ConfigError, match=r"init_from=.* this run has no stage 1"):
    loop.train(_tiny(**{"warmstart.init_from": str(tmp_path / "first"), "warmstart.steps": 0}),
               tmp_path / "no_stage1")


def test_a_run_restarted_before_its_first_checkpoint_reuses_its_own_stage_one(tmp_path,
                                                                               monkeypatch):
  """A run stopped after stage 1 but before its first checkpoint starts again from its kept head;
  one whose config changed since trains stage 1 afresh and keeps the new head."""
  import shutil
  _, first, _ = loop.train(_with_head(), tmp_path / "first")
  restarted = tmp_path / "restarted"
  restarted.mkdir()
  shutil.copytree(tmp_path / "first" / "stage1", restarted / "stage1")
  trained = []
  real = loop.warm_start_sae
  monkeypatch.setattr(loop, "warm_start_sae", lambda *a, **k: trained.append(1) or real(*a, **k))
  _, again, _ = loop.train(_with_head(), restarted)
  assert not trained
  _assert_same_params(again.params, first.params)
  shutil.copytree(tmp_path / "first" / "stage1", tmp_path / "changed" / "stage1")
  loop.train(_with_head(**{"warmstart.pairs": 24}), tmp_path / "changed")
  assert len(trained) == 1
  seal = json.loads((tmp_path / "changed" / "stage1" / "head.json").read_text())
  assert seal["fingerprint"]["warmstart"]["pairs"] == 24


def test_fresh_stage2_starts_after_the_pairs_stage_one_fitted(tmp_path):
  """Stage 1 embeds the stream's first ``warmstart.pairs`` pairs (28: 3.5 global batches of 8);
  stage 2 reads from the stream's start too, unless ``warmstart.fresh_stage2``, when its first
  step is the stream's batch 4, the first that stage 1 did not touch."""
  from saejax.data import pipeline as data
  from saejax.hub import trained
  runs = {}
  for fresh in (False, True):
    config = _with_head(steps=2, **{"warmstart.pairs": 28, "warmstart.fresh_stage2": fresh})
    config.train.log_batch_fingerprints = True
    loop.train(config, tmp_path / str(fresh))
    runs[fresh] = _fingerprints(tmp_path / str(fresh))
  _, _, tokenizer = trained.load_run(tmp_path / "True")
  stream = data.make_iterator(build.data_config(config), tokenizer, shard_index=0, shard_count=1)
  batches = [loop._fingerprint(next(stream)) for _ in range(6)]
  assert [runs[False][1], runs[False][2]] == batches[:2]
  assert [runs[True][1], runs[True][2]] == batches[4:6]


def test_the_quality_benchmarks_sparse_and_frozen_arms_share_stage_one():
  """eval/quality.py starts the frozen arm from the sparse arm's stage-1 head: their stage-1
  inputs must stay equal (at the same stage-2 length), and differ from a real change to stage 1."""
  from saejax.train import stage1
  config = functools.partial(_load_config, REPO / "configs" / "quality.py")

  def record(c):
    return stage1.fingerprint(c, loop.head_optim(build.from_section(OptimConfig, c.optim, "optim"),
                                                 c.warmstart))

  sparse = record(config("sparse"))
  assert stage1.differences(sparse, record(config("frozen"))) == []
  assert stage1.differences(record(config("sparse,150")), record(config("frozen,150"))) == []
  # Stage 1's warm-up is capped by stage 2's (`loop.head_optim`), which the quality config scales
  # with the stage-2 steps: a 150-step run's stage 1 is not a 600-step run's (the default).
  assert stage1.differences(record(config("sparse,150")), sparse) == [
      "head_optim.warmup_steps: 15 there, 30 here"]
  changed = config("frozen")
  changed.loss.st_band = 0
  assert stage1.differences(sparse, record(changed)) == ["loss.st_band: 64 there, 0 here"]
  encoder_only = config("sparse")
  encoder_only.loss.band_to_encoder = False  # head training forces it on: the same stage 1
  encoder_only.loss.flops_to_encoder = False  # likewise
  encoder_only.loss.w_dense_contrastive = 1.0  # a constant while v is: the same stage 1
  assert stage1.differences(sparse, record(encoder_only)) == []


def _dropped_repeats(rows: list[dict], global_batch: int, waiting_batches: int,
                     batches: int) -> list[int]:
  """The records dropped as in-batch repeats after each of `batches` global batches, counted by
  the rule saejax.data documents, on the rows in file order repeated: a batch takes the waiting
  records first (oldest first), then reads on; a record whose query or document the batch already
  holds waits, unless `waiting_batches` batches' worth already wait: then it is dropped."""
  stream = (row for _ in range(batches * global_batch) for row in rows)  # enough epochs
  waiting, dropped, after = [], 0, []
  for _ in range(batches):
    queries, documents, size, still = set(), set(), 0, []

    def fits(row):
      return row["query"] not in queries and row["document"] not in documents

    def take(row):
      nonlocal size
      queries.add(row["query"])
      documents.add(row["document"])
      size += 1

    for row in waiting:
      take(row) if size < global_batch and fits(row) else still.append(row)
    while size < global_batch:
      row = next(stream)
      if fits(row):
        take(row)
      elif len(still) < waiting_batches * global_batch:
        still.append(row)
      else:
        dropped += 1
    waiting = still
    after.append(dropped)
  return after


def _planted(tmp_path: Path, rows: list[dict], steps: int):
  """The tiny config reading ``rows`` (query, document) in file order, batches of 4, a log line
  every 2 steps."""
  path = tmp_path / "planted.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = _tiny(steps=steps)
  config.data.sources = [dict(kind="jsonl", path=str(path), query_field="query",
                              positive_field="document")]
  config.data.global_batch_size, config.data.shuffle = 4, False
  config.train.log_every = 2
  return config


def test_records_dropped_as_repeats_are_logged(tmp_path, capsys):
  """Planted data where 30 of 40 records share one document (a batch of 4 holds one of them): the
  run logs, on every logging step, exactly the records dropped so far as data/dropped_repeats."""
  from saejax.data import pipeline as data
  rows = [{"query": f"question {i}", "document": "the same document" if i % 4 else f"document {i}"}
          for i in range(40)]
  config = _planted(tmp_path, rows, steps=8)
  loop.train(config, tmp_path / "run")
  expected = _dropped_repeats(rows, 4, data.WAITING_BATCHES, 8)
  assert 0 < expected[3] < expected[-1]  # the planted data drops records, more as it runs
  logged = {r["step"]: r["data/dropped_repeats"] for r in map(
      json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
  assert logged == {step: expected[step - 1] for step in (2, 4, 6, 8)}
  last = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")][-1]
  assert f"  dropped {expected[-1]}  " in last, last


def test_truncated_texts_are_counted(tmp_path):
  """Planted data, read in order: every 3rd document and every 5th query exceed their token
  budgets; each log line carries the fraction of the window's texts cut, summary.json the totals."""
  rows = [{"query": f"question {i} " + ("why " * 60 if i % 5 == 0 else ""),
           "document": f"document {i} " + ("text " * 100 if i % 3 == 0 else "")}
          for i in range(16)]
  config = _planted(tmp_path, rows, steps=4)
  config.warmstart.steps = 0
  summary, _, _ = loop.train(config, tmp_path / "run")
  logged = {r["step"]: r for r in map(
      json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
  for step, records in ((2, range(0, 8)), (4, range(8, 16))):
    assert logged[step]["data/truncated_documents"] == sum(i % 3 == 0 for i in records) / 8
    assert logged[step]["data/truncated_queries"] == sum(i % 5 == 0 for i in records) / 8
  assert summary["truncated"] == {"queries": {"texts": 4, "of": 16},
                                  "documents": {"texts": 6, "of": 16}}


def test_gpu_compile_options_are_ones_this_xla_knows():
  """The options the train step is compiled with on GPU name real XLA debug options (XLA refuses
  an unknown name at compile time, so a renamed flag would stop GPU training); elsewhere none."""
  options = step_lib.compiler_options("gpu")
  assert options == {"xla_gpu_dot_merger_threshold_mb": 0}
  assert step_lib.compiler_options("cpu") is None and step_lib.compiler_options("tpu") is None
  x = jnp.ones((4, 4))
  jax.jit(lambda a: a @ a).lower(x).compile(compiler_options=options)
  with pytest.raises(Exception, match="No such compile option"):
    jax.jit(lambda a: a @ a).lower(x).compile(compiler_options={"xla_gpu_no_such_flag": 0})


def test_logged_firing_rates_are_the_rates_not_a_zero_started_average():
  """``hot_fraction`` and ``freq_*`` report each latent's firing rate per text: with the same codes
  every step the logged rates are those rates from the first logged step on (an exponential
  average started at 0 and left uncorrected reads (1 - 0.99^n) of them, 5% after 5 steps, so a
  dictionary going hot early in a run showed as healthy). A skipped (non-finite) step adds no
  observation."""
  d, s, k = 8, 16, 2
  rng = np.random.default_rng(0)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=d, num_latents=s, k=k, k_aux=4), rngs=nnx.Rngs(0))
  sae.w_enc.set_value(sae.w_enc[...].at[:, 0].set(10.0 * jnp.eye(d)[0]))
  from saejax.sae.embedder import Embedder
  from saejax.train import headtrain
  model = Embedder(None, sae)
  graphdef, params = nnx.split(model, nnx.Param)
  optim = OptimConfig(lr_sae=0.0, warmup_steps=0, total_steps=10, freeze_encoder=True)
  tx = make_optimizer(optim, params)
  state = init_state(model, tx)
  v = rng.normal(size=(22, d)).astype(np.float32)  # rates in 1/22: none at HOT_RATE exactly
  v[:, 0] = np.where(np.arange(22) % 5 == 0, 5.0, -5.0)  # latent 0 fires on 5 of the 22 texts
  batch = {"q_v": v[:11], "d_v": v[11:, None]}
  pre = (v - np.asarray(sae.b_pre[...])) @ np.asarray(sae.w_enc[...]) + np.asarray(sae.b_lat[...])
  top = np.argsort(-pre, 1)[:, :k]
  fired = np.take_along_axis(pre, top, 1) > 0
  rates = np.bincount(top[fired], minlength=s) / len(v)  # the same codes every step (lr 0)
  assert rates[0] == pytest.approx(5 / 22) and 0 < np.mean(rates > step_lib.HOT_RATE) < 1
  assert np.all(np.abs(rates - step_lib.HOT_RATE) > 1e-3)

  def step(loss_cfg):
    return jax.jit(lambda st, b: step_lib.train_step(
        st, b, graphdef=graphdef, tx=tx, loss_cfg=loss_cfg, optim_cfg=optim,
        loss_fn=headtrain.head_loss))

  good, bad = step(step_lib.LossConfig()), step(step_lib.LossConfig(temperature=float("nan")))
  for fn in (good, good, bad, good, good, good):  # 5 finite steps, one skipped
    state, metrics = fn(state, batch)
  assert int(state.skipped) == 1
  np.testing.assert_allclose(float(metrics["hot_fraction"]), np.mean(rates > step_lib.HOT_RATE))
  np.testing.assert_allclose(float(metrics["freq_max"]), rates.max(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["freq_median"]), np.median(rates), rtol=1e-4, atol=1e-7)


def test_mfu_counts_non_embedding_flops_of_the_window_it_timed(tmp_path, monkeypatch):
  """MFU = model FLOPs / time / peak, with Kaplan et al.'s 6 N per real token, N the encoder's
  non-embedding parameters (a token's row of the embedding table is a lookup, not a matmul: with
  the tables counted, MiniLM's MFU read 2x, ModernBERT-base's 1.35x), plus the SAE's 6 D S per
  text, over the steps of the window it timed (the last window of a run, or the first after a
  resume, is shorter than log_every)."""
  from saejax.data import pipeline as data
  from saejax.data.tokenizer import load_tokenizer
  rows = [{"query": f"question {i} " + "why " * (i % 3), "document": f"document {i} " + "x " * i}
          for i in range(24)]
  config = _planted(tmp_path, rows, steps=6)
  config.warmstart.steps = 0
  config.train.log_every = 4  # windows of 4 steps, then the last 2
  monkeypatch.setattr(step_lib, "peak_flops", lambda device: 1e12)
  loop.train(config, tmp_path / "run")
  logged = {r["step"]: r for r in map(
      json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
  assert sorted(logged) == [4, 6]
  hf = config.model.hf_config
  h, f, layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
  s = config.sae.num_latents
  per_layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h  # q k v o, MLP, 2 LayerNorms
  n_non_embedding = layers * per_layer + 2 * h  # + the embeddings' LayerNorm
  tokenizer = load_tokenizer(config.model.tokenizer, vocab_size=hf.vocab_size)
  batches = data.make_iterator(build.data_config(config), tokenizer, shard_index=0, shard_count=1)
  steps = [next(batches) for _ in range(6)]
  for end, window in ((4, steps[:4]), (6, steps[4:])):
    tokens = sum(int(b["q_valid"].sum() + b["d_valid"].sum()) for b in window)
    texts = sum(b["q_ids"].shape[0] * (1 + b["d_ids"].shape[1]) for b in window)
    flops = 6 * n_non_embedding * tokens + 6 * h * s * texts
    # tokens_per_s = tokens / elapsed, mfu = flops / elapsed / (peak * devices)
    got = logged[end]["mfu"] * 1e12 * jax.device_count() / logged[end]["tokens_per_s"]
    np.testing.assert_allclose(got, flops / tokens, rtol=1e-6, err_msg=f"window ending {end}")


def test_peak_flops_knows_each_device_kind_by_its_longest_name():
  """A Cloud TPU VM's v5p calls itself "TPU v5" (Levanter and vLLM's TPU code key it so), a v5e
  "TPU v5 lite": each gets its own peak, however the table is ordered; an unknown kind gets none
  (no MFU rather than a wrong one)."""
  kinds = {"TPU v5": 459e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v6 lite": 918e12,
           "TPU v4": 275e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
           "NVIDIA H100 NVL": 835e12, "cpu": None, "TPU v7x": None}
  for kind, peak in kinds.items():
    assert step_lib.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak, kind
