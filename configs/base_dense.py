"""Ablation: the base recipe without the SAE (dense ModernBERT-base, InfoNCE on cosine).

    python -m saejax.train --config configs/base_dense.py --workdir /mnt/gcs/runs/dense

Same hardware, data and steps as configs/base.py. Expected: the dense upper bound that the sparse
model's nDCG@10 is measured against.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # sibling configs import each other
import base  # noqa: E402


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.sae.enabled = False
  return c
