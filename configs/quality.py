"""Quality benchmark recipe: all-MiniLM-L6-v2 + TopK SAE (S=16,384, k=64) trained end to end on the
shared real training data, with its two comparison arms on the same data and budget.

    python -m saejax.train --config configs/quality.py:sparse --workdir runs/quality/sparse
    python -m saejax.train --config configs/quality.py:dense  --workdir runs/quality/dense
    python -m saejax.train --config configs/quality.py:frozen --workdir runs/quality/frozen

`eval/quality.py` runs all three and evaluates them (with BM25, the untouched dense MiniLM and
random TopK) on SciFact test, Cranfield and Debian beir-dev. Variants ("ARM", "ARM,STEPS" or
"runlocal"):
  sparse  saejax: stage 1 the SAE alone on frozen-encoder embeddings, stage 2 encoder and SAE
          jointly, stage 3 a fresh SAE fitted to the final encoder (warmstart.refit)
  dense   the same encoder fine-tuned without the SAE (InfoNCE on cosine, temperature 0.05)
  frozen  CSR-style: the same stage 1, then the SAE trained on the frozen encoder
Hardware: a 2-core CPU; on the AMD EPYC VM the sparse arm takes 58 min (stage 1 ~15, stage 2
~30, stage 3 ~13), frozen 8 (stage 1 loaded from the sparse arm), dense 18, and the whole
benchmark with evaluation ~2 h (~3.5 h on the Intel Xeon VM). Measured (2026-12-03,
`eval/quality.py --steps 600`, benchmarks/RESULTS.md "Quality", session 27; sparse systems scored
with the idf-weighted cosine saejax searches with): mean nDCG@10 sparse 0.622 (0.646 with queries
at 512), frozen 0.593, dense-ft 0.658, BM25 0.613, untouched dense 0.610, random TopK 0.503;
latents never firing over 20,000 mixed texts: sparse 8.6%. At 150 stage-2 steps (`ARM,150`;
session 11, before the band, plain cosine): sparse 0.605, frozen 0.577, dense-ft 0.636.
Data: ../shared/data (Debian descriptions, SciFact train qrels, CLIMATE-FEVER supporting
evidence, STS-B pairs scored >= 4, SICK entailments, MRPC paraphrases).
"""

from pathlib import Path

