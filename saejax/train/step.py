"""The training step: a pure function `train_step(state, batch) -> (state, metrics)`.

One step embeds every query, positive and hard negative with the encoder, encodes all of them with
the TopK SAE, and sums the weighted losses (`objective`; each term a pure function in
`saejax.sae.losses`). ``e(z)`` is the retrieval embedding: the code scaled to unit norm when
`SAEConfig.normalize_codes` (cosine), else the raw code:

  total = w_contrastive * InfoNCE(e(z_q), e(z_pos), e(z_neg))   in-batch + hard (+ bank) negatives
        + w_distill * KL(teacher cos(v) || student e(z))        in-batch distillation from v
        + w_dense_contrastive * InfoNCE(cos of v)               trains the encoder as a dense model
        + w_fvu * FVU(v, v_hat) [+ w_multi_k * FVU(v, v_hat_{m k})] reconstruction (Gao et al. 2024)
        + w_auxk * AuxK(dead latents -> residual)                  revives dead latents
        + flops_weight(step) * (FLOPS(e(z_q)) + FLOPS(e(z_d)))     SPLADE-style sparsity of use
        + w_spread_out * GOR(e(z_q), e(z_pos))                     optional

With ``LossConfig.bank_size`` both InfoNCE terms also rank the last `bank_size` positives of earlier
steps (`saejax.sae.memory`, checkpointed in `TrainState.bank`). The reconstruction terms read a
detached v unless `LossConfig.recon_to_encoder`: the encoder is then shaped by the retrieval terms
only, and the SAE follows it. Without `LossConfig.flops_to_encoder` the FLOPS terms are computed
from that detached v too: they spread the SAE's latents without moving the encoder; likewise the
straight-through band (`LossConfig.st_band`) without `LossConfig.band_to_encoder`.

Then the SAE invariants (sparsify / OpenAI): the decoder gradient's component parallel to each
decoder row is removed before the optimiser, and decoder rows are renormalised after it. The
per-latent "texts since fired" counter is explicit TrainState, updated from the global batch (under
jit the reduction over batch shards is XLA's), never mutated inside the forward pass. A step whose
loss or gradients are not finite leaves parameters and optimiser state untouched and is counted.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from saejax.errors import ConfigError
from saejax.hub.state import OptimConfig, TrainState, learning_rates, param_group
from saejax.sae import losses, memory, topk as sae_lib
from saejax.sae.embedder import Embedder, Output, sae_output


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights; every coefficient lives here, none in the loss code. `saejax.train.recipe`
  states the same defaults (a test keeps the two equal)."""
  temperature: float = 0.05        # InfoNCE tau on code similarities (cosine: SAEConfig.normalize_codes)
  w_contrastive: float = 1.0
  w_fvu: float = 1.0
  w_multi_k: float = 0.0           # Gao et al. sec 5.3 use 1/8 with multi_k_factor 4
  multi_k_factor: int = 4
  w_auxk: float = 1 / 32           # Gao et al. appendix A.2
  w_flops_q: float = 0.0
  w_flops_d: float = 0.0
  flops_warmup_steps: int = 0      # quadratic ramp of the FLOPS weights (SPLADE)
  w_spread_out: float = 0.0
  w_distill: float = 0.0           # KL(dense teacher || sparse student) over in-batch candidates
  distill_temperature: float = 0.05  # the teacher's tau on cosine of the pooled embeddings v
  w_dense_contrastive: float = 0.0   # InfoNCE on cosine of v itself (end to end: trains the encoder)
  recon_to_encoder: bool = False   # let FVU / multi-k / AuxK gradients reach the encoder
  flops_to_encoder: bool = True    # let FLOPS gradients reach the encoder (False: the SAE only)
  bank_size: int = 0               # XBM: the last bank_size positives (detached) as more negatives
  st_band: int = 0                 # the next st_band latents past TopK get the retrieval gradient
  band_to_encoder: bool = True     # let the band's gradients reach the encoder (False: the SAE only)

  def __post_init__(self):
    if self.bank_size < 0:
      raise ConfigError(f"config.loss.bank_size={self.bank_size} must be >= 0 (0: no memory bank)")
    if self.st_band < 0:
      raise ConfigError(f"config.loss.st_band={self.st_band} must be >= 0 (0: off)")


