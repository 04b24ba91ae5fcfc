"""Training the SAE head on fixed (cached) embeddings: the warm start and the recipe sweep.

End-to-end training pays for an encoder forward and backward every step; the SAE head alone, on
embeddings computed once by the frozen encoder, trains in seconds per thousand steps. Two users:

  * `saejax.train` warm-starts the SAE this way before unfreezing the encoder (stage-wise
    training: ``config.warmstart``), so the encoder never trains through a random dictionary;
  * `benchmarks/sweep.py` compares recipes (similarity, temperature, lr, dead-latent window,
    distillation, ...) on cached embeddings of the shared data.

Both run `saejax.train.step.train_step` with `head_loss`, i.e. the same optimiser, SAE invariants,
dead-latent counters and `saejax.train.step.objective` as end-to-end training; only v is read from
the batch instead of being computed by the encoder.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float, Int

from saejax.errors import ConfigError
from saejax.hub.state import OptimConfig, TrainState, init_state, make_optimizer
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder, sae_output
from saejax.train import resample as resample_lib
from saejax.train import step as step_lib

RESAMPLE_SAMPLE = 8192  # inputs scored per resampling; the worst reconstructed seed dead latents


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
  """How long and on what batches the head trains.

  Attributes:
    steps: optimiser steps.
    batch_size: query-document pairs per step (in-batch negatives: batch_size - 1 per query).
    seed: batch order (and the inputs resampling draws).
    resample_every: every this many steps, dead latents (silent for `SAEConfig.dead_after_tokens`
      texts, as AuxK counts them) are re-initialised from badly reconstructed inputs
      (`saejax.train.resample`; 0: never).
    resample_until: no resampling after this fraction of the steps (the last ones settle).
    groups_per_batch: with groups (`batches`), each batch is this many equal parts, each drawn
      from one group (1: the whole batch from one group).
  """
  steps: int = 2000
  batch_size: int = 256
  seed: int = 0
  resample_every: int = 0
  resample_until: float = 0.5
  groups_per_batch: int = 1

  def __post_init__(self):
    if self.steps < 1 or self.batch_size < 2:
      raise ConfigError(f"HeadTrainConfig: steps={self.steps} must be >= 1 and "
                        f"batch_size={self.batch_size} >= 2 (InfoNCE needs a negative)")
    if self.resample_every < 0 or not 0 <= self.resample_until <= 1:
      raise ConfigError(f"HeadTrainConfig: resample_every={self.resample_every} must be >= 0 and "
                        f"resample_until={self.resample_until} in [0, 1]")
    if self.groups_per_batch < 1 or self.batch_size % self.groups_per_batch:
      raise ConfigError(f"HeadTrainConfig: groups_per_batch={self.groups_per_batch} must be >= 1 "
                        f"and divide batch_size={self.batch_size}")


def head_loss(model: Embedder, batch: dict, since_fired, step, cfg: step_lib.LossConfig,
              bank=None):
  """`step.objective` on cached embeddings: ``batch["q_v"]`` [B, D], ``batch["d_v"]`` [B, 1+H, D].
  No memory bank: its entries are keyed by token ids, which cached embeddings do not have."""
  if bank is not None:
    raise ConfigError("head training on cached embeddings has no memory bank (loss.bank_size)")
  b, n_docs, d = batch["d_v"].shape
  q = sae_output(model.sae, batch["q_v"])
  docs = sae_output(model.sae, batch["d_v"].reshape(b * n_docs, d))
  return step_lib.objective(model.sae, q, docs, since_fired, step, cfg)


def batches(n: int, cfg: HeadTrainConfig, groups: Int[np.ndarray, "N"] | None = None):
  """Row indices of each step: shuffled epochs, the tail of an epoch dropped (fixed shapes).

  With ``groups`` (each pair's source, or its topic: `topic_groups`), every batch is
  ``cfg.groups_per_batch`` parts of ``batch_size / groups_per_batch`` rows, each part from one
  group: distinct groups, picked with probability proportional to their sizes, each read in a
  shuffled pass over its rows. Groups with fewer rows than a part are pooled into one mixed group.
  """
  if n < cfg.batch_size:
    raise ConfigError(f"head training: {n} pairs are fewer than batch_size={cfg.batch_size}")
  rng = np.random.default_rng(cfg.seed)
  if groups is not None:
    if np.shape(groups) != (n,):
      raise ConfigError(f"head training: groups of shape {np.shape(groups)} for {n} pairs")
    yield from _group_batches(np.asarray(groups), cfg, rng)
    return
  per_epoch = n // cfg.batch_size
  order = None
  for i in range(cfg.steps):
    if i % per_epoch == 0:
      order = rng.permutation(n)
    j = i % per_epoch
    yield order[j * cfg.batch_size:(j + 1) * cfg.batch_size]


def _group_batches(groups: np.ndarray, cfg: HeadTrainConfig, rng: np.random.Generator):
  part = cfg.batch_size // cfg.groups_per_batch
  ids, counts = np.unique(groups, return_counts=True)
  small = np.isin(groups, ids[counts < part])
  pools = [np.flatnonzero((groups == g) & ~small) for g in ids[counts >= part]]
  pools += [np.flatnonzero(small)] if small.sum() >= part else []
  if len(pools) < cfg.groups_per_batch:
    raise ConfigError(f"head training: {len(pools)} groups of >= {part} pairs, fewer than "
                      f"groups_per_batch={cfg.groups_per_batch}")
  sizes = np.asarray([len(p) for p in pools], float)
  queues = [rng.permutation(p) for p in pools]
  for _ in range(cfg.steps):
    rows = []
    for g in rng.choice(len(pools), cfg.groups_per_batch, replace=False, p=sizes / sizes.sum()):
      if len(queues[g]) < part:  # a new pass over the group (its tail dropped)
        queues[g] = rng.permutation(pools[g])
      rows.append(queues[g][:part])
      queues[g] = queues[g][part:]
    yield np.concatenate(rows)


def topic_groups(q_v: Float[np.ndarray, "N D"], d_v: Float[np.ndarray, "N D"], topics: int,
                 seed: int = 0) -> Int[np.ndarray, "N"]:
  """Each pair's topic: k-means (scikit-learn) with ``topics`` clusters over the pairs' unit query
  and unit document embeddings side by side. As head-training groups (topic-aware sampling,
  Hofstaetter et al. 2021, TAS-B) they make in-batch negatives near neighbours: mean nDCG@10 over
  SciFact / Cranfield / Debian dev at k = 64 +0.009 over mixed batches in the sweep, +0.0075 for
  the quality benchmark's frozen arm (benchmarks/RESULTS.md, session 12)."""
  from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel
  if not 1 <= topics <= len(q_v):
    raise ConfigError(f"head training: topics={topics} must be in [1, {len(q_v)} pairs]")
  x = np.concatenate([np.asarray(q_v, np.float64), np.asarray(d_v, np.float64)], 1)
  half = q_v.shape[1]
  for part in (x[:, :half], x[:, half:]):  # each side to unit length (views into x)
    part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
  return KMeans(topics, n_init=1, random_state=seed).fit_predict(x)


def train_head(sae: sae_lib.SAE, q_v: Float[np.ndarray, "N D"], d_v: Float[np.ndarray, "N D"],
               loss_cfg: step_lib.LossConfig, optim_cfg: OptimConfig,
               cfg: HeadTrainConfig, *, groups: Int[np.ndarray, "N"] | None = None,
               log_every: int = 0, log=print) -> tuple[sae_lib.SAE, TrainState, list[dict]]:
  """Train ``sae`` on (query, positive) embedding pairs; returns the trained SAE (a new module),
  the final TrainState (dead-latent counters included) and the logged metrics. ``groups``: each
  pair's group (its source or topic), to draw every batch from a few groups (`batches`).

  ``optim_cfg.lr_sae`` and its schedule apply (``total_steps`` should be ``cfg.steps``). b_pre is
  set from the documents' geometric median / mean first, as `saejax.train` does.
  """
  if q_v.shape != d_v.shape or q_v.ndim != 2 or q_v.shape[1] != sae.config.d_model:
    raise ConfigError(f"head training: query {q_v.shape} and document {d_v.shape} embeddings must "
                      f"both be [N, {sae.config.d_model}]")
  sample = d_v[np.random.default_rng(cfg.seed).permutation(len(d_v))[:4096]]
  sae.b_pre.set_value(sae_lib.init_b_pre(jnp.asarray(sample), sae.config.b_pre_init))
  # v is constant here, so the detached copy `objective` makes for the reconstruction, FLOPS and
  # band terms (to keep their gradients out of an encoder) would only repeat the SAE's biggest
  # matmul.
  loss_cfg = dataclasses.replace(loss_cfg, recon_to_encoder=True, flops_to_encoder=True,
                                 band_to_encoder=True)
  model = Embedder(None, sae)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(optim_cfg, params)
  state = init_state(model, tx)
  train_step = functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                 loss_cfg=loss_cfg, optim_cfg=optim_cfg, loss_fn=head_loss)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, q_all, d_all, rows, log):  # the batch is gathered on device, inside the step
    return train_step(state, {"q_v": q_all[rows], "d_v": d_all[rows][:, None]}, log)

  @functools.partial(jax.jit, donate_argnums=0)
  def resample(state, pool, key):
    # Dead as AuxK and the curves count it: silent for the SAE's dead_after_tokens texts.
    dead = sae_lib.dead_mask(state.since_fired, sae.config.dead_after_tokens)
    sample_key, key = jax.random.split(key)
    sample = pool[jax.random.choice(sample_key, pool.shape[0], (RESAMPLE_SAMPLE,))]
    return resample_lib.resample_dead(state, graphdef, sample, dead, key)

  q_all, d_all = jnp.asarray(q_v, jnp.float32), jnp.asarray(d_v, jnp.float32)
  key = jax.random.key(cfg.seed)
  history = []
  for i, rows in enumerate(batches(len(q_v), cfg, groups)):
    logged = bool(log_every) and ((i + 1) % log_every == 0 or i + 1 == cfg.steps)
    state, metrics = step(state, q_all, d_all, jnp.asarray(rows), logged)
    if cfg.resample_every and (i + 1) % cfg.resample_every == 0 and (
        i + 1 <= cfg.resample_until * cfg.steps):
      key, sub = jax.random.split(key)
      state, resampled = resample(state, jnp.concatenate([q_all, d_all]), sub)
      if log_every:
        log(f"head step {i + 1}: resampled {int(resampled['resampled'])} dead latents")
    if logged:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      history.append({"step": i + 1, **m})
      log(f"head step {i + 1}/{cfg.steps}: loss {m['loss']:.4f} nce {m['info_nce']:.3f} "
          f"fvu {m['fvu']:.3f} dead {100 * m['dead_fraction_window']:.1f}% "
          f"hot {100 * m['hot_fraction']:.2f}%")
  return nnx.merge(graphdef, state.params).sae, state, history
