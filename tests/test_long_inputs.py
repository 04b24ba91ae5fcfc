"""Long inputs: ModernBERT at its full 8,192-token context matches transformers' PyTorch model.

ModernBERT (Warner et al., 2024) alternates global attention with a local sliding window and
applies RoPE at two thetas; mistakes in either (window edges, RoPE frequency precision, masks
built for short sequences) show up only at long lengths, so parity is checked at T = 8,192 on a
tiny random model (fp32, valid tokens compared at the same tolerance as tests/test_modernbert.py).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from saejax.hub import convert

T = 8192
LONG = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, local_attention=16, global_attn_every_n_layers=2,
            max_position_embeddings=T, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            cls_token_id=1, sep_token_id=2)
TOL = 1e-4  # max abs error on valid tokens, as in tests/test_modernbert.py


@pytest.mark.slow
def test_modernbert_parity_at_8192_tokens(tmp_path):
  torch.manual_seed(0)
  hf = transformers.ModernBertModel(transformers.ModernBertConfig(**LONG)).eval()
  with torch.no_grad():  # HF inits norms to 1; perturb them so a missed norm would show
    for name, p in hf.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(tmp_path)
  cfg, model = convert.load_hf(tmp_path)
  assert cfg.layer_types == ("full_attention", "sliding_attention") and cfg.window == 8

  rng = np.random.default_rng(0)
  ids = rng.integers(3, LONG["vocab_size"], (1, T))  # batch 1: padding is checked at short T
  mask = np.ones((1, T), np.int64)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask.astype(bool))))
  valid = mask.astype(bool)
  err = np.abs(out[valid] - ref.numpy()[valid])
  print(f"T={T}: max abs error {err.max():.2e} over {valid.sum()} valid tokens")
  assert err.max() < TOL
  # The far end of the sequence: positions beyond anything the short parity tests reach.
  np.testing.assert_allclose(out[0, -64:], ref.numpy()[0, -64:], atol=TOL)