def check_band(band: int, num_latents: int, k: int) -> None:
  """`loss.st_band` must fit in the latents outside a code (checked at `saejax.train` start-up)."""
  if band > num_latents - k:
    raise ConfigError(f"config.loss.st_band={band} is more than the {num_latents - k} latents "
                      f"outside a code of k={k} of num_latents={num_latents}")


def boundary_band(out: Output, band: int, num_latents: int, normalize: bool) -> jax.Array:
  """Zero in the forward pass; in the backward pass the ``band`` latents ranked just past the TopK
  (positive pre-activations only) receive the retrieval terms' gradient as if they were in the
  code at value 0 (a straight-through estimator). TopK alone gives a latent outside the code no
  retrieval signal, so a latent that would match a query's never learns to enter a document's
  code; this band lets the ones at the boundary. ``normalize``: each band entry is its
  pre-activation over the code's norm |values|, differentiated in both (scale-free: d(loss) along
  a text's own pre-activations is zero, as for the code alone). The band is the top ``band`` of
  the pre-activations with the code's own latents masked out: one TopK of ``k + band`` instead
  doubled the step time of head training (S = 4,096, 256 pairs: 0.51 -> 0.97 s; this form 0.57 s)."""
  check_band(band, num_latents, out.code.indices.shape[-1])
  rest = jax.vmap(lambda pre, code: pre.at[code].set(-jnp.inf))(out.pre, out.code.indices)
  values, indices, _ = sae_lib.topk_relu(rest, band)  # ReLU: a latent with pre <= 0 gets nothing
  if normalize:
    # Relative to the code's norm, as `sae_lib.unit_norm` scales the code's own values, and with
    # the norm's gradient: a text's code is then scale-free in the backward pass too. With the norm
    # held fixed the band pushed every pre-activation up, so the encoder grew |v| (end to end at
    # 600 stage-2 steps: |v| 4.4 -> 9.4 after step 270, the head's FVU 0.2 -> 2.2).
    sq = jnp.sum(jnp.square(out.code.values.astype(jnp.float32)), -1, keepdims=True)
    values = values * jax.lax.rsqrt(jnp.maximum(sq, 1e-12))
  ghost = values - jax.lax.stop_gradient(values)
  return sae_lib.densify(ghost, indices, num_latents)


def text_hashes(batch: dict) -> tuple[jax.Array, jax.Array]:
  """Hashes of each query's text and of each query's positive (`memory.text_hash`)."""
  pos = memory.text_hash(batch["d_ids"][:, 0], batch["d_valid"][:, 0])
  return memory.text_hash(batch["q_ids"], batch["q_valid"]), pos


def dense_loss(model: Embedder, batch: dict, cfg: LossConfig, bank: memory.Bank | None = None
               ) -> tuple[jax.Array, tuple]:
  """The dense ablation (no SAE): InfoNCE on L2-normalised pooled embeddings (cosine / tau), with
  the memory bank's documents as more negatives when there is one."""
  b, n_docs, t_d = batch["d_ids"].shape
  q = sae_lib.unit_norm(model.dense(batch["q_ids"], batch["q_valid"]))
  d = sae_lib.unit_norm(model.dense(batch["d_ids"].reshape(b * n_docs, t_d),
                                    batch["d_valid"].reshape(b * n_docs, t_d))).reshape(b, n_docs, -1)
  extra, entries = None, None
  if bank is not None:
    q_hash, pos_hash = text_hashes(batch)
    extra = memory.masked(q @ bank["v"].T, memory.candidate_mask(bank, q_hash, pos_hash))
    entries = {"v": jax.lax.stop_gradient(d[:, 0]), "text_hash": pos_hash}
  loss, metrics = losses.info_nce(q, d[:, 0], d[:, 1:], cfg.temperature, extra)
  metrics = {**metrics, "weighted/contrastive": cfg.w_contrastive * loss,
             "loss": cfg.w_contrastive * loss}
  no_codes = (jnp.zeros((0, 1)), jnp.zeros((0, 1), jnp.int32))
  return cfg.w_contrastive * loss, (metrics, no_codes, entries)


