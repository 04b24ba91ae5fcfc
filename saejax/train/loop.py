"""Train a sparse-embedding model end to end.

    python -m saejax.train --config configs/base.py --workdir runs/base [--config.sae.k=32]

The loop: build the mesh, the model (from converted HF weights or a random init), the optimiser and
the data iterator from the config; resume from the newest checkpoint in the workdir if there is one;
run the jitted `saejax.train.step.train_step` with explicit shardings and donation; log every metric
to the console and TensorBoard; checkpoint asynchronously every N steps and on SIGTERM (preemption).
The workdir is a local directory or a bucket URL (``--workdir gs://BUCKET/PATH``, `saejax.paths`).
"""

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags

from saejax import paths, sharding
from saejax.data import pipeline
from saejax.data.tokenizer import load_tokenizer
from saejax.errors import ConfigError, SaejaxError
from saejax.hub import checkpoint, convert
from saejax.hub.build import build_model, data_config, from_section
from saejax.hub.state import OptimConfig, TrainState, init_state, make_optimizer
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder
from saejax.train import distributed, stage1, step as step_lib
from saejax.train.curves import training_curves

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and TensorBoard events go here: "
                               "a local directory or gs://BUCKET/PATH.")
_INIT_FROM = flags.DEFINE_string("init_from", None,
                                 "HF model directory or hub id to start the encoder from "
                                 "(overrides config.model.init_from).")


def init_b_pre_from_data(model: Embedder, batches, method: str) -> None:
  """Set b_pre to the mean / geometric median of pooled document embeddings (Gao et al. sec 2.1)."""
  dense = nnx.jit(lambda m, ids, valid: m.dense(ids, valid))
  vs = []
  for batch in batches:
    b, n, t = batch["d_ids"].shape
    vs.append(np.asarray(dense(model, batch["d_ids"].reshape(b * n, t),
                               batch["d_valid"].reshape(b * n, t))))
  model.sae.b_pre.set_value(sae_lib.init_b_pre(jnp.asarray(np.concatenate(vs)), method))


