"""Stage-1 head training under glibc's default malloc vs `saejax.hostmem`'s huge-page tunable.

The same head training as the quality recipe's stage 1 (`saejax.train.headtrain.train_head`:
S = 16,384, k = 64, 1,024 pairs per step, the real step and objective) on random Gaussian embeddings
(the step's cost does not depend on their values), in two child processes that take turns: one with
``SAEJAX_MALLOC=system`` (glibc's defaults: each step's multi-GB temporaries mapped and faulted in
4 KiB at a time), one as `saejax.train` starts (``glibc.malloc.hugetlb=1``). Each child times
`--steps` steps after one untimed compile-and-warm-up run of the same length, and reports wall time,
page faults, system and user CPU time and peak resident memory.

    .venv/bin/python benchmarks/bench_hostmem.py --steps 10 --rounds 2
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(steps: int, batch: int, latents: int):
  from saejax import hostmem  # pylint: disable=import-outside-toplevel
  hostmem.reexec_with_tunables()
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from saejax.hub.state import OptimConfig  # pylint: disable=import-outside-toplevel
  from saejax.sae import topk as sae_lib  # pylint: disable=import-outside-toplevel
  from saejax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from saejax.train.headtrain import HeadTrainConfig, train_head  # pylint: disable=C0415

  rng = np.random.default_rng(0)
  q, d = (rng.standard_normal((8192, 384)).astype(np.float32) for _ in range(2))
  sae_cfg = sae_lib.SAEConfig(d_model=384, num_latents=latents, k=64, k_aux=512,
                              dead_after_tokens=10 * latents // 64, normalize_codes=True)
  loss_cfg = step_lib.LossConfig(temperature=0.05, w_flops_q=1.0, w_flops_d=1.0)
  optim_cfg = OptimConfig(lr_sae=1e-3, warmup_steps=2, total_steps=steps)
  head_cfg = HeadTrainConfig(steps=steps, batch_size=batch)

  def run():
    sae, _, _ = train_head(sae_lib.SAE(sae_cfg, rngs=nnx.Rngs(0)), q, d, loss_cfg, optim_cfg,
                           head_cfg)
    jax.block_until_ready(nnx.state(sae))

  run()  # compile and warm up
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  run()  # compiled again (train_head jits per call), timed as the loop runs it
  after = resource.getrusage(resource.RUSAGE_SELF)
  print(json.dumps({
      "tunables": os.environ.get("GLIBC_TUNABLES", ""), "wall_s": time.perf_counter() - start,
      "faults": after.ru_minflt - before.ru_minflt, "sys_s": after.ru_stime - before.ru_stime,
      "user_s": after.ru_utime - before.ru_utime, "maxrss_gb": after.ru_maxrss / 2**20}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=1024, help="pairs per step")
  parser.add_argument("--num-latents", type=int, default=16384)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args.steps, args.batch_size, args.num_latents)
  sys.path.insert(0, str(REPO / "benchmarks"))
  import machine  # pylint: disable=import-outside-toplevel
  print(f"{machine.cpu_model()}, {os.cpu_count()} cores; S = {args.num_latents}, "
        f"{args.batch_size} pairs per step")
  best = {}
  for r in range(args.rounds):
    for name, extra in (("glibc default", {"SAEJAX_MALLOC": "system"}), ("hugetlb=1", {})):
      env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SAEJAX_MALLOC")}
      out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps),
                            "--batch-size", str(args.batch_size), "--num-latents",
                            str(args.num_latents)], env={**env, **extra, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, check=True).stdout
      m = json.loads(out.strip().splitlines()[-1])
      print(f"round {r} {name:>13}: {m['wall_s']:.1f} s for {args.steps} steps, "
            f"{m['faults'] / 1e6:.2f}M faults, sys {m['sys_s']:.1f} s, user {m['user_s']:.1f} s, "
            f"peak RSS {m['maxrss_gb']:.1f} GiB  [{m['tunables'] or 'no tunables'}]", flush=True)
      if name not in best or m["wall_s"] < best[name]["wall_s"]:
        best[name] = m
  base, tuned = best["glibc default"], best["hugetlb=1"]
  print(f"\nbest of {args.rounds}: hugetlb=1 {base['wall_s'] / tuned['wall_s']:.2f}x faster, "
        f"{base['faults'] / max(tuned['faults'], 1):.0f}x fewer page faults, peak RSS "
        f"{tuned['maxrss_gb']:.1f} vs {base['maxrss_gb']:.1f} GiB")


if __name__ == "__main__":
  main()