def objective(sae: sae_lib.SAE, q: Output, d: Output, since_fired: jax.Array, step: jax.Array,
              cfg: LossConfig, bank: memory.Bank | None = None,
              hashes: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, tuple]:
  """Total loss and every component from the SAE outputs of B queries and B*(1+H) documents.

  ``d`` holds each query's positive then its H hard negatives (row ``i*(1+H) + j``). The same
  function trains end to end (`compute_loss`: v from the encoder) and on cached embeddings
  (`saejax.train.headtrain`: v fixed). Pure: reads `since_fired`, writes nothing.

  Contrastive and distillation scores use the retrieval embedding (the unit-normalised code when
  ``sae.config.normalize_codes``), the quantity the index ranks by. The reconstruction terms see
  the raw code; unless ``cfg.recon_to_encoder`` they are computed from a stop-gradient copy of v,
  so the encoder is shaped by the retrieval terms only and the SAE follows it.

  With a memory ``bank`` (and the ``hashes`` of each query's text and its positive's), both InfoNCE
  terms also rank the bank's documents, and the aux output carries this batch's positives as the
  bank's next entries (else None). Returns ``(total, (metrics, codes, entries))``.
  """
  b, s = q.v.shape[0], sae.config.num_latents
  n_docs = d.v.shape[0] // b
  embed = (lambda c: sae_lib.unit_norm(c.values)) if sae.config.normalize_codes else (
      lambda c: c.values)
  z_q = sae_lib.densify(embed(q.code), q.code.indices, s)
  z_d = sae_lib.densify(embed(d.code), d.code.indices, s)
  f_q, f_d = z_q, z_d  # FLOPS reads the codes themselves, never the boundary band
  v = jnp.concatenate([q.v, d.v])
  # The same TopK code from a detached v, for the terms whose gradients reach the SAE, not the
  # encoder (the forward values are the same as from v).
  held = None
  band_held = cfg.st_band and not cfg.band_to_encoder
  if band_held or not (cfg.recon_to_encoder and cfg.flops_to_encoder):
    held = sae_output(sae, jax.lax.stop_gradient(v))
  if cfg.st_band:
    norm = sae.config.normalize_codes
    band_q, band_d = (jax.tree.map(lambda x: x[:b], held), jax.tree.map(lambda x: x[b:], held)
                      ) if band_held else (q, d)
    z_q = z_q + boundary_band(band_q, cfg.st_band, s, norm)
    z_d = z_d + boundary_band(band_d, cfg.st_band, s, norm)
  z_d3 = z_d.reshape(b, n_docs, s)
  metrics = {}

  def add(name, weight, loss_and_metrics, prefix=""):
    loss, m = loss_and_metrics
    metrics.update({prefix + k: v for k, v in m.items()})
    metrics[f"weighted/{name}"] = weight * loss
    return weight * loss

  v_q, v_d = sae_lib.unit_norm(q.v), sae_lib.unit_norm(d.v).reshape(b, n_docs, -1)
  bank_codes = bank_dense = entries = None
  if bank is not None:
    q_hash, pos_hash = hashes
    mask = memory.candidate_mask(bank, q_hash, pos_hash)
    bank_codes = memory.masked(memory.sparse_scores(z_q, bank["values"], bank["indices"]), mask)
    bank_dense = memory.masked(v_q @ bank["v"].T, mask)
    k = q.code.values.shape[-1]
    entries = {"v": jax.lax.stop_gradient(v_d[:, 0]), "text_hash": pos_hash,
               "values": jax.lax.stop_gradient(embed(d.code).reshape(b, n_docs, k)[:, 0]),
               "indices": d.code.indices.reshape(b, n_docs, k)[:, 0]}
  total = add("contrastive", cfg.w_contrastive,
              losses.info_nce(z_q, z_d3[:, 0], z_d3[:, 1:], cfg.temperature, bank_codes))
  if cfg.w_distill:
    total += add("distill", cfg.w_distill, losses.distill_kl(
        z_q, z_d3[:, 0], z_d3[:, 1:], jax.lax.stop_gradient(v_q),
        jax.lax.stop_gradient(v_d[:, 0]), jax.lax.stop_gradient(v_d[:, 1:]),
        cfg.temperature, cfg.distill_temperature))
  if cfg.w_dense_contrastive:
    total += add("dense_contrastive", cfg.w_dense_contrastive,
                 losses.info_nce(v_q, v_d[:, 0], v_d[:, 1:], cfg.temperature, bank_dense),
                 prefix="dense/")

  if cfg.recon_to_encoder:
    pre, v_hat = jnp.concatenate([q.pre, d.pre]), jnp.concatenate([q.v_hat, d.v_hat])
  else:
    v = jax.lax.stop_gradient(v)
    pre, v_hat = held.pre, held.v_hat
  total += add("fvu", cfg.w_fvu, losses.fvu(v, v_hat))
  if cfg.w_multi_k:
    k_big = min(sae.config.k * cfg.multi_k_factor, s)
    big = sae_lib.topk_relu(pre, k_big)
    total += add("multi_k", cfg.w_multi_k,
                 losses.fvu(v, sae.decode(big.values, big.indices)), prefix="multi_k/")
  dead = sae_lib.dead_mask(since_fired, sae.config.dead_after_tokens)
  aux_values, aux_indices = sae_lib.auxk(pre, dead, sae.config.k_aux)
  aux_recon = sae_lib.decode_sparse(aux_values, aux_indices, sae.w_dec[...])
  total += add("auxk", cfg.w_auxk, losses.auxk_loss(v - v_hat, aux_recon, dead))
  flops_w = lambda w: losses.flops_weight(step, w, cfg.flops_warmup_steps)  # noqa: E731
  if not cfg.flops_to_encoder:
    f_q, f_d = jnp.split(sae_lib.densify(embed(held.code), held.code.indices, s), [b])
  total += add("flops_q", flops_w(cfg.w_flops_q), losses.flops(f_q), prefix="q/")
  total += add("flops_d", flops_w(cfg.w_flops_d), losses.flops(f_d), prefix="d/")
  if cfg.w_spread_out:
    total += add("spread_out", cfg.w_spread_out, losses.spread_out(z_q, z_d3[:, 0]))
  metrics["loss"] = total
  metrics["v_norm"] = jnp.mean(jnp.linalg.norm(v.astype(jnp.float32), axis=-1))
  codes = (jnp.concatenate([q.code.values, d.code.values]),
           jnp.concatenate([q.code.indices, d.code.indices]))
  return total, (metrics, codes, entries)