def warm_start_sae(model: Embedder, batches, ws: ml_collections.ConfigDict,
                   loss_cfg: step_lib.LossConfig, optim_cfg: OptimConfig,
                   log_every: int = 0) -> list[dict]:
  """Stage 1 of stage-wise training: train the SAE on the frozen encoder's embeddings.

  Embeds ``ws.pairs`` (query, positive) pairs of the training data once with the untouched
  encoder, then runs ``ws.steps`` head-training steps (`saejax.train.headtrain`, the same objective
  and invariants) at ``ws.lr`` on batches of ``ws.batch_size``. End-to-end training then starts from
  a dictionary that already ranks well, instead of training the encoder through a random one.
  ``ws.batch_groups`` "source" or "topics" makes every head batch ``ws.groups_per_batch`` parts,
  each of one source or of one of ``ws.topics`` k-means topics (`headtrain.topic_groups`). Every
  process embeds the global batches, so all of them compute the same SAE. Returns the head
  training's metrics every ``log_every`` steps (default: a quarter of the steps), printed by
  process 0.
  """
  from saejax.train import headtrain  # pylint: disable=import-outside-toplevel
  batch_groups = ws.get("batch_groups", "")
  if batch_groups not in ("", "source", "topics"):
    raise ConfigError(f"config.warmstart.batch_groups={batch_groups!r}: expected '' (mixed "
                      "batches), 'source' or 'topics'")
  dense = nnx.jit(lambda m, ids, valid: m.dense(ids, valid))
  qs, ds, keys, sources, n = [], [], [], [], 0
  while n < ws.pairs:
    try:
      batch = distributed.gather_batches([next(batches)])[0]
    except StopIteration:  # a finite config.data.num_epochs holds fewer pairs
      if not n:
        raise ConfigError("stage 1 found no training pairs (config.data)") from None
      if jax.process_index() == 0:
        print(f"warning: the training data ended after {n} pairs; stage 1 trains on those "
              f"(config.warmstart.pairs={ws.pairs})", flush=True)
      break
    qs.append(np.asarray(dense(model, batch["q_ids"], batch["q_valid"])))
    ds.append(np.asarray(dense(model, batch["d_ids"][:, 0], batch["d_valid"][:, 0])))
    keys += [_text_keys(batch, i) for i in range(len(qs[-1]))]
    sources.append(batch["source"])
    n += len(qs[-1])
  # The pairs in an order fixed by their content, not by how the processes' rows were gathered:
  # one process and several see the same set of pairs, and must train the same SAE from it.
  keys = keys[:ws.pairs]
  order = sorted(range(len(keys)), key=keys.__getitem__)
  order = np.asarray(_first_of_each_text(keys, order), np.int64)
  if len(order) < len(keys) and jax.process_index() == 0:
    print(f"warm start: {len(keys) - len(order)} of {len(keys)} pairs repeat a query or positive "
          f"text already in the pool (the data holds fewer distinct pairs than "
          f"config.warmstart.pairs, or shares texts between pairs); training on {len(order)}",
          flush=True)
  q_v, d_v = np.concatenate(qs)[:ws.pairs][order], np.concatenate(ds)[:ws.pairs][order]
  if batch_groups == "source":
    groups = np.concatenate(sources)[:ws.pairs][order]
  elif batch_groups == "topics":  # k-means need not agree to the bit across hosts: process 0's
    groups = multihost_utils.broadcast_one_to_all(headtrain.topic_groups(q_v, d_v, ws.topics))
    groups = np.asarray(groups)
  else:
    groups = None
  head_cfg = headtrain.HeadTrainConfig(steps=ws.steps, batch_size=min(ws.batch_size, len(q_v)),
                                       resample_every=ws.resample_every,
                                       resample_until=ws.resample_until,
                                       groups_per_batch=ws.get("groups_per_batch", 1))
  if jax.process_index() == 0:
    print(f"warm start: SAE on {len(q_v)} frozen-encoder pairs, {ws.steps} steps", flush=True)
  trained, _, history = headtrain.train_head(
      model.sae, q_v, d_v, loss_cfg, head_optim(optim_cfg, ws), head_cfg, groups=groups,
      log_every=log_every or max(ws.steps // 4, 1),
      log=print if jax.process_index() == 0 else lambda _: None)
  nnx.update(model.sae, nnx.state(trained, nnx.Param))
  return history


def head_optim(optim_cfg: OptimConfig, ws: ml_collections.ConfigDict) -> OptimConfig:
  """The optimiser of a stage-1 (and stage-3) head: ``ws``'s lr and steps, the encoder frozen."""
  return dataclasses.replace(optim_cfg, lr_sae=ws.lr, total_steps=ws.steps,
                             warmup_steps=min(optim_cfg.warmup_steps, ws.steps // 10),
                             freeze_encoder=True, grad_accum=1)  # a head batch is whole


def stage_one(model: Embedder, make_iter, config: ml_collections.ConfigDict,
              loss_cfg: step_lib.LossConfig, optim_cfg: OptimConfig, workdir: epath.Path) -> None:
  """Stage 1, or a head it already made from the same inputs (`saejax.train.stage1`): the one of
  ``config.warmstart.init_from`` (which must match), else this workdir's own from an attempt
  stopped before its first checkpoint; a head trained here is kept in WORKDIR/stage1/."""
  record = stage1.fingerprint(config, head_optim(optim_cfg, config.warmstart), model.encoder)
  say = print if jax.process_index() == 0 else lambda _: None
  source = config.warmstart.get("init_from", "")
  if source:
    trained_by = stage1.load(source, model.sae, record)
    say(f"warm start: the stage-1 head of {source} (trained by code {trained_by}), same inputs")
  else:
    if stage1.exists(workdir):
      try:
        stage1.load(workdir, model.sae, record)
        say("warm start: this workdir's stage-1 head (same inputs) from an earlier attempt")
        return
      except SaejaxError as e:
        say(f"warm start: not reusing this workdir's stage-1 head: {e}")
    warm_start_sae(model, make_iter(), config.warmstart, loss_cfg, optim_cfg)
  if jax.process_index() == 0:
    stage1.save(workdir, model.sae, record, code_version())


def skip_stage_one_pairs(data_iter, pairs: int, global_batch_size: int) -> int:
  """Advances stage 2's iterator past the global batches stage 1 embedded (``pairs`` pairs read
  from the start of the same stream by `warm_start_sae`), so stage 2 starts on pairs the head has
  not fitted. Without it stage 2's first ``pairs / global_batch_size`` steps re-read them: the
  quality benchmark's sparse arm logs InfoNCE ~0.000 (accuracy 1.00) for its first 250 of 600
  steps, against 0.03-0.29 after; skipping them scored no better there (0.617 against 0.622,
  benchmarks/RESULTS.md "Quality", session 25). The position is the iterator's, so it is
  checkpointed with it. Returns the batches skipped."""
  skipped = -(-pairs // global_batch_size)
  for done in range(skipped):
    try:
      next(data_iter)
    except StopIteration:  # a finite config.data.num_epochs
      raise ConfigError(f"config.warmstart.fresh_stage2 skips the {pairs} pairs stage 1 read, "
                        f"but the training data ended after {done} global batches of "
                        f"{global_batch_size}: nothing would be left for stage 2; lower "
                        "config.warmstart.pairs or raise config.data.num_epochs") from None
  return skipped


def refit_head(model: Embedder, batches, ws: ml_collections.ConfigDict, seed: int,
               loss_cfg: step_lib.LossConfig, optim_cfg: OptimConfig) -> list[dict]:
  """Stage 3 (``config.warmstart.refit``): replace the SAE with a fresh one (initialised from
  ``seed``) trained exactly as stage 1 trains it, on embeddings of the *final* encoder.

  Stage 2 trains the encoder through a head fitted to the untouched encoder; a head fitted to the
  encoder it will code ranks better (benchmarks/RESULTS.md "Quality", 2026-12-01: mean nDCG@10
  0.598 -> 0.607 at k = 64, 0.635 -> 0.644 with queries at 512). The encoder is not changed.
  """
  model.sae = sae_lib.SAE(model.sae.config, rngs=nnx.Rngs(seed))
  return warm_start_sae(model, batches, ws, loss_cfg, optim_cfg)


def _text_keys(batch: dict, i: int) -> tuple[str, str]:
  """Digests of row i's query and positive tokens (padding excluded): texts as the model reads
  them, so two documents cut to the same tokens are the same text."""
  import hashlib
  q = batch["q_ids"][i][batch["q_valid"][i]]
  d = batch["d_ids"][i, 0][batch["d_valid"][i, 0]]
  return tuple(hashlib.sha256(np.ascontiguousarray(t, np.int64).tobytes()).hexdigest()
               for t in (q, d))


def _first_of_each_text(keys: list[tuple[str, str]], order) -> list[int]:
  """The rows of ``order`` whose query and positive no earlier row holds (as either).

  A head batch is drawn from the pool at random; a text twice in the pool would be, in some
  batch, a positive that is also an in-batch negative: InfoNCE would push a pair's own match away
  (the pool is many pipeline batches, each free of repeats only within itself)."""
  seen, kept = set(), []
  for row in order:
    if not seen.intersection(keys[row]):
      seen.update(keys[row])
      kept.append(row)
  return kept


def code_version() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    from saejax import __version__
    return f"saejax {__version__} (no git)"


class MetricWriter:
  """Console lines, TensorBoard events and metrics.jsonl, written by process 0 only.

  In a bucket, TensorBoard's gs:// writer and `saejax.paths.LineLog` upload their files now and
  then (objects cannot be appended to); `flush` uploads them now (after each checkpoint).
  """

  COLUMNS = (("loss", "loss", "{:.4f}", 1), ("info_nce", "nce", "{:.3f}", 1),
             ("accuracy", "acc", "{:.2f}", 1), ("fvu", "fvu", "{:.3f}", 1),
             ("auxk", "auxk", "{:.3f}", 1), ("l0", "L0", "{:.1f}", 1),
             ("dead_fraction_window", "dead%", "{:.1f}", 100),
             ("hot_fraction", "hot%", "{:.1f}", 100), ("freq_max", "maxfreq%", "{:.1f}", 100),
             ("data/dropped_repeats", "dropped", "{:,.0f}", 1),
             ("data/truncated_documents", "cut_d%", "{:.1f}", 100),
             ("tokens_per_s", "tok/s", "{:,.0f}", 1), ("mfu", "MFU%", "{:.1f}", 100))

  # Metrics whose best value over the run goes into summary.json, and which way is better.
  BEST = {"loss": min, "info_nce": min, "fvu": min, "accuracy": max}

  def __init__(self, workdir: epath.Path, total_steps: int):
    self.active = jax.process_index() == 0
    self.total = total_steps
    self.best: dict[str, dict] = {}  # key -> {"value", "step"}, over this invocation's logs
    self.tb = self.jsonl = None
    if self.active:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(str(workdir / "tensorboard"))
      self.jsonl = paths.LineLog(workdir / "metrics.jsonl")  # the same numbers, for scripts

  def write(self, step: int, metrics: dict, seconds_per_step: float):
    if not self.active:
      return
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, **metrics}))
    for key, better in self.BEST.items():  # a non-finite value (a skipped step) is never best
      if key in metrics and math.isfinite(metrics[key]) and (
          key not in self.best
          or better(metrics[key], self.best[key]["value"]) != self.best[key]["value"]):
        self.best[key] = {"value": metrics[key], "step": step}
    eta = (self.total - step) * seconds_per_step
    shown = [f"{name} {fmt.format(scale * metrics[key])}" for key, name, fmt, scale in self.COLUMNS
             if key in metrics]
    print(f"step {step:>6}/{self.total}  " + "  ".join(shown) + f"  ETA {eta / 60:.1f} min",
          flush=True)

  def flush(self):
    """Make the events and metrics.jsonl written so far durable (uploaded, in a bucket)."""
    if self.tb is not None:
      self.tb.flush()
      self.jsonl.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()
      self.jsonl.close()


