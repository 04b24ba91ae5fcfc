"""Gradient clipping + AdamW over all-MiniLM-L6-v2's parameters: optax's `clip_by_global_norm` vs
`saejax.hub.state.clip_by_global_norm` (one scalar multiply), each chained with the same
`optax.adamw` and applied, jitted with the parameters and moments donated, as one train step's
optimiser update is.

optax clips with `select(|g| < max, g, g / |g| * max)` per leaf; XLA:CPU materialises both sides
of that select, a second pass over every gradient (the word-embedding table alone is 30,522 x 384
floats). The two updates must agree to rounding; the script checks that before timing. Each side
runs `--steps` updates per round, alternating for `--rounds` rounds; the best round is reported.

    taskset -c 0 .venv/bin/python benchmarks/bench_clip.py
"""

import argparse
import functools
import time

import jax
import numpy as np
import optax
from flax import nnx

from saejax.hub import convert
from saejax.hub.demo import minilm_dir
from saejax.hub.state import clip_by_global_norm


def make_update(clip: optax.GradientTransformation):
  tx = optax.chain(clip, optax.adamw(3e-5, weight_decay=0.01))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, update


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  args = p.parse_args()
  _, encoder = convert.load_hf(minilm_dir(), head=False)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(encoder, nnx.Param)))
  rng = np.random.default_rng(0)
  # Gradients large enough that clipping acts (|g| > 1), as in the first steps of a run.
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 1e-2, params)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"{n / 1e6:.1f}M parameters, |g| = {float(optax.tree.norm(grads)):.1f}, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}")

  sides = {"optax.clip_by_global_norm": make_update(optax.clip_by_global_norm(1.0)),
           "saejax clip_by_global_norm": make_update(clip_by_global_norm(1.0))}
  results = {}
  for name, (tx, update) in sides.items():
    state = (jax.tree.map(np.copy, params), tx.init(params))
    for _ in range(3):
      state = update(*state, grads)
    results[name] = jax.device_get(state[0])
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(*(jax.tree.leaves(r) for r in results.values())))
  print(f"max |difference| of the parameters after 3 updates: {diff:.2e}")
  if diff > 1e-6:
    raise SystemExit("the two clips disagree")

  best = {name: float("inf") for name in sides}
  states = {name: (jax.tree.map(np.copy, params), tx.init(params))
            for name, (tx, _) in sides.items()}
  for name, (_, update) in sides.items():  # compile + warm up
    states[name] = jax.block_until_ready(update(*states[name], grads))
  for r in range(args.rounds):
    for name, (_, update) in sides.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name] = update(*states[name], grads)
      jax.block_until_ready(states[name])
      ms = (time.perf_counter() - start) / args.steps * 1e3
      best[name] = min(best[name], ms)
      print(f"round {r} {name:>27}: {ms:7.1f} ms per update", flush=True)
  a, b = best.values()
  print(f"\nbest: optax {a:.1f} ms, saejax {b:.1f} ms per update; saejax / optax time {b / a:.2f}")


if __name__ == "__main__":
  main()
