"""The recipe sweep: SAE heads trained on cached frozen-MiniLM embeddings, scored on the shared sets.

Each arm is one set of overrides of the SAE / loss / optimiser config; it trains a head with
`saejax.train.headtrain.train_head` (the real `saejax.train.step.train_step` and
`saejax.train.step.objective`, on embeddings instead of token ids) and evaluates it exactly (nDCG@10
by ir-measures) on SciFact test, Cranfield and Debian dev at several k, next to the floor (random
TopK: no training) and the ceiling (the dense embeddings themselves, cosine). Latent health is
measured over 20,000 mixed training and corpus texts: never-firing latents, latents active in > 10%
of documents.

    .venv/bin/python benchmarks/embed_cache.py --out runs/cache     # once, ~15 min on 2 cores
    .venv/bin/python benchmarks/sweep.py --cache runs/cache --arms base,dot,lr1e-3 [--steps 2000]

``--pairs N`` draws N training pairs with configs/quality.py's source weights, as stage 1 draws them
from the pipeline (default: every cached pair, uniformly); a bigger cache (`embed_cache.py
--pairs_per_source 50000`) has every pair of every source.

Arms are named in ARMS below; results are appended to runs/sweep/results.jsonl (one line per
arm) and printed as a markdown table.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saejax import hostmem  # noqa: E402
from saejax.data import beir  # noqa: E402
from saejax.data.beir import BeirData  # noqa: E402
from saejax.eval import harness, quickeval  # noqa: E402
from saejax.hub.state import OptimConfig  # noqa: E402
from saejax.retrieval.index import IDF_POWER, SparseIndex  # noqa: E402
from saejax.sae import topk as sae_lib  # noqa: E402
from saejax.train import step as step_lib  # noqa: E402
from saejax.train.headtrain import HeadTrainConfig, topic_groups, train_head  # noqa: E402

EVAL_SETS = ("scifact", "cranfield", "debian")  # the mean is over these three
# SciFact's test claims whose relevant abstracts no SciFact train pair holds (104 of 300), scored
# beside the mean: what a head learns, not which training documents it recalls.
UNSEEN = "scifact-unseen"
SCIFACT_TRAIN_QRELS = REPO.parent / "shared" / "data" / "scifact" / "qrels" / "train.tsv"
HEALTH_TEXTS = 20_000
HOT = 0.1

# name -> overrides: "sae.X", "loss.X", "optim.X", "head.X". Base: the recipe's defaults.
BASE = {"sae.num_latents": 16384, "sae.k": 64, "sae.k_aux": 512, "sae.dead_after_tokens": 2560,
        "optim.lr_sae": 1e-3, "optim.warmup_steps": 50, "head.steps": 600, "head.batch_size": 256}
ARMS = {
    "base": {},
    "dot_tau1": {"sae.normalize_codes": False, "loss.temperature": 1.0},
    "dot_tau0.05": {"sae.normalize_codes": False, "loss.temperature": 0.05},
    "tau0.02": {"loss.temperature": 0.02},
    "tau0.1": {"loss.temperature": 0.1},
    "lr2e-4": {"optim.lr_sae": 2e-4},
    "lr3e-3": {"optim.lr_sae": 3e-3},
    "steps1500": {"head.steps": 1500},
    "distill1": {"loss.w_distill": 1.0},
    "distill1_nce0": {"loss.w_distill": 1.0, "loss.w_contrastive": 0.0},
    "distill0.3": {"loss.w_distill": 0.3},
    "fvu0": {"loss.w_fvu": 0.0},
    "fvu0_aux0": {"loss.w_fvu": 0.0, "loss.w_auxk": 0.0},
    "multik": {"loss.w_multi_k": 0.125},
    "dead_long": {"sae.dead_after_tokens": 25_600},
    "aux_strong": {"loss.w_auxk": 0.25},
    "flops": {"loss.w_flops_q": 1e-3, "loss.w_flops_d": 1e-3},
    "flops1": {"loss.w_flops_q": 1.0, "loss.w_flops_d": 1.0},
    "flops10": {"loss.w_flops_q": 10.0, "loss.w_flops_d": 10.0},
    "k32": {"sae.k": 32},
    "k96": {"sae.k": 96},
    "k128": {"sae.k": 128},
    "s4096": {"sae.num_latents": 4096},
    "batch1024": {"head.batch_size": 1024},
    "resample50": {"head.resample_every": 50},
    "resample100": {"head.resample_every": 100},
    "batch1024_steps1500": {"head.batch_size": 1024, "head.steps": 1500},
    "steps150": {"head.steps": 150, "optim.warmup_steps": 15},
    "recon_only": {"loss.w_contrastive": 0.0},
    "band16": {"loss.st_band": 16},
    "band64": {"loss.st_band": 64},
    "band256": {"loss.st_band": 256},
}


def load_eval(cache: Path, name: str) -> tuple[BeirData, np.ndarray, np.ndarray]:
  meta = json.loads((cache / f"eval_{name}.json").read_text())
  arrays = np.load(cache / f"eval_{name}.npz")
  data = BeirData(tuple(meta["doc_ids"]), (), tuple(meta["query_ids"]), (), meta["qrels"])
  return data, arrays["queries"], arrays["docs"]


def unseen_eval(data: BeirData, q: np.ndarray, d: np.ndarray) -> tuple[BeirData, np.ndarray,
                                                                       np.ndarray]:
  """SciFact's cached test set cut to the claims whose relevant abstracts train never shows."""
  qrels = beir.unseen(data.qrels, beir.read_qrels(SCIFACT_TRAIN_QRELS), str(SCIFACT_TRAIN_QRELS))
  rows = [i for i, qid in enumerate(data.query_ids) if qid in qrels]
  kept = BeirData(data.doc_ids, (), tuple(data.query_ids[i] for i in rows), (), qrels)
  return kept, q[rows], d


