"""Every training config field, with its default and one comment. configs/*.py start from here.

The defaults are the base recipe's model-independent settings (S = 16,384 latents, k = 64, the loss
weights of Gao et al. 2024 and CSR); a config file overrides what differs and states its command,
hardware and expected result in its docstring. Library code never reads a ConfigDict:
`saejax.hub.build` turns each section into a typed, frozen dataclass and fails on unknown keys.
"""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.init_from = ""                  # HF directory or hub id of the encoder's weights
  c.model.hf_config = ml_collections.ConfigDict()  # architecture (config.json dict); for a random
  #                                         init, and for shape checks without the weights
  c.model.tokenizer = ""                  # tokenizer.json or its directory; "" = init_from's
  c.model.attention_backend = ""          # xla / cudnn / splash; "" = the platform's default
  c.model.dtype = "float32"               # compute dtype (bfloat16 on GPU/TPU); params stay fp32
  c.model.remat = False                   # ModernBERT: recompute blocks in backward (memory)

  c.sae = ml_collections.ConfigDict()
  c.sae.enabled = True                    # False: the dense ablation (InfoNCE on pooled v, cosine)
  c.sae.num_latents = 16384               # S, the dictionary size (CSR, OpenAI)
  c.sae.k = 64                            # active latents per text
  c.sae.k_aux = 512                       # AuxK latents (Gao et al. appendix A.2; CSR)
  c.sae.dead_after_tokens = 1_000_000     # texts without firing before a latent counts as dead
  c.sae.b_pre_init = "geometric_median"   # b_pre from data (Gao et al. sec 2.1): or "mean"
  c.sae.b_pre_init_batches = 8            # batches of documents used for it (0 = leave at 0)
  c.sae.normalize_codes = True            # embedding = unit-norm code: training and search are cosine

  c.warmstart = ml_collections.ConfigDict()  # stage 1: the SAE alone on frozen-encoder embeddings
  c.warmstart.steps = 0                   # head-training steps before end-to-end training (0 = off)
  c.warmstart.pairs = 8192                # training pairs embedded once by the untouched encoder
  c.warmstart.batch_size = 256            # pairs per head-training step (in-batch negatives)
  c.warmstart.lr = 2e-4                   # peak SAE learning rate of stage 1
  c.warmstart.resample_every = 0          # every N steps re-initialise dead latents (0: never)
  c.warmstart.resample_until = 0.5        # ... only in this first fraction of stage 1
  c.warmstart.refit = False               # stage 3: after the last step, a fresh SAE trained
                                          # as in stage 1 on the final encoder (loop.refit_head)
  c.warmstart.init_from = ""              # a run whose stage-1 head to load (same inputs only)
  c.warmstart.fresh_stage2 = False        # stage 2 reads on past stage 1's pairs (not re-reading
                                          # pairs the head has fitted; loop.skip_stage_one_pairs)
  c.warmstart.batch_groups = ""           # head batches: "" mixed, "source" or "topics" (k-means)
  c.warmstart.topics = 16                 # ... k-means clusters of the pairs' embeddings
  c.warmstart.groups_per_batch = 1        # ... each head batch this many parts, one group each

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.05               # InfoNCE logits = similarity(z_q, z_d) / temperature
  c.loss.w_contrastive = 1.0
  c.loss.w_fvu = 1.0                      # reconstruction: fraction of variance unexplained
  c.loss.w_multi_k = 0.0                  # Gao et al. Multi-TopK: FVU at multi_k_factor * k (1/8)
  c.loss.multi_k_factor = 4
  c.loss.w_auxk = 1 / 32                  # Gao et al. appendix A.2
  c.loss.w_flops_q = 0.0                  # FLOPS regulariser (SPLADE) on query codes
  c.loss.w_flops_d = 0.0                  # ... and on document codes
  c.loss.flops_warmup_steps = 0           # quadratic ramp of both FLOPS weights
  c.loss.w_spread_out = 0.0               # GOR second-moment term (EmbeddingGemma)
  c.loss.w_distill = 0.0                  # KL(dense teacher || sparse codes) over in-batch candidates
  c.loss.distill_temperature = 0.05       # teacher's temperature on cosine of the pooled v
  c.loss.w_dense_contrastive = 0.0        # InfoNCE on cosine of v itself (trains the encoder)
  c.loss.recon_to_encoder = False         # reconstruction gradients reach the encoder
  c.loss.flops_to_encoder = True          # FLOPS gradients reach the encoder (False: the SAE only)
  c.loss.bank_size = 0                    # XBM: last N positives as more negatives (measured: off)
  c.loss.st_band = 0                      # next N latents past TopK get retrieval gradients at 0
  c.loss.band_to_encoder = True           # the band's gradients reach the encoder (False: SAE only)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr_encoder = 2e-5               # peak learning rates per parameter group
  c.optim.lr_sae = 1e-4
  c.optim.warmup_steps = 100              # linear warm-up, counted inside total_steps
  c.optim.total_steps = 10_000            # cosine decay horizon (usually = train.steps)
  c.optim.end_lr_fraction = 0.1           # final lr as a fraction of the peak
  c.optim.weight_decay_encoder = 0.01
  c.optim.weight_decay_sae = 0.0          # OpenAI's TopK SAEs train without weight decay
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.clip_norm = 1.0                 # global gradient-norm clip
  c.optim.freeze_encoder = False          # True: CSR-style ablation, only the SAE trains
  c.optim.grad_accum = 1                  # micro-batches per step (negatives per micro-batch)

  c.data = ml_collections.ConfigDict()
  c.data.sources = []                     # dicts of saejax.data.sources.SourceConfig fields
  c.data.global_batch_size = 32           # records per step over all processes
  c.data.max_query_len = 32               # token budgets incl. [CLS]/[SEP]; longer is truncated
  c.data.max_doc_len = 256
  c.data.buckets = (32, 64, 128, 256, 512)  # allowed padded lengths (padding = "bucket")
  c.data.padding = "bucket"               # "fixed" pads to the max lengths (multi-host safe)
  c.data.num_hard_negatives = 0           # H per query; mined with BM25 where a source has none
  c.data.seed = 0                         # shuffle seed
  c.data.shuffle = True
  c.data.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever
  c.data.batch_by_source = False          # each stage-2 batch from one source (in-domain negatives)
  c.data.on_bad_record = "raise"          # or "skip": drop and count malformed records
  c.data.read_threads = 2
  c.data.prefetch_batches = 4

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                        # data-parallel replicas; -1 = the remaining devices
  c.mesh.fsdp = 1                         # parameter sharding (ZeRO-3 style)
  c.mesh.tensor = 1                       # tensor parallelism (heads, MLP, SAE latents)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10_000
  c.train.seed = 0                        # parameter init
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.max_consecutive_skips = 10      # non-finite steps in a row before the run stops
  c.train.log_batch_fingerprints = False  # write a hash of every batch (proves exact resume)

  c.eval = ml_collections.ConfigDict()
  c.eval.enabled = False                  # after training: retrieval on a BEIR folder
  c.eval.beir_dir = ""
  c.eval.split = "test"
  c.eval.max_docs = 0                     # 0 = all documents
  c.eval.baselines = ("bm25", "dense", "random")  # systems next to saejax (random: the floor)
  c.eval.idf_power = 0.5                  # sparse scoring: idf^a-weighted cosine (0: plain)
  return c
