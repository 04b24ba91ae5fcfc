"""ModernBERT forward + backward: saejax (jax.jit) vs transformers' ModernBertModel, same weights.

A small ModernBERT (hidden 256, 4 layers, 4 heads, GeGLU intermediate 384, local attention 128, i.e.
a +-64-token window on layers 1 and 2, global attention on layers 0 and 3; vocab 50,368) is built in
transformers with a fixed torch seed (Warner et al. 2024, "Smarter, Better, Faster, Longer",
arXiv:2412.13663), saved with `save_pretrained` and loaded into saejax with
`saejax.hub.convert.load_hf`, so both sides hold the same weights. Both then run the same step on
the same random token ids:

  loss = mean((last_hidden_state - target) ** 2);  gradients of every parameter.

`target` is a fixed random normal [batch, length, hidden] tensor. (mean(h ** 2) alone would be a
poor check: h leaves a LayerNorm with unit scale, so its mean square is ~1 whatever the weights, and
the gradients of everything before the final norm would be rounding noise.)

  saejax   `jax.jit(jax.value_and_grad(loss))` over the nnx parameter state, compiled ahead of time
           (the compile time is reported, not timed as a step); attention backend "xla".
  PyTorch  `ModernBertModel(attn_implementation="sdpa")` in train mode (all its dropouts are 0),
           fp32: forward, loss, backward, zero_grad(set_to_none=True).

Before timing, the script checks that the two last hidden states agree to 1e-4 (max abs, fp32) and
that the gradients agree (max abs difference relative to the largest gradient, per parameter).

Timing: one untimed warm-up step per side, then `--steps` steps per side, alternating saejax and
PyTorch for `--rounds` rounds so that load from other processes falls on both. PyTorch runs once per
`--threads` value (`torch.set_num_threads`; default 2 and 1, because on a loaded 2-core machine
OpenMP's 2 threads can be several times slower than 1). XLA's CPU client uses every core.
tokens/s = batch * length * steps / total wall time of the round; each side's best round is reported
with the range over rounds.

    .venv/bin/python benchmarks/bench_modernbert.py --batch-size 8 --length 128 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
from machine import like_for_like  # benchmarks/machine.py, beside this script

TOL = 1e-4        # last hidden state, max abs, fp32 (as in tests/test_modernbert.py)
GRAD_RTOL = 1e-3  # per parameter: max |g_jax - g_torch| / max |g_torch|


def hf_config(args: argparse.Namespace):
  """The transformers ModernBertConfig of the benchmarked model (released layer pattern)."""
  import transformers
  return transformers.ModernBertConfig(
      vocab_size=args.vocab_size, hidden_size=args.hidden_size,
      intermediate_size=args.intermediate_size, num_hidden_layers=args.num_layers,
      num_attention_heads=args.num_heads, local_attention=args.local_attention,
      max_position_embeddings=max(512, args.length))


def build_models(args: argparse.Namespace, model_dir: str):
  """(HF model, saejax config, saejax parameter state, saejax graphdef) with identical weights."""
  import torch
  import transformers
  from flax import nnx

  from saejax.hub import convert
  torch.manual_seed(args.seed)
  hf = transformers.ModernBertModel._from_config(hf_config(args), attn_implementation="sdpa")
  hf.save_pretrained(model_dir)
  hf.train()
  cfg, model = convert.load_hf(model_dir, head=False, attention_backend="xla")
  graphdef, params = nnx.split(model, nnx.Param)
  return hf, cfg, params, graphdef


def make_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random token ids below the special tokens, an all-true validity mask ([batch, length]) and
  the regression target [batch, length, hidden]."""
  rng = np.random.default_rng(args.seed)
  ids = rng.integers(0, min(args.vocab_size, 50_000),
                     (args.batch_size, args.length)).astype(np.int32)
  target = rng.standard_normal((args.batch_size, args.length, args.hidden_size), np.float32)
  return ids, np.ones_like(ids, bool), target


def torch_step(hf, ids, mask, target, threads: int):
  """One PyTorch forward + backward on `threads` threads; returns (loss, last hidden state)."""
  import torch
  torch.set_num_threads(threads)
  hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
  loss = ((hidden - target) ** 2).mean()
  loss.backward()
  return loss.detach(), hidden.detach()


