"""A trained run's encoder under an untrained random TopK head (same S and k), on the quality suite.

Beside the run itself it asks whether the trained head codes its own encoder better than random
directions do: the floor of `saejax.eval` (random TopK) uses the untouched encoder, so it cannot
separate what the encoder learned from what the head learned.

    .venv/bin/python benchmarks/random_head.py --run runs/quality/sparse --out runs/random_head.json
"""

import argparse
import json
import sys
from pathlib import Path

from saejax.eval import harness
from saejax.hub import trained
from saejax.sae.embedder import Embedder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from quality import MEAN_SETS, SUITE  # noqa: E402  (the quality benchmark's sets and suite)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", required=True, help="a training workdir with an SAE")
  p.add_argument("--out", required=True, help="JSON file of nDCG@10 per set and query k")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  config, model, tokenizer = trained.load_run(args.run)
  if model.sae is None:
    p.error(f"--run {args.run} has no SAE (a dense run): there is no head to compare")
  c = model.sae.config
  sae = harness.random_sae(c.d_model, c.num_latents, c.k, args.seed)
  system = harness.SparseSystem("random-head", Embedder(model.encoder, sae), tokenizer,
                                source=f"{args.run} encoder + random TopK head")
  specs = [harness.BeirSpec.parse(b) for b in SUITE.beir]
  query_len, doc_len = trained.trained_lens(config)
  cfg = harness.HarnessConfig(max_query_len=query_len, max_doc_len=SUITE.max_doc_len or doc_len,
                              k_sweep=(c.k,),
                              k_query_sweep=tuple(int(k) for k in SUITE.k_query_sweep.split(",") if k))
  results = harness.evaluate([system], specs, cfg)["datasets"]
  got = {name: {"ndcg@10": r["systems"]["random-head"]["ndcg@10"],
                "k_query": {row["k_query"]: row["ndcg@10"]
                            for row in r["systems"]["random-head"]["k_query_sweep"]}}
         for name, r in results.items()}
  mean = sum(got[d]["ndcg@10"] for d in MEAN_SETS) / len(MEAN_SETS)
  print(" ".join(f"{d} {v['ndcg@10']:.4f}" for d, v in got.items()), f"mean {mean:.4f}")
  Path(args.out).write_text(json.dumps({"run": args.run, "mean": mean, "sets": got}, indent=1))


if __name__ == "__main__":
  main()