def ndcg(data: BeirData, qv, qi, dv, di, num_latents: int, idf_power: float = IDF_POWER) -> float:
  """nDCG@10 of the codes searched as the evaluation harness searches them (`SparseIndex`, idf^
  ``idf_power`` weighting, `quickeval.RUN_DEPTH` documents ranked)."""
  index = SparseIndex.build(dv, di, num_latents, idf_power=idf_power)
  scores, docs = index.search(qv, qi, quickeval.RUN_DEPTH)
  return quickeval.evaluate(data.qrels, quickeval.to_run(data, docs, scores))["ndcg@10"]


def dense_ndcg(data: BeirData, q, d) -> float:
  docs, scores = quickeval.search_dense(q, d)
  return quickeval.evaluate(data.qrels, quickeval.to_run(data, docs, scores))["ndcg@10"]


def codes_fn(sae: sae_lib.SAE):
  """``codes(v, k, normalize) -> (values, indices)``: the SAE's embedding of cached vectors at any
  k (`SAE.embed` with k as data, batched so S-wide pre-activations stay small)."""
  graphdef, state = nnx.split(sae)
  pre_activations = jax.jit(lambda state, v: nnx.merge(graphdef, state).pre_activations(v))

  def codes(v: np.ndarray, k: int, normalize: bool):
    out_v, out_i = [], []
    for start in range(0, len(v), 1024):
      code = sae_lib.topk_relu(pre_activations(state, jnp.asarray(v[start:start + 1024])), k)
      values = sae_lib.unit_norm(code.values) if normalize else code.values
      out_v.append(np.asarray(values))
      out_i.append(np.asarray(code.indices))
    return np.concatenate(out_v), np.concatenate(out_i)

  return codes


def random_topk(d_model: int, num_latents: int, seed: int = 0) -> sae_lib.SAE:
  """The floor: an SAE as initialised, no training: z = ReLU(TopK(G x)), G random unit rows,
  unit-normalised codes (`saejax.eval.harness.random_topk_system` on embeddings)."""
  return harness.random_sae(d_model, num_latents, 64, seed)


def evaluate(sae: sae_lib.SAE, evals: dict, health_v: np.ndarray, ks=(32, 64, 128),
             idf_power: float = IDF_POWER) -> dict:
  codes = codes_fn(sae)
  s, norm = sae.config.num_latents, sae.config.normalize_codes
  out = {}
  for k in ks:
    scores = {}
    for name, (data, q, d) in evals.items():
      qv, qi = codes(q, k, norm)
      dv, di = codes(d, k, norm)
      scores[name] = ndcg(data, qv, qi, dv, di, s, idf_power)
    scores["mean"] = float(np.mean([scores[n] for n in EVAL_SETS]))
    out[f"k{k}"] = scores
  k = sae.config.k
  out.update(latent_health(*codes(health_v, k, norm), s))
  for name in EVAL_SETS:  # within one corpus (one domain: topics are broad)
    dv, di = codes(evals[name][2], k, norm)
    out[f"max_doc_freq_{name}"] = latent_health(dv, di, s)["max_mixed_freq"]
  out["max_doc_freq"] = max(out[f"max_doc_freq_{name}"] for name in EVAL_SETS)
  return out


def health_rows(pool_size: int) -> np.ndarray:
  """The health pool's rows in its texts (the cached training queries, then their positives, then
  the SciFact, Cranfield and Debian documents): 20,000 drawn with seed 0, as every sweep row."""
  return np.random.default_rng(0).permutation(pool_size)[:HEALTH_TEXTS]