def compute_loss(model: Embedder, batch: dict, since_fired: jax.Array, step: jax.Array,
                 cfg: LossConfig, bank: memory.Bank | None = None) -> tuple[jax.Array, tuple]:
  """Total loss and every component for one (micro-)batch of token ids (see `objective`)."""
  if model.sae is None:
    return dense_loss(model, batch, cfg, bank)
  b, n_docs, t_d = batch["d_ids"].shape
  q = model(batch["q_ids"], batch["q_valid"])
  d = model(batch["d_ids"].reshape(b * n_docs, t_d), batch["d_valid"].reshape(b * n_docs, t_d))
  return objective(model.sae, q, d, since_fired, step, cfg, bank,
                   None if bank is None else text_hashes(batch))


def _project_decoder_grad(grads: nnx.State, params: nnx.State) -> nnx.State:
  if "sae" not in grads:
    return grads
  g = grads["sae"]["w_dec"]
  g.set_value(sae_lib.project_out_parallel_grad(params["sae"]["w_dec"].get_value(), g.get_value()))
  return grads


def _tree_norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def _when(log, fn, *args):
  """``fn(*args)`` where ``log`` holds, NaNs of the same shapes where it does not.

  Metrics read only on logging steps (norms over every parameter, latent-health percentiles) are
  full passes over the parameters; `lax.cond` runs one branch, so other steps skip them.
  """
  def nans(*a):
    return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), jax.eval_shape(fn, *a))
  if isinstance(log, bool):  # a Python constant: no branch to trace
    return fn(*args) if log else nans(*args)
  return jax.lax.cond(log, fn, nans, *args)


def compiler_options(platform: str | None = None) -> dict | None:
  """XLA options `train_step` is compiled with on `platform` (default: this process's backend).

  On GPU, XLA's DotMerger runs GEMMs that share a weight (each layer's query pass and document
  pass) as one GEMM over a fresh concatenation of both inputs; the copies cost more than the merge
  gains: ModernBERT-base step on an H200 97.3 -> 92.4 ms with it off (RESULTS.md "GPU", session
  34). Other platforms: XLA's defaults.
  """
  platform = platform or jax.default_backend()
  return {"xla_gpu_dot_merger_threshold_mb": 0} if platform in ("gpu", "cuda") else None