def check_agreement(hf, cfg, params, graphdef, jax_step, ids: np.ndarray, valid: np.ndarray,
                    target: np.ndarray) -> dict:
  """Hidden states within TOL, gradients within GRAD_RTOL; returns the measured errors."""
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from saejax.hub import convert
  from saejax.models import modernbert
  t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(valid.astype(np.int64))
  hf.zero_grad(set_to_none=True)
  t_loss, t_hidden = torch_step(hf, t_ids, t_mask, torch.from_numpy(target),
                                torch.get_num_threads())
  j_hidden = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(valid))
  hidden_err = float(np.abs(np.asarray(j_hidden) - t_hidden.numpy()).max())
  j_loss, j_grads = jax_step(params, ids, valid, target)
  loss_err = abs(float(j_loss) - float(t_loss))

  grads_hf = convert.tensors_from_params(nnx.merge(graphdef, jax.device_get(j_grads)),
                                         modernbert.tensor_map(cfg))
  torch_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
  worst_name, grad_err = "", 0.0
  for name, g in grads_hf.items():
    ref = torch_grads[name]
    err = float(np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-30))
    if err > grad_err:
      worst_name, grad_err = name, err
  hf.zero_grad(set_to_none=True)
  if hidden_err > TOL or grad_err > GRAD_RTOL:
    raise SystemExit(f"saejax and transformers disagree: hidden max abs {hidden_err:.2e} "
                     f"(tol {TOL}), worst gradient {worst_name} rel {grad_err:.2e} "
                     f"(tol {GRAD_RTOL}); timings would compare different computations")
  return {"hidden_max_abs": hidden_err, "loss_abs": loss_err, "grad_max_rel": grad_err,
          "worst_grad": worst_name}


def time_round(step: Callable[[], None], steps: int) -> list[float]:
  """Wall time (seconds) of each of `steps` calls of `step`."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags (see --help)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--length", type=int, default=128, help="tokens per sequence (all real)")
  p.add_argument("--hidden-size", type=int, default=256)
  p.add_argument("--num-layers", type=int, default=4)
  p.add_argument("--num-heads", type=int, default=4)
  p.add_argument("--intermediate-size", type=int, default=384)
  p.add_argument("--local-attention", type=int, default=128,
                 help="full sliding-window width (half on each side)")
  p.add_argument("--vocab-size", type=int, default=50368)
  p.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                 help="torch.set_num_threads values, each timed as its own PyTorch side")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  """Build both models, check they agree, time them in alternating rounds, print the table."""
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  with tempfile.TemporaryDirectory() as model_dir:
    hf, cfg, params, graphdef = build_models(args, model_dir)
  ids, valid, target = make_inputs(args)

  def loss_fn(p, ids, valid, target):
    hidden = nnx.merge(graphdef, p)(ids, valid)
    return jnp.mean(jnp.square(hidden.astype(jnp.float32) - target))

  j_ids, j_valid, j_target = jax.device_put((ids, valid, target))
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, j_ids, j_valid, j_target).compile()
  compile_s = time.perf_counter() - start
  agreement = check_agreement(hf, cfg, params, graphdef, compiled, ids, valid, target)

  t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(valid.astype(np.int64))
  t_target = torch.from_numpy(target)

  def saejax_step():
    jax.block_until_ready(compiled(params, j_ids, j_valid, j_target))

  def pytorch_step(threads):
    def step():
      torch_step(hf, t_ids, t_mask, t_target, threads)
      hf.zero_grad(set_to_none=True)
    return step

  sides = [("saejax", saejax_step)] + [(f"pytorch@{n}", pytorch_step(n)) for n in args.threads]
  n_params = sum(p.numel() for p in hf.parameters())
  matmul_params = n_params - hf.embeddings.tok_embeddings.weight.numel()
  tokens = args.batch_size * args.length
  print(f"jax {jax.__version__}, torch {torch.__version__}; ModernBERT {n_params:,} params; "
        f"batch {args.batch_size} x {args.length}; saejax compile {compile_s:.1f} s; agreement: "
        f"hidden max abs {agreement['hidden_max_abs']:.1e}, loss abs {agreement['loss_abs']:.1e}, "
        f"grad max rel {agreement['grad_max_rel']:.1e} ({agreement['worst_grad']})", flush=True)
  for _, step in sides:
    step()  # warm-up

  results = {name: [] for name, _ in sides}
  for r in range(args.rounds):
    for name, step in sides:
      times = time_round(step, args.steps)
      tok_s = tokens * len(times) / sum(times)
      results[name].append((tok_s, statistics.median(times)))
      print(f"round {r} {name:>9}: {tok_s:8.0f} tok/s  "
            f"median step {statistics.median(times) * 1e3:.0f} ms", flush=True)

  best = {name: max(rs) for name, rs in results.items()}
  print("\n| side | batch x len | tok/s best (range over rounds) | median step ms | "
        "GFLOP/s (6*N*tok, N w/o emb.) | saejax / this |")
  print("|---|---|---|---|---|---|")
  for name, rs in results.items():
    tok_s, med = best[name]
    lo = min(t for t, _ in rs)
    print(f"| {name} | {args.batch_size} x {args.length} | {tok_s:.0f} ({lo:.0f}-{tok_s:.0f}) | "
          f"{med * 1e3:.0f} | {6 * matmul_params * tok_s / 1e9:.0f} | "
          f"{best['saejax'][0] / tok_s:.2f}x |")
  fastest = max((n for n in results if n != "saejax"), key=lambda n: best[n][0])
  print(f"\nsaejax / fastest PyTorch ({fastest}): {best['saejax'][0] / best[fastest][0]:.2f}x; "
        f"saejax compile {compile_s:.1f} s (excluded){like_for_like(args.threads)}")


if __name__ == "__main__":
  main()
