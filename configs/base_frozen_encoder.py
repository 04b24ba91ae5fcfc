"""Ablation: the base recipe with the encoder frozen (CSR-style: only the SAE trains).

    python -m saejax.train --config configs/base_frozen_encoder.py --workdir /mnt/gcs/runs/frozen

Same hardware, data and steps as configs/base.py. Expected: lower nDCG@10 than base (the backbone
cannot adapt to the bottleneck); the gap is what end-to-end training buys.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # sibling configs import each other
import base  # noqa: E402


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.optim.freeze_encoder = True
  return c