def train_step(state: TrainState, batch: dict, log: bool | jax.Array = True, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: LossConfig,
               optim_cfg: OptimConfig, fire_rate_decay: float = 0.99, loss_fn=None
               ) -> tuple[TrainState, dict]:
  """One optimiser step on a global batch (jit it with shardings; see `saejax.train`).

  ``log``: whether this step's metrics will be read. Where it is false (a traced bool: one
  compiled step serves both), ``param_norm``, ``update_norm`` and the latent-health curves are NaN
  and cost nothing; everything else (loss terms, ``grad_norm``, counters) is computed every step.

  ``loss_fn(model, batch, since_fired, step, loss_cfg, bank) -> (loss, (metrics, codes, entries))``
  defaults to `compute_loss` (token ids through the encoder); `saejax.train.headtrain` passes one
  that reads cached embeddings, so head training shares this step's optimiser, SAE invariants and
  counters.
  """
  batch_loss = compute_loss if loss_fn is None else loss_fn

  def loss_of(params, micro):
    if optim_cfg.freeze_encoder:
      # CSR-style: no gradient reaches the encoder, so XLA drops its whole backward pass (the
      # optimiser's set_to_zero alone would still pay for computing it).
      params = nnx.map_state(
          lambda path, x: jax.lax.stop_gradient(x) if param_group(path) == "encoder" else x, params)
    model = nnx.merge(graphdef, params)
    return batch_loss(model, micro, state.since_fired, state.step, loss_cfg, state.bank)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)
  accum = optim_cfg.grad_accum
  if accum == 1:
    (loss, (metrics, codes, entries)), grads = grad_fn(state.params, batch)
  else:  # scan over micro-batches: memory of one micro-batch, gradients summed in fp32
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, mb):
      (loss, (metrics, codes, entries)), grads = grad_fn(state.params, mb)
      return jax.tree.map(jnp.add, carry, grads), (loss, metrics, codes, entries)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (loss, metrics, codes, entries) = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g: g / accum, grads)
    loss, metrics = loss.mean(), jax.tree.map(jnp.mean, metrics)
    codes = jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), codes)
    entries = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), entries)

  grads = _project_decoder_grad(grads, state.params)
  grad_norm = _tree_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(params, opt_state):
    # The clip (`state.clip_by_global_norm`) takes |g| instead of reading every gradient again.
    updates, opt_state = optax.with_extra_args_support(tx).update(grads, opt_state, params,
                                                                  grad_norm=grad_norm)
    params = optax.apply_updates(params, updates)
    if "sae" in params:
      w_dec = params["sae"]["w_dec"]
      w_dec.set_value(sae_lib.normalize_decoder(w_dec.get_value()))
    return params, opt_state, _when(log, _tree_norm, updates)

  def skip(params, opt_state):
    return params, opt_state, jnp.full((), jnp.nan, grad_norm.dtype)

  # A branch, not a select over both results: a select would read and write every parameter and
  # moment once more each step (measured: ~70 ms of a 340 ms one-core MiniLM step's fixed cost).
  params, opt_state, update_norm = jax.lax.cond(finite, update, skip, state.params,
                                                state.opt_state)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731

  values, indices = codes
  n_texts = max(values.shape[0], 1)
  since_fired, fire_rate, sparse_metrics = state.since_fired, state.fire_rate, {}
  if since_fired is not None:
    hits = jnp.zeros(since_fired.shape, jnp.float32).at[indices.reshape(-1)].add(
        (values > 0).reshape(-1).astype(jnp.float32))
    since_fired = jnp.where(finite, sae_lib.update_since_fired(since_fired, hits > 0, n_texts),
                            since_fired)
    fire_rate = jnp.where(finite, fire_rate_decay * fire_rate
                          + (1 - fire_rate_decay) * hits / n_texts, fire_rate)
    k = nnx.merge(graphdef, params).sae.config.k
    # The average starts at 0: after n finite steps it holds (1 - decay^n) of the rates (Adam's
    # bias correction undoes that), or hot% read 0 for the first ~100 steps of a collapse.
    n_seen = (state.step + 1 - state.skipped - (~finite)).astype(jnp.float32)
    seen = 1 - jnp.power(jnp.float32(fire_rate_decay), n_seen)
    rates = jnp.where(n_seen > 0, fire_rate / jnp.maximum(seen, 1e-12), fire_rate)
    sparse_metrics = {"l0": jnp.sum(values > 0).astype(jnp.float32) / n_texts,
                      **_when(log, functools.partial(latent_health, k=k), params["sae"],
                              since_fired, rates)}
  bank = state.bank
  if bank is not None:  # this batch's positives replace the oldest entries (a skipped step: none)
    bank = keep(memory.push(bank, entries, state.step), bank)
  new_state = TrainState(
      step=state.step + 1, params=params, opt_state=opt_state, since_fired=since_fired,
      fire_rate=fire_rate, skipped=state.skipped + (~finite).astype(jnp.int32),
      consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1), bank=bank)

  metrics = {**metrics, **sparse_metrics,  # dead_fraction: from auxk_loss (this step's mask)
             "grad_norm": grad_norm, "param_norm": _when(log, _tree_norm, params),
             "update_norm": update_norm, "finite": finite.astype(jnp.float32),
             "skipped": new_state.skipped, "consecutive_skips": new_state.consecutive_skips,
             # The rates this step's update used: optax counts updates, and a skipped step
             # (non-finite) applied none, so its schedule lags state.step by the skips so far.
             **learning_rates(optim_cfg, state.step - state.skipped)}
  return new_state, metrics


