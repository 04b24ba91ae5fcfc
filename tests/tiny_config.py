"""A tiny random-init BERT + SAE training config for tests (seconds per run on a CPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
import quickstart  # noqa: E402


def get_config(arg: str | None = None):
  c = quickstart.get_config("runlocal")
  c.model.init_from = ""
  c.model.tokenizer = str(quickstart.minilm_dir())
  c.model.hf_config.update(dict(
      model_type="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, type_vocab_size=2,
      layer_norm_eps=1e-12, hidden_act="gelu"))
  c.data.sources[0]["max_records"] = 400
  c.data.global_batch_size = 8
  c.data.max_doc_len = 64
  c.data.buckets = (16, 32, 64)
  c.sae.num_latents = 128
  c.sae.k = 8
  c.sae.k_aux = 16
  c.sae.dead_after_tokens = 64
  c.train.steps = c.optim.total_steps = int(arg) if arg else 6
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 3
  c.train.log_batch_fingerprints = True
  c.eval.enabled = False
  return c
