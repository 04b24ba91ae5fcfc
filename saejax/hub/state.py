"""The state of a training run, as its checkpoints hold it: `TrainState` and the optimiser.

A checkpoint of a run is one `TrainState` (parameters, optimiser moments, dead-latent counters,
skip counters); the optimiser's moments take the structure `make_optimizer` gives them. Training
(`saejax.train.step`) advances this state and loading a run (`saejax.hub.trained`) reads it back,
so both take its definition from here and loading never needs the trainer.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from saejax.errors import ConfigError
from saejax.sae import memory
from saejax.sae.embedder import Embedder


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with warm-up + cosine decay, global-norm clipping, per-group learning rates."""
  lr_encoder: float = 2e-5
  lr_sae: float = 1e-4
  warmup_steps: int = 100
  total_steps: int = 10_000        # warm-up counts inside (optax.warmup_cosine_decay_schedule)
  end_lr_fraction: float = 0.1
  weight_decay_encoder: float = 0.01
  weight_decay_sae: float = 0.0    # OpenAI's TopK SAEs train without weight decay
  b1: float = 0.9
  b2: float = 0.999
  clip_norm: float = 1.0
  freeze_encoder: bool = False     # CSR-style ablation: train the SAE on a frozen backbone
  grad_accum: int = 1              # micro-batches per step (in-batch negatives per micro-batch)

  def __post_init__(self):
    if not 0 <= self.warmup_steps < self.total_steps:
      raise ConfigError(f"config.optim: warmup_steps={self.warmup_steps} must be >= 0 and below "
                        f"total_steps={self.total_steps} (the warm-up counts inside the total)")
    if self.grad_accum < 1:
      raise ConfigError(f"config.optim.grad_accum={self.grad_accum} must be >= 1")
    if not self.clip_norm > 0:  # 0 would stop training, a negative norm reverse every gradient
      raise ConfigError(f"config.optim.clip_norm={self.clip_norm} must be > 0")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; checkpointed whole."""
  step: jax.Array                  # int32 scalar
  params: nnx.State
  opt_state: Any
  since_fired: jax.Array | None    # int32 [S]: texts since each latent last fired (None: no SAE)
  fire_rate: jax.Array | None      # float32 [S]: EMA of each latent's firing rate per text
  skipped: jax.Array               # int32: steps skipped for non-finite loss/grads, in total
  consecutive_skips: jax.Array     # int32: skipped steps in a row (the loop stops past a limit)
  bank: dict | None = None         # recent documents as extra negatives (`saejax.sae.memory`)


def param_group(path) -> str:
  """The optimiser group of a parameter path: "encoder" or "sae"."""
  return "encoder" if path[0] == "encoder" else "sae"


def schedule(cfg: OptimConfig, peak: float) -> optax.Schedule:
  """Linear warm-up from 0 to `peak`, then cosine decay to `peak * end_lr_fraction`."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.total_steps,
                                            peak * cfg.end_lr_fraction)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` as one scalar multiply: g * min(1, max_norm / |g|).

  optax selects between each gradient and its rescaled copy, and XLA:CPU turns that select into a
  second pass over every gradient: the clip + AdamW update of MiniLM's parameters takes 0.55-0.67x
  the time in this form (benchmarks/bench_clip.py; RESULTS.md "Train step"). optax's own comment
  (b/163995078) names this form as the faster one. The state is optax's (empty), so checkpoints
  are unchanged; the result differs from optax's by rounding only. A caller that already has |g|
  passes it as ``grad_norm`` (optax's extra args, which `optax.chain` forwards), saving a pass over
  every gradient: `step.train_step` computes it outside its `lax.cond`, and XLA does not share a
  value across the branch."""

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    scale = jnp.minimum(1.0, max_norm / g_norm)  # |g| = 0: max_norm / 0 = inf -> 1
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(cfg: OptimConfig, params: nnx.State) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW per group (encoder / sae), or freeze the encoder."""
  enc = (optax.set_to_zero() if cfg.freeze_encoder else
         optax.adamw(schedule(cfg, cfg.lr_encoder), cfg.b1, cfg.b2,
                     weight_decay=cfg.weight_decay_encoder))
  sae = optax.adamw(schedule(cfg, cfg.lr_sae), cfg.b1, cfg.b2, weight_decay=cfg.weight_decay_sae)
  labels = nnx.map_state(lambda path, _: param_group(path), params)
  return optax.chain(clip_by_global_norm(cfg.clip_norm),
                     optax.partition({"encoder": enc, "sae": sae}, labels))


def learning_rates(cfg: OptimConfig, step) -> dict[str, jax.Array]:
  """The learning rates `make_optimizer` applies at `step` (for logging)."""
  return {"lr_encoder": 0.0 * step if cfg.freeze_encoder else schedule(cfg, cfg.lr_encoder)(step),
          "lr_sae": schedule(cfg, cfg.lr_sae)(step)}


def init_state(model: Embedder, tx: optax.GradientTransformation, bank_size: int = 0
               ) -> TrainState:
  """Step 0 of a run; `bank_size` > 0 adds an empty memory bank of that many documents (the
  config's ``loss.bank_size``)."""
  params = nnx.state(model, nnx.Param)
  s = model.sae.config.num_latents if model.sae is not None else None
  bank = None
  if bank_size:
    width = model.encoder.cfg.hidden_size
    bank = memory.init_bank(bank_size, width, None if s is None else model.sae.config.k)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    since_fired=None if s is None else jnp.zeros((s,), jnp.int32),
                    fire_rate=None if s is None else jnp.zeros((s,), jnp.float32),
                    skipped=jnp.zeros((), jnp.int32), consecutive_skips=jnp.zeros((), jnp.int32),
                    bank=bank)
