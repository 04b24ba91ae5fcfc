"""Frozen-encoder embeddings of the quality benchmark's training pairs and evaluation sets, cached.

The SAE-head sweep (`benchmarks/sweep.py`) trains heads on these in seconds instead of running the
encoder every step. Encoding is `saejax.retrieval.encode.encode_dense` with the evaluation harness's
token budgets (queries 64, documents 128: `eval/quality.py`), so a head evaluated on the cache
scores exactly what `python -m saejax.eval` would for a frozen-encoder model.

    .venv/bin/python benchmarks/embed_cache.py --out runs/cache [--pairs_per_source 4000]
    .venv/bin/python benchmarks/embed_cache.py --out runs/cache_RUN --run RUN   # a trained encoder

`--run WORKDIR` embeds with that training run's encoder instead (its pooled v, what its SAE reads),
so `sweep.py --run` scores the run's own SAE on it exactly, and sweep heads are fitted to the
final encoder of a joint run as its stage 3 (`warmstart.refit`) fits one.

Writes OUT/train.npz (q, d: [N, D] float32, source: [N] int) and OUT/eval_NAME.npz (queries, docs)
plus OUT/eval_NAME.json (ids and qrels). Rerunning skips files that exist.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ is not a package

from configs import quality as quality_config  # noqa: E402
from saejax.data.beir import load_beir  # noqa: E402
from saejax.data.sources import SourceConfig, open_source  # noqa: E402
from saejax.data.tokenizer import load_tokenizer  # noqa: E402
from saejax.hub import convert  # noqa: E402
from saejax.hub.demo import minilm_dir  # noqa: E402
from saejax.retrieval.encode import EncodeConfig, encode_dense  # noqa: E402

DATA = REPO.parent / "shared" / "data"
MAX_QUERY_LEN, MAX_DOC_LEN = 64, 128
EVAL_SETS = {"scifact": (DATA / "scifact", "test"), "cranfield": (DATA / "cranfield", "test"),
             "debian": (DATA / "debian-descriptions" / "beir-dev", "dev")}


def training_pairs(pairs_per_source: int, seed: int) -> tuple[list[str], list[str], list[int]]:
  """Up to `pairs_per_source` (query, positive) records of each configs/quality.py source,
  sampled without replacement."""
  rng = np.random.default_rng(seed)
  queries, docs, source_ids = [], [], []
  for i, spec in enumerate(quality_config.sources()):
    spec = {k: v for k, v in spec.items() if k != "weight"}
    source = open_source(SourceConfig(**spec))
    take = rng.permutation(len(source))[:pairs_per_source]
    for j in take:
      record = source[int(j)]
      queries.append(record["query"])
      docs.append(record["positive"])
      source_ids.append(i)
    print(f"source {i} {spec['path']}: {len(take)} of {len(source)} pairs", flush=True)
  return queries, docs, source_ids


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/cache")
  p.add_argument("--pairs_per_source", type=int, default=4000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--run", default=None, metavar="WORKDIR",
                 help="embed with this training run's encoder (default: the untouched MiniLM)")
  args = p.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.run:
    from saejax.hub import trained  # noqa: PLC0415 - only this option loads a run
    _, model, tok = trained.load_run(args.run)
    encoder = model.encoder
    (out / "encoder.json").write_text(json.dumps({"run": str(args.run)}))
  else:
    _, encoder = convert.load_hf(minilm_dir())
    tok = load_tokenizer(minilm_dir())
  qcfg = EncodeConfig(max_len=MAX_QUERY_LEN, batch_size=64)
  dcfg = EncodeConfig(max_len=MAX_DOC_LEN, batch_size=64)
  for name, (folder, split) in EVAL_SETS.items():
    if (out / f"eval_{name}.npz").is_file():
      continue
    start = time.time()
    data = load_beir(folder, split)
    q = encode_dense(encoder, tok, data.queries, qcfg).v
    d = encode_dense(encoder, tok, data.docs, dcfg).v
    np.savez(out / f"eval_{name}.npz", queries=q, docs=d)
    (out / f"eval_{name}.json").write_text(json.dumps(
        {"doc_ids": data.doc_ids, "query_ids": data.query_ids, "qrels": data.qrels}))
    print(f"{name}: {len(data.queries)} queries, {len(data.docs)} docs, {time.time() - start:.0f} s",
          flush=True)
  if not (out / "train.npz").is_file():
    start = time.time()
    queries, docs, source_ids = training_pairs(args.pairs_per_source, args.seed)
    q = encode_dense(encoder, tok, queries, qcfg).v
    d = encode_dense(encoder, tok, docs, dcfg).v
    np.savez(out / "train.npz", q=q, d=d, source=np.asarray(source_ids, np.int32))
    print(f"train: {len(queries)} pairs, {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