def latent_health(values: np.ndarray, indices: np.ndarray, num_latents: int) -> dict:
  """Over the texts whose codes these are: latents that never fire, the busiest latent's share of
  the texts, latents firing in more than HOT of them (a latent fires where its value is > 0)."""
  counts = np.bincount(indices[values > 0], minlength=num_latents)
  return {"never_fire": float((counts == 0).mean()),
          "max_mixed_freq": float(counts.max() / len(values)),
          "health_hot": float((counts > HOT * len(values)).mean())}


def run_sae(workdir: str, cache: Path) -> sae_lib.SAE:
  """The SAE of a trained run whose encoder made `cache`: the untouched MiniLM for a frozen-encoder
  run, or the run itself (`embed_cache.py --run`). Any other pairing is refused before the run is
  loaded: codes of the cached embeddings would not be the run's."""
  from saejax.hub import trained  # noqa: PLC0415 - only this option loads a run
  made_by = cache / "encoder.json"
  if made_by.is_file():
    cached_run = json.loads(made_by.read_text())["run"]
    if Path(cached_run).resolve() != Path(workdir).resolve():
      raise SystemExit(f"error: --run {workdir}: {cache} holds the embeddings of run {cached_run}'s "
                       "encoder, not this run's")
  elif not trained.read_config(workdir).optim.get("freeze_encoder", False):
    raise SystemExit(f"error: --run {workdir}: its encoder was trained (optim.freeze_encoder is "
                     f"off) and {cache} holds the untouched MiniLM's embeddings, not its inputs; "
                     f"embed with its encoder: benchmarks/embed_cache.py --run {workdir}")
  return trained.load_run(workdir)[1].sae


