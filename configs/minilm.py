"""all-MiniLM-L6-v2 + TopK SAE (S=16,384, k=64) end to end on every local training set.

    python -m saejax.train --config configs/minilm.py --workdir runs/minilm

Hardware: CPU (2 cores: ~2 s/step at batch 64) or any single GPU. Data: Debian descriptions
(47k pairs), SciFact train qrels, CLIMATE-FEVER supporting evidence, from ../shared/data.
Runtime: 3,000 steps, ~2 h on 2 CPU cores (estimate). Expected: evaluated on the Debian dev split
like the quickstart, with the full dictionary; numbers go to README "Results" once measured.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # sibling configs import each other
import quickstart  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def get_config(arg: str | None = None):
  c = quickstart.get_config()
  c.sae.num_latents = 16384
  c.sae.k = 64
  c.sae.k_aux = 512
  c.sae.dead_after_tokens = 10 * 16384 // 64  # 10 expected firings of a uniformly used latent
  c.warmstart.steps = 1000
  c.warmstart.pairs = 16384
  c.data.sources = [
      dict(kind="jsonl", path=str(DATA / "debian-descriptions/train.jsonl"),
           query_field="query", positive_field="document", weight=3.0),
      dict(kind="beir", path=str(DATA / "scifact"), split="train", weight=1.0),
      dict(kind="jsonl", path=str(DATA / "climate-fever/claim_evidence_pairs.jsonl"),
           query_field="claim", positive_field="evidence", label_field="evidence_label",
           label_values=("SUPPORTS",), weight=1.0),
  ]
  c.data.global_batch_size = 64
  c.optim.warmup_steps = 100
  c.optim.total_steps = c.train.steps = 3000
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.eval.max_docs = 0
  if arg == "runlocal":
    c.train.steps = c.optim.total_steps = 3
    c.optim.warmup_steps = 1
    c.train.log_every = c.train.checkpoint_every = 1
    c.data.global_batch_size = 4
    c.sae.num_latents, c.sae.k, c.sae.k_aux, c.sae.b_pre_init_batches = 256, 8, 16, 1
    c.warmstart.steps, c.warmstart.pairs, c.warmstart.batch_size = 3, 16, 8
    c.data.sources = [dict(s, max_records=100) for s in c.data.sources]
    c.eval.enabled = False
  return c
