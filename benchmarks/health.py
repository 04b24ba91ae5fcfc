"""Latent health of any trained run over the sweep's 20,000 mixed texts (the issue's target: latents
that never fire < 10%, no latent in more than 10% of texts), end-to-end runs included.

`benchmarks/sweep.py --run` measures a frozen-encoder run on the cached embeddings; an end-to-end
run's encoder has moved, so its codes need the texts. This rebuilds the same pool from the texts
(the training pairs `embed_cache.py` draws with its defaults, then the SciFact, Cranfield and
Debian documents), picks the same 20,000 (`sweep.health_rows`), and encodes them with the run at the
cache's token budgets (training queries 64 tokens, everything else 128). On a frozen-encoder run it
agrees with `sweep.py --run`, which is how the two are checked against each other.

    .venv/bin/python benchmarks/health.py --run runs/quality_flops/sparse [--run ...]
"""

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import embed_cache  # noqa: E402
import sweep  # noqa: E402
from saejax.data.beir import load_beir  # noqa: E402
from saejax.hub import trained  # noqa: E402
from saejax.retrieval.encode import EncodeConfig, encode_sparse  # noqa: E402


def pool_texts(pairs_per_source: int = 4000, seed: int = 0) -> tuple[list[str], np.ndarray]:
  """(the health pool's 20,000 texts, whether each is a training query: read at 64 tokens)."""
  queries, docs, _ = embed_cache.training_pairs(pairs_per_source, seed)
  texts = queries + docs
  for name in sweep.EVAL_SETS:
    folder, split = embed_cache.EVAL_SETS[name]
    texts += list(load_beir(folder, split).docs)
  rows = sweep.health_rows(len(texts))
  return [texts[i] for i in rows], rows < len(queries)


def run_health(workdir: str, texts: list[str], is_query: np.ndarray) -> dict:
  """`sweep.latent_health` of the run's codes (at its training k) of ``texts``."""
  _, model, tokenizer = trained.load_run(workdir)
  s = model.sae.config.num_latents
  values = np.zeros((len(texts), model.sae.config.k), np.float32)
  indices = np.zeros_like(values, np.int32)
  for query, max_len in ((True, embed_cache.MAX_QUERY_LEN), (False, embed_cache.MAX_DOC_LEN)):
    rows = np.flatnonzero(is_query == query)
    codes = encode_sparse(model, tokenizer, [texts[i] for i in rows], None,
                          EncodeConfig(max_len=max_len, batch_size=64))
    values[rows], indices[rows] = codes.values, codes.indices
  return {"num_latents": s, **sweep.latent_health(values, indices, s)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", action="append", required=True, metavar="WORKDIR")
  args = p.parse_args(argv)
  texts, is_query = pool_texts()
  print(f"health pool: {len(texts):,} texts ({int(is_query.sum()):,} training queries)", flush=True)
  print("| run | S | never fire | busiest latent's share | latents in > 10% |\n|---|---|---|---|---|")
  for workdir in args.run:
    h = run_health(workdir, texts, is_query)
    print(f"| {workdir} | {h['num_latents']:,} | {100 * h['never_fire']:.1f}% | "
          f"{100 * h['max_mixed_freq']:.1f}% | {100 * h['health_hot']:.2f}% |", flush=True)


if __name__ == "__main__":
  main()