def mixture_rows(source: np.ndarray, n: int, weights: list[float], seed: int) -> np.ndarray:
  """``n`` cached pair rows drawn as stage 1 draws them from the training pipeline: source i gets a
  share ``weights[i] / sum(weights)`` of the rows; within a source, its pairs in a random order,
  repeated only once all of them are taken (a source smaller than its share repeats)."""
  rng = np.random.default_rng(seed)
  share = np.asarray(weights, float) / np.sum(weights)
  counts = np.floor(share * n).astype(int)
  counts[np.argmax(share)] += n - counts.sum()
  rows = []
  for i, count in enumerate(counts):
    pool = np.flatnonzero(source == i)
    if count and not len(pool):
      raise SystemExit(f"error: the cache holds no pairs of source {i}")
    cycles = [rng.permutation(pool) for _ in range(-(-count // max(len(pool), 1)))]
    rows.append(np.concatenate(cycles)[:count] if cycles else pool[:0])
  return rng.permutation(np.concatenate(rows))


def build(overrides: dict, d_model: int):
  cfg = {**BASE, **overrides}
  sections = {"sae": {}, "loss": {}, "optim": {}, "head": {}}
  for key, value in cfg.items():
    section, _, field = key.partition(".")
    sections[section][field] = value
  steps = sections["head"].get("steps", 2000)
  sections["optim"].setdefault("total_steps", steps)
  sae_cfg = sae_lib.SAEConfig(d_model=d_model, **sections["sae"])
  return (sae_cfg, step_lib.LossConfig(**sections["loss"]),
          OptimConfig(**sections["optim"]), HeadTrainConfig(**sections["head"]))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cache", default="runs/cache")
  p.add_argument("--arms", default="base")
  p.add_argument("--out", default="runs/sweep/results.jsonl")
  p.add_argument("--no-baselines", dest="baselines", action="store_false",
                 help="skip the floor (random TopK at the arms' S) and the ceiling (the dense "
                      "embeddings), which every report carries by default")
  p.add_argument("--baselines", dest="baselines", action="store_true", default=True,
                 help="the default (kept: commands recorded in RESULTS.md pass it)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--run", action="append", default=[], metavar="WORKDIR",
                 help="also score the SAE of a trained run on the cache: a frozen-encoder run "
                      "(configs/quality.py:frozen) on the untouched MiniLM's cache, any run on "
                      "the cache of its own encoder (embed_cache.py --run): its codes of the "
                      "cached embeddings are exactly the run's, so this gives its latent health "
                      "over the mixed texts")
  p.add_argument("--health_cache", default=None,
                 help="the cache whose training texts the health pool draws from (default --cache; "
                      "runs/cache for numbers comparable with RESULTS.md's)")
  p.add_argument("--pairs", type=int, default=0,
                 help="train on this many pairs drawn with configs/quality.py's source weights, as "
                      "stage 1 draws them (default 0: every cached pair once per epoch, uniformly)")
  p.add_argument("--groups", choices=("source", "topics"), default=None,
                 help="head batches made of parts from one source or one k-means topic each (as "
                      "config.warmstart.batch_groups; default: mixed batches)")
  p.add_argument("--topics", type=int, default=16, help="k-means topics for --groups topics")
  p.add_argument("--groups_per_batch", type=int, default=1,
                 help="parts of each head batch, each from one group (--groups)")
  p.add_argument("--idf_power", type=float, default=IDF_POWER,
                 help="score the heads' codes with this idf power, as the evaluation harness "
                      "does (saejax.retrieval.index; 0: their plain cosine, as RESULTS.md's sweep "
                      "rows before 2026-12-03)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override BASE for every arm, e.g. --set sae.num_latents=4096")
  args = p.parse_args(argv)
  if args.pairs < 0:
    p.error(f"--pairs {args.pairs}: a number of training pairs must be >= 0 (0: every cached pair)")
  for item in args.set:
    key, _, value = item.partition("=")
    BASE[key] = json.loads(value)  # JSON: 4096, 2e-4, true
  cache = Path(args.cache)
  train = np.load(cache / "train.npz")
  q_train, d_train, source = train["q"], train["d"], train["source"]
  if args.pairs:
    from configs import quality as quality_config  # noqa: PLC0415 - configs/ is not a package
    weights = [spec["weight"] for spec in quality_config.sources()]
    rows = mixture_rows(train["source"], args.pairs, weights, args.seed)
    q_train, d_train, source = q_train[rows], d_train[rows], source[rows]
  evals = {name: load_eval(cache, name) for name in EVAL_SETS}
  evals[UNSEEN] = unseen_eval(*evals["scifact"])
  health = np.load(Path(args.health_cache or cache) / "train.npz")
  pool = np.concatenate([health["q"], health["d"]] + [evals[n][2] for n in EVAL_SETS])
  health_v = pool[health_rows(len(pool))]
  d_model = q_train.shape[1]
  groups = source if args.groups == "source" else None
  if args.groups == "topics":
    groups = topic_groups(q_train, d_train, args.topics, args.seed)
  grouping = f" {args.groups} x{args.groups_per_batch}" if args.groups else ""
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  print("| arm | k | SciFact | Cranfield | Debian | mean | SciFact unseen | never fire "
        "| max freq mixed / in a corpus | train s |")
  print("|---|---|---|---|---|---|---|---|---|---|", flush=True)

  def report(row: dict):
    row = {**row, "idf_power": args.idf_power}
    with open(out, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k in ("k32", "k64", "k128"):
      if k in row:
        r = row[k]
        print(f"| {row['arm']} | {k[1:]} | {r['scifact']:.3f} | {r['cranfield']:.3f} | "
              f"{r['debian']:.3f} | {r['mean']:.3f} | {r[UNSEEN]:.3f} | "
              f"{100 * row.get('never_fire', 0):.1f}% | "
              f"{100 * row.get('max_mixed_freq', 0):.1f}% / {100 * row.get('max_doc_freq', 0):.1f}% "
              f"| {row.get('train_s', 0):.0f} |", flush=True)

  if args.baselines:
    dense = {name: dense_ndcg(data, q, d) for name, (data, q, d) in evals.items()}
    dense["mean"] = float(np.mean([dense[n] for n in EVAL_SETS]))
    report({"arm": "dense (ceiling)", "k64": dense})
    s = BASE["sae.num_latents"]  # the floor at the arms' S (with --set, theirs)
    sae = random_topk(d_model, s, args.seed)
    report({"arm": f"random TopK S={s} (floor)",
            **evaluate(sae, evals, health_v, idf_power=args.idf_power)})
  for workdir in args.run:
    report({"arm": f"run {workdir}", **evaluate(run_sae(workdir, cache), evals, health_v,
                                                       idf_power=args.idf_power)})
  arms = [a for a in args.arms.split(",") if a]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    p.error(f"unknown arms {unknown}; choose from {sorted(ARMS)}")
  for arm in arms:
    sae_cfg, loss_cfg, optim_cfg, head_cfg = build(ARMS[arm], d_model)
    head_cfg = dataclasses.replace(head_cfg, groups_per_batch=args.groups_per_batch)
    start = time.time()
    sae = sae_lib.SAE(sae_cfg, rngs=nnx.Rngs(args.seed))
    sae, _, history = train_head(sae, q_train, d_train, loss_cfg, optim_cfg, head_cfg,
                                 groups=groups, log_every=max(head_cfg.steps // 4, 1))
    report({"arm": arm + grouping, "overrides": ARMS[arm],
            "pairs": len(q_train), "cache": str(cache),
            "train_s": time.time() - start,
            "last": history[-1], **evaluate(sae, evals, health_v, idf_power=args.idf_power)})

if __name__ == "__main__":
  hostmem.reexec_with_tunables()  # head temporaries on huge pages (saejax.hostmem)
  main()
