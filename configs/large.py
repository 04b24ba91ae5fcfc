"""Large recipe: ModernBERT-large (395M) + TopK SAE (S=16,384, k=64), end to end.

    python -m saejax.train --config configs/large.py --workdir /mnt/gcs/runs/large

Hardware: a TPU v4-64 / v5p-64 slice or 2 x 8 H100 (launch/ has the scripts); bf16, fsdp 16.
Runtime: 20k steps of 1,024 records: about two days on a v4-64 (estimate).
Expected: not measured yet (no accelerator here); target: +2 BEIR nDCG@10 points over base.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # sibling configs import each other
import base  # noqa: E402

MODERNBERT_LARGE = dict(base.MODERNBERT_BASE, hidden_size=1024, intermediate_size=2624,
                        num_hidden_layers=28, num_attention_heads=16)


def get_config(arg: str | None = None):
  c = base.get_config()
  c.model.init_from = "answerdotai/ModernBERT-large"
  c.model.hf_config.update(MODERNBERT_LARGE)
  c.optim.lr_encoder = 5e-5
  c.data.global_batch_size = 1024
  c.mesh.fsdp = 16
  if arg == "runlocal":
    base.shrink(c)
  return c
