"""Base recipe: ModernBERT-base whose embedding layer is a TopK SAE (S=16,384, k=64), end to end.

    python -m saejax.train --config configs/base.py --workdir /mnt/gcs/runs/base

Hardware: a TPU v4-32 / v5e-32 pod slice or 8 x H100 (launch/ has the scripts); bf16 compute,
fp32 master weights. Data: sentence-transformers/msmarco-bm25 (query, positive, BM25 hard negative)
mixed 2:1 with sentence-transformers/all-nli triplets, from the Hugging Face hub.
Runtime: 20k steps of 512 records (~1.5 B tokens): about a day on a v4-32 (estimate).
Expected: not measured yet - no accelerator or hub was reachable where this recipe was written; the
targets are BEIR nDCG@10 within 2 points of the dense ModernBERT-base fine-tuned on the same data,
with <= 64 active latents per document and < 5% dead latents.
"""

from saejax.train.recipe import default_config

MODERNBERT_BASE = dict(  # answerdotai/ModernBERT-base config.json (architecture fields)
    model_type="modernbert", vocab_size=50368, hidden_size=768, intermediate_size=1152,
    num_hidden_layers=22, num_attention_heads=12, max_position_embeddings=8192,
    global_attn_every_n_layers=3, local_attention=128, global_rope_theta=160_000.0,
    local_rope_theta=10_000.0, norm_eps=1e-5, pad_token_id=50283)


def get_config(arg: str | None = None):
  """`arg="runlocal"`: the same recipe shrunk to a random 2-layer model for a CPU smoke test."""
  c = default_config()
  c.model.init_from = "answerdotai/ModernBERT-base"
  c.model.hf_config.update(MODERNBERT_BASE)
  c.model.dtype = "bfloat16"
  c.model.remat = True                    # 64 records/device: activations need recomputation

  c.loss.w_flops_q = 1.0                  # on unit-norm codes; keeps hot latents under ~10%
  c.loss.w_flops_d = 1.0
  c.loss.w_dense_contrastive = 0.5        # the encoder also trains as a dense model
  c.loss.flops_warmup_steps = 6_000       # SPLADE: quadratic ramp over the first third

  c.warmstart.steps = 2000                # stage 1: the SAE alone on frozen-encoder embeddings
  c.warmstart.pairs = 65536
  c.warmstart.batch_size = 1024
  c.warmstart.lr = 1e-3
  c.optim.lr_encoder = 8e-5
  c.optim.lr_sae = 2e-4
  c.optim.warmup_steps = 1_000
  c.optim.total_steps = c.train.steps = 20_000

  c.data.sources = [
      dict(kind="hf", path="sentence-transformers/msmarco-bm25", subset="triplet", split="train",
           query_field="query", positive_field="positive", negative_fields=("negative",),
           weight=2.0),
      dict(kind="hf", path="sentence-transformers/all-nli", subset="triplet", split="train",
           query_field="anchor", positive_field="positive", negative_fields=("negative",),
           weight=1.0),
  ]
  c.data.global_batch_size = 512
  c.data.max_query_len = 32
  c.data.max_doc_len = 256
  c.data.num_hard_negatives = 1
  c.data.padding = "fixed"                # one shape on every host (see saejax/data/pipeline.py)

  c.mesh.data = -1
  c.mesh.fsdp = 8

  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  if arg == "runlocal":
    shrink(c)
  return c


def shrink(c):
  """A CPU-sized variant of any ModernBERT recipe: random 2-layer encoder, local data."""
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  c.model.init_from = ""
  c.model.tokenizer = str(repo.parent / "shared/data/modernbert-tokenizer/tokenizer.json")
  c.model.hf_config.update(dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, local_attention=16))
  c.model.dtype = "float32"
  c.model.remat = False
  c.sae.num_latents, c.sae.k, c.sae.k_aux, c.sae.b_pre_init_batches = 256, 8, 16, 1
  c.warmstart.steps, c.warmstart.pairs, c.warmstart.batch_size = 3, 16, 8
  c.data.sources = [dict(kind="jsonl", path=str(repo / "data/debian-quickstart/train.jsonl"),
                         query_field="query", positive_field="document", max_records=200)]
  c.data.global_batch_size, c.data.num_hard_negatives, c.data.padding = 4, 0, "bucket"
  c.data.max_doc_len, c.data.buckets = 64, (32, 64)
  c.mesh.fsdp = 1
  c.train.steps = c.optim.total_steps = 3
  c.optim.warmup_steps = 1
  c.train.log_every = c.train.checkpoint_every = 1