def _fingerprint(batch: dict) -> str:
  import hashlib
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(k.encode())
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()[:16]


def _global_batch(batch: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax arrays sharded over the data axes."""
  keys = ("q_ids", "q_valid", "d_ids", "d_valid")
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, batch[k].ndim),
                                                    batch[k]) for k in keys}


def check_batch_split(global_batch_size: int, grad_accum: int, mesh) -> None:
  """The global batch must split into ``grad_accum`` micro-batches, each over every data-parallel
  device; said here, before anything runs, not by a reshape inside jit."""
  devices = sharding.data_devices(mesh)
  if global_batch_size % grad_accum:  # grad_accum >= 1: OptimConfig checks it
    raise ConfigError(f"config.data.global_batch_size={global_batch_size} does not split into "
                      f"config.optim.grad_accum={grad_accum} micro-batches")
  micro = global_batch_size // grad_accum
  if micro % devices:
    raise ConfigError(f"a micro-batch of {micro} records (config.data.global_batch_size="
                      f"{global_batch_size} / config.optim.grad_accum={grad_accum}) does not "
                      f"divide over the {devices} data-parallel devices of the mesh "
                      f"{dict(mesh.shape)}")


def _record_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """config.json (what `saejax.hub.trained.load_run` rebuilds the model from) and the code version,
  from process 0. Written for a fresh run, or once a resume has restored its checkpoint: a resume
  refused for a changed shape must leave the run loadable."""
  if jax.process_index() == 0:
    paths.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    paths.write_atomic(workdir / "code_version.txt", code_version() + "\n")


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike):
  """Run (or resume) training: returns (summary dict, final TrainState, the model graphdef).

  `workdir` is a local directory or a gs:// URL; a scheme Orbax cannot write to, or gs:// without
  its packages, is a `ConfigError` before anything starts (`saejax.paths.resolve`).
  """
  start = time.time()
  # Not pathlib: it would turn "gs://b/run" into a local "./gs:/b/run", lost with the VM.
  workdir = paths.resolve(workdir)
  # A config error is found before the workdir is made: a failed start leaves nothing behind.
  tc = config.train
  mesh_cfg = from_section(sharding.MeshConfig, config.mesh, "mesh")
  loss_cfg = from_section(step_lib.LossConfig, config.loss, "loss")
  optim_cfg = from_section(OptimConfig, config.optim, "optim")
  data_cfg = data_config(config)
  if loss_cfg.bank_size % data_cfg.global_batch_size:
    raise ConfigError(f"config.loss.bank_size={loss_cfg.bank_size} must be a multiple of "
                      f"config.data.global_batch_size={data_cfg.global_batch_size} (the bank is a "
                      "ring of whole batches)")
  distributed.check_padding(data_cfg.padding)
  mesh = sharding.make_mesh(mesh_cfg)
  check_batch_split(data_cfg.global_batch_size, optim_cfg.grad_accum, mesh)
  if optim_cfg.total_steps != tc.steps and jax.process_index() == 0:
    print(f"warning: config.optim.total_steps={optim_cfg.total_steps} (the learning-rate "
          f"schedule's horizon) differs from config.train.steps={tc.steps}: the cosine decay "
          f"ends at step {optim_cfg.total_steps}; set both to change the run's length", flush=True)
  if config.sae.get("enabled", True):
    step_lib.check_band(loss_cfg.st_band, config.sae.num_latents, config.sae.k)
  if config.warmstart.get("init_from", ""):
    if not (config.sae.get("enabled", True) and config.warmstart.steps):
      raise ConfigError(f"config.warmstart.init_from={config.warmstart.init_from!r} is a stage-1 "
                        "head to start from, but this run has no stage 1 (warmstart.steps 0 or "
                        "no SAE)")
    stage1.check(config.warmstart.init_from,
                 stage1.fingerprint(config, head_optim(optim_cfg, config.warmstart)))
  if config.warmstart.get("refit", False) and not config.warmstart.steps:
    raise ConfigError("config.warmstart.refit trains the new head with config.warmstart's "
                      "settings, but config.warmstart.steps is 0: set the head's steps")
  # Fail now, not at the first checkpoint: an unwritable workdir would lose every step trained.
  workdir = checkpoint.check_writable(workdir)
  checkpoint.check_writable(workdir / "checkpoints")

  rngs = nnx.Rngs(tc.seed)
  enc_cfg, model = build_model(config, rngs)
  tokenizer_path = config.model.tokenizer or config.model.init_from
  if not tokenizer_path:
    raise ConfigError("config.model.tokenizer is empty and there is no init_from to take it from")
  tokenizer = load_tokenizer(convert.resolve(tokenizer_path) if not str(tokenizer_path).endswith(
      ".json") else tokenizer_path, vocab_size=enc_cfg.vocab_size)
  make_iter = functools.partial(pipeline.make_iterator, data_cfg, tokenizer,
                                shard_index=jax.process_index(), shard_count=jax.process_count())
  data_iter = make_iter()

  ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", save_every=tc.checkpoint_every,
                                      keep=tc.keep_checkpoints)
  resuming = ckpt.latest_step() is not None
  if not resuming:
    _record_config(workdir, config)
  if not resuming and model.sae is not None and config.sae.get("b_pre_init_batches", 0):
    sample_iter = make_iter()
    # From the global batches: every process must compute the same b_pre.
    samples = [next(sample_iter) for _ in range(config.sae.b_pre_init_batches)]
    init_b_pre_from_data(model, distributed.gather_batches(samples), config.sae.b_pre_init)

  if not resuming and model.sae is not None and config.warmstart.steps:
    stage_one(model, make_iter, config, loss_cfg, optim_cfg, workdir)
    if config.warmstart.get("fresh_stage2", False):
      skip_stage_one_pairs(data_iter, config.warmstart.pairs, data_cfg.global_batch_size)

  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(optim_cfg, params)
  param_sh = sharding.shardings(sharding.param_specs(params, mesh), mesh)
  if (unsharded := sharding.unsharded_warning(params, mesh)) and jax.process_index() == 0:
    logging.warning(unsharded)
  abstract = jax.eval_shape(lambda: init_state(model, tx, loss_cfg.bank_size))
  state_sh = _state_shardings(abstract, param_sh, mesh)

  def placed_state(m: Embedder) -> TrainState:
    """A fresh state of ``m`` placed on the mesh (every process holds the same whole ``m``)."""
    return jax.jit(lambda: init_state(m, tx, loss_cfg.bank_size), out_shardings=state_sh)()

  if resuming:
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sh)
    state = ckpt.restore(target, data_iter)  # falls back past damaged checkpoints, with warnings
    _record_config(workdir, config)  # only now: a refused resume keeps the run's own config
    if jax.process_index() == 0:
      print(f"resumed from checkpoint step {int(state.step)} in {ckpt.directory}", flush=True)
  else:
    state = placed_state(model)

  train_step = jit_train_step(graphdef, tx, loss_cfg, optim_cfg, state_sh, mesh)

  n_latents = config.sae.num_latents if config.sae.get("enabled", True) else 0
  n_encoder = step_lib.non_embedding_params(abstract.params["encoder"])
  peak = step_lib.peak_flops(jax.devices()[0])
  writer = MetricWriter(workdir, tc.steps)
  preempt = distributed.Preemption()
  step = int(state.step)
  compiled = False
  fingerprints = (paths.LineLog(workdir / f"batches.process{jax.process_index()}.jsonl")
                  if tc.get("log_batch_fingerprints") else None)
  # The steps, real tokens and seconds since the last log line (a run's last window, and the first
  # after a resume, is shorter than log_every).
  last, window_steps, window_tokens, window_start = {}, 0, 0, time.time()
  # Texts the token budgets cut (the pipeline flags each), this process's rows: per log window
  # as fractions, every step of this invocation in summary.json.
  cut = {"queries": 0, "documents": 0}
  seen = {"queries": 0, "documents": 0}
  window_cut = dict(cut)
  window_seen = dict(seen)
  streak = None  # the previous step's count of non-finite steps in a row (a device scalar)
  data_ended = False
  try:
    while step < tc.steps:
      try:
        local = next(data_iter)
      except StopIteration:  # config.data.num_epochs ran out before config.train.steps
        data_ended = True
        break
      if fingerprints is not None:  # what the step saw, to prove exact resumption
        fingerprints.write(json.dumps({"step": step + 1, "batch": _fingerprint(local)}))
      batch = _global_batch(local, mesh)
      if not compiled and jax.process_count() > 1:
        # Compile first (this fills jit's cache), then meet: gloo's rendezvous at the step's first
        # collective gives up after 30 s, which a host still compiling can exceed.
        train_step.lower(state, batch, True).compile()
        multihost_utils.sync_global_devices("saejax: train step compiled")
      compiled = True
      state, metrics = train_step(state, batch, (step + 1) % tc.log_every == 0
                                  or step + 1 == tc.steps)  # the steps logged below
      step += 1
      # The streak limit holds every step, read one step late: step t-1's counter is fetched while
      # step t runs, so the host never waits for the step it has just dispatched, and a run stops
      # at most one step past the limit (exactly at it on logging steps, read below).
      if streak is not None:
        _stop_if_diverged(int(streak), step - 1, tc.max_consecutive_skips, ckpt)
      streak = metrics["consecutive_skips"]
      preempt.update(step)  # several processes: stop at the same step
      window_steps += 1
      window_tokens += int(local["q_valid"].sum() + local["d_valid"].sum()) * jax.process_count()
      for kind, flags in (("queries", local["q_truncated"]), ("documents", local["d_truncated"])):
        window_cut[kind] += int(flags.sum())
        window_seen[kind] += int(flags.size)
        cut[kind] += int(flags.sum())
        seen[kind] += int(flags.size)
      if step % tc.log_every == 0 or step == tc.steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.time() - window_start
        texts = local["q_ids"].shape[0] * (1 + local["d_ids"].shape[1]) * jax.process_count()
        metrics["tokens_per_s"] = window_tokens / elapsed
        # Records the pipeline dropped as in-batch repeats so far, over the whole run (checkpointed
        # with the iterator): read from its state, a few integers, on logging steps only.
        metrics["data/dropped_repeats"] = int(data_iter.get_state().get("dropped", 0))
        for kind in cut:
          metrics[f"data/truncated_{kind}"] = window_cut[kind] / max(window_seen[kind], 1)
          window_cut[kind] = window_seen[kind] = 0
        if peak:
          flops = step_lib.flops_per_step(n_encoder, window_tokens, texts * window_steps,
                                          enc_cfg.hidden_size, n_latents)
          metrics["mfu"] = flops / elapsed / (peak * jax.device_count())
        writer.write(step, metrics, elapsed / window_steps)
        last, window_steps, window_tokens, window_start = metrics, 0, 0, time.time()
        _stop_if_diverged(int(metrics["consecutive_skips"]), step, tc.max_consecutive_skips, ckpt)
      if step == tc.steps and model.sae is not None and config.warmstart.get("refit", False):
        # Before the last checkpoint, so the run's model is the refit one; a run killed during the
        # refit resumes from an earlier checkpoint and refits again. The new head starts with
        # fresh optimiser moments, counters and bank (a run extended past here continues so).
        # Every process refits the same head (as in stage 1) on a whole local copy of the final
        # parameters, and the new state is placed on the mesh as the first one was.
        final = nnx.merge(graphdef, jax.tree.map(
            jnp.asarray, multihost_utils.process_allgather(state.params, tiled=True)))
        refit_head(final, make_iter(), config.warmstart, tc.seed, loss_cfg, optim_cfg)
        state = placed_state(final).replace(
            step=state.step, skipped=state.skipped, consecutive_skips=state.consecutive_skips)
      if preempt.requested or step == tc.steps or ckpt.due(step):
        # Steps in a non-finite streak keep the old parameters, but a checkpoint taken there would
        # still be named after a step that did not train: wait for a finite step (preemption and
        # the last step save regardless, so nothing is lost).
        if preempt.requested or step == tc.steps or int(state.consecutive_skips) == 0:
          ckpt.save(step, state, data_iter, force=True)
          # In a bucket the logs are uploaded now and then: at least every step resumed from.
          writer.flush()
          if fingerprints is not None:
            fingerprints.flush()
      if preempt.requested:
        break
    if data_ended:
      print(f"the training data ended (config.data.num_epochs) after step {step} of "
            f"{tc.steps}; stopping there", flush=True)
      if step and ckpt.latest_step() != step:
        ckpt.save(step, state, data_iter, force=True)
  finally:
    try:
      ckpt.wait()  # raises CheckpointError if the last asynchronous write failed
    finally:
      ckpt.close()
      writer.close()
      if fingerprints is not None:
        fingerprints.close()
  summary = {"step": step, "preempted": preempt.requested, "data_ended": data_ended,
             "wall_s": time.time() - start,
             "checkpoints": str(ckpt.directory), "latest_checkpoint": ckpt.latest_step(),
             "last_metrics": last, "best_metrics": writer.best,
             # every step of this invocation, this process's rows (process 0 writes it)
             "truncated": {kind: {"texts": cut[kind], "of": seen[kind]} for kind in cut},
             "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # the host allocator's setting
  if jax.process_index() == 0:
    try:  # a plot must never cost the run its summary
      curves = training_curves(workdir / "metrics.jsonl", workdir / "curves.png")
    except (OSError, SaejaxError) as e:
      logging.warning("training curves not written: %s", e)
      curves = None
    summary["curves"] = str(curves) if curves else None
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary, state, graphdef


def _stop_if_diverged(streak: int, step: int, limit: int, ckpt: checkpoint.TrainCheckpointer):
  """Stop the run when `streak` steps in a row, up to `step`, had a non-finite loss or gradient.

  Raises:
    SaejaxError: the limit is reached; names the last good checkpoint (none is written during a
      streak, so it predates the first bad step).
  """
  if streak > 0 and streak >= limit:
    ckpt.wait()
    raise SaejaxError(
        f"{streak} consecutive steps had a non-finite loss or gradient, up to step {step} "
        f"(limit config.train.max_consecutive_skips={limit}); stopping. "
        f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")


def jit_train_step(graphdef, tx, loss_cfg: step_lib.LossConfig, optim_cfg, state_sh,
                   mesh) -> sharding.OnMesh:
  """`step_lib.train_step` jitted as training runs it: explicit shardings, the state donated,
  ``log`` (whether the step's metrics are read) a traced bool, so one compile serves every step,
  and ``mesh`` ambient (`sharding.OnMesh`). `saejax.train.aot` compiles this same function."""
  return sharding.OnMesh(jax.jit(
      functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, loss_cfg=loss_cfg,
                        optim_cfg=optim_cfg),
      in_shardings=(state_sh, None, None), out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=0, compiler_options=step_lib.compiler_options()), mesh)


def _state_shardings(abstract: TrainState, param_sh, mesh):
  """Params by the rules; optimiser moments like their params; counters and memory bank
  replicated."""
  rep = sharding.replicated(mesh)
  flat_params = {jax.tree_util.keystr(p): s for p, s in
                 jax.tree_util.tree_flatten_with_path(param_sh)[0]}

  def opt_leaf(path, leaf):
    # optax moment trees mirror the param tree: match on the param path suffix.
    key = jax.tree_util.keystr(path)
    for pkey, s in flat_params.items():
      if key.endswith(pkey) and len(leaf.shape) == len(s.spec):
        return s
    return rep

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state)
  counters = None if abstract.since_fired is None else rep
  bank = None if abstract.bank is None else jax.tree.map(lambda _: rep, abstract.bank)
  return TrainState(step=rep, params=param_sh, opt_state=opt_sh, since_fired=counters,
                    fire_rate=counters, skipped=rep, consecutive_skips=rep, bank=bank)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  distributed.initialize()  # before anything touches a device
  config = _CONFIG.value
  if _INIT_FROM.value:
    config.unlock()
    config.model.init_from = _INIT_FROM.value
    config.lock()
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or f"runs/{Path(config_file).stem}"
  summary, state, graphdef = train(config, workdir)
  if summary["preempted"]:
    # The checkpoint is whole: later notices have nothing left to save. Ignored, because Python
    # puts back the default (fatal) SIGTERM action for its own handlers while it shuts down.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  print(f"done: step {summary['step']} in {summary['wall_s'] / 60:.1f} min; checkpoints in "
        f"{summary['checkpoints']} (latest {summary['latest_checkpoint']})" +
        (f"; curves in {summary['curves']}" if summary.get("curves") else ""))
  if config.get("eval") and config.eval.get("enabled") and jax.process_count() > 1:
    print("eval skipped: quickeval runs in one process; evaluate the checkpoint afterwards")
  elif config.get("eval") and config.eval.get("enabled") and not summary["preempted"]:
    from saejax.eval import quickeval
    quickeval.run(config, nnx.merge(graphdef, state.params), workdir)