DEAD_WINDOW_FIRINGS = 10  # a latent is dead in the curves after 10 x S/k texts without firing
HOT_RATE = 0.1            # ... and hot above a 10% firing rate (Gao et al. sec 2.4: "dense")


def latent_health(sae_params, since_fired: jax.Array, fire_rate: jax.Array, k: int) -> dict:
  """Curves that show a collapsing dictionary while it happens.

  ``dead_fraction_window``: latents silent for ``DEAD_WINDOW_FIRINGS * S / k`` texts (10 firings
  expected of a uniformly used latent, so rare-but-alive latents rarely count; independent of the
  AuxK threshold). ``hot_fraction``: EMA firing rate (``fire_rate``, bias-corrected by the
  caller) above ``HOT_RATE``. Median and max firing rates, and percentiles of the encoder's column
  norms and latent biases, whose drift (a few columns growing, biases rising) precedes a collapse.
  """
  w_enc, b_lat = sae_params["w_enc"].get_value(), sae_params["b_lat"].get_value()
  window = DEAD_WINDOW_FIRINGS * fire_rate.shape[0] // k
  pct = jnp.array([5.0, 50.0, 95.0])
  col_p = jnp.percentile(jnp.linalg.norm(w_enc.astype(jnp.float32), axis=0), pct)
  bias_p = jnp.percentile(b_lat.astype(jnp.float32), pct)
  out = {"dead_fraction_window": jnp.mean((since_fired >= window).astype(jnp.float32)),
         "hot_fraction": jnp.mean((fire_rate > HOT_RATE).astype(jnp.float32)),
         "freq_median": jnp.median(fire_rate), "freq_max": jnp.max(fire_rate)}
  for i, p in enumerate((5, 50, 95)):
    out[f"enc_norm_p{p}"] = col_p[i]
    out[f"b_lat_p{p}"] = bias_p[i]
  return out


def flops_per_step(n_encoder_params: int, tokens: int, texts: int, d_model: int,
                   num_latents: int) -> float:
  """Training FLOPs of one step: 6 N per token for the encoder (Kaplan et al. 2020; N its
  non-embedding parameters, `non_embedding_params`), plus the SAE encoder matmul (6 D S per text);
  attention's T^2 term is left out (small at T <= 512)."""
  return 6.0 * n_encoder_params * tokens + 6.0 * d_model * num_latents * texts


def non_embedding_params(encoder_params) -> int:
  """Kaplan et al.'s N: the encoder's parameters less its embedding tables (token, position and
  token-type rows are looked up, not multiplied: counted, they made MiniLM's MFU read 2x and
  ModernBERT-base's 1.35x). Works on abstract (`jax.eval_shape`) parameters."""
  def is_table(path, leaf):
    return len(leaf.shape) >= 2 and "embedding" in jax.tree_util.keystr(path).lower()
  return sum(int(math.prod(leaf.shape)) for path, leaf in
             jax.tree_util.tree_flatten_with_path(encoder_params)[0] if not is_table(path, leaf))


PEAK_FLOPS = {  # dense bf16 peak per device, for the MFU estimate
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12,  # a v5p on a Cloud TPU VM calls itself "TPU v5"
    "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
    "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,  # the SXM card's 989 would read low
}


def peak_flops(device: jax.Device) -> float | None:
  """The peak of ``device``'s kind: the longest name in `PEAK_FLOPS` it starts with ("TPU v5 lite"
  is a v5e, not the v5p that "TPU v5" names), None for a kind not in it."""
  kind = getattr(device, "device_kind", "")
  names = [k for k in PEAK_FLOPS if kind.startswith(k)]
  return PEAK_FLOPS[max(names, key=len)] if names else None