from saejax.hub.demo import minilm_dir
from saejax.train.recipe import default_config

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Stage-2 steps of every arm (the benchmark's budget): 4x session 11's 150 lifts sparse
# 0.605 -> 0.617, frozen 0.577 -> 0.590, dense-ft 0.636 -> 0.658 (RESULTS.md, sessions 11, 21).
STEPS = 600


def sources() -> list[dict]:
  return [
      dict(kind="jsonl", path=str(DATA / "debian-descriptions/train.jsonl"),
           query_field="query", positive_field="document", weight=2.0),
      dict(kind="beir", path=str(DATA / "scifact"), split="train", weight=1.0),
      dict(kind="jsonl", path=str(DATA / "climate-fever/claim_evidence_pairs.jsonl"),
           query_field="claim", positive_field="evidence", label_field="evidence_label",
           label_values=("SUPPORTS",), weight=0.5),
      dict(kind="jsonl", path=str(DATA / "stsbenchmark/train.jsonl"), query_field="sentence1",
           positive_field="sentence2", score_field="score", min_score=4.0, weight=0.5),
      dict(kind="jsonl", path=str(DATA / "sick/train.jsonl"), query_field="sentence1",
           positive_field="sentence2", label_field="label", label_values=("ENTAILMENT",),
           weight=0.5),
      dict(kind="jsonl", path=str(DATA / "mrpc/train.jsonl"), query_field="sentence1",
           positive_field="sentence2", label_field="label", label_values=(1,), weight=0.5),
  ]


def get_config(arg: str | None = None):
  """`arg`: "ARM", "ARM,STEPS", or "runlocal" (the sparse arm shrunk for a CPU smoke test)."""
  if arg == "runlocal":
    c = get_config("sparse,3")
    for source in c.data.sources:
      source["max_records"] = 200
    c.sae.num_latents, c.sae.k, c.sae.k_aux, c.sae.b_pre_init_batches = 256, 8, 16, 1
    c.warmstart.steps, c.warmstart.pairs, c.warmstart.batch_size = 5, 16, 8
    c.data.global_batch_size = 4
    c.train.log_every = 1
    return c
  arm, _, steps = (arg or "sparse").partition(",")
  if arm not in ("sparse", "dense", "frozen"):
    raise ValueError(f"configs/quality.py: variant {arm!r} is not sparse, dense or frozen")
  c = default_config()
  c.model.init_from = str(minilm_dir())

  c.sae.num_latents = 16384
  c.sae.k = 64
  c.sae.k_aux = 512
  c.sae.dead_after_tokens = 10 * 16384 // 64  # 10 expected firings of a uniformly used latent
  c.sae.b_pre_init_batches = 8

  # Stage 1: the SAE alone on 8,192 pairs embedded by the untouched encoder (benchmarks/sweep.py
  # chose the head recipe; RESULTS.md "Sweep"), in batches of 1,024 pairs: they reach far more
  # latents than 256 (never-firing latents over mixed texts 28.8% -> 12.4% end to end, RESULTS.md
  # "Quality", session 10). Stage 2: encoder and SAE together.
  c.warmstart.steps = 300
  c.warmstart.pairs = 8192
  c.warmstart.batch_size = 1024
  c.warmstart.lr = 1e-3
  # Mixed head batches. `--config.warmstart.batch_groups=topics --config.warmstart.groups_per_batch=4`
  # (each batch 4 k-means topics) lifts the frozen arm 0.577 -> 0.585 but not the sparse arm
  # (0.605 -> 0.607, noise; never-firing 9.9% -> 10.3%): RESULTS.md "Quality", sessions 12-13.
  # `--config.warmstart.fresh_stage2=True` (stage 2 reads on past the 8,192 pairs stage 1 fitted,
  # instead of re-reading them for its first 256 steps) scores 0.617 against 0.622: session 25.
  # Started from dense-ft's encoder (`--config.model.init_from=` its `--backbone-only` export, 200
  # stage-2 steps, fresh_stage2): encoder 0.632 read densely, code 0.620 - session 26.

  # Stage 2 trains the encoder through the sparse codes (InfoNCE on their cosine) and, at half
  # weight, as a dense model (InfoNCE on cosine of v), which keeps v a good embedding to code.
  c.loss.w_dense_contrastive = 0.5
  c.loss.w_flops_q = c.loss.w_flops_d = 1.0  # on unit codes: keeps latents from firing everywhere
  # The 64 latents just past each TopK get the retrieval gradient (forward unchanged): sparse
  # arm 0.605 -> 0.610 mean nDCG@10, never-firing latents 9.9% -> 6.1% (RESULTS.md "Quality",
  # session 18); frozen-embedding heads +0.004 at 1,024 pairs a batch, +0.012 at 256 ("Sweep").
  # Those were the band's first form, which over 600 stage-2 steps grew |v| and scored 0.590; the
  # scale-free form since (session 19) scores 0.617 there, 8.5% never firing (0.614 / 11.2% with no
  # band; 0.613 / 7.4% with `loss.band_to_encoder = False`): RESULTS.md "Quality", session 20.
  c.loss.st_band = 64
  c.optim.lr_encoder = 3e-5
  c.optim.lr_sae = 2e-4
  c.optim.total_steps = c.train.steps = int(steps or STEPS)
  c.optim.warmup_steps = min(30, c.train.steps // 10)

  c.data.sources = sources()
  c.data.global_batch_size = 32
  c.data.max_query_len = 64
  c.data.max_doc_len = 128
  c.data.buckets = (32, 64, 128)

  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 1

  if arm == "sparse":
    # The head moves 10x slower than the encoder's schedule would have it in stage 2 (it keeps
    # stage 1's latents alive while the encoder moves), then stage 3 fits a fresh head to the final
    # encoder (`loop.refit_head`): 0.607 mean nDCG@10 at k = 64 against 0.598 without it (RESULTS.md,
    # session 10).
    c.optim.lr_sae = 2e-5
    c.warmstart.refit = True
  if arm == "dense":
    c.sae.enabled = False
    c.warmstart.steps = 0
    # Its own best setting: batches from one source lift dense-ft +0.009 (0.627 -> 0.636); the
    # sparse arm scores the same mean with them and lower on SciFact's unseen claims (RESULTS.md).
    c.data.batch_by_source = True
  elif arm == "frozen":
    c.optim.freeze_encoder = True
  return c
