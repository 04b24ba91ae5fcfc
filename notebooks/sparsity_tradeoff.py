# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quality / sparsity trade-off (k, S)
#
# For each trained run (one dictionary size S each) and several inference k (active latents per
# text, at most the training k), this measures retrieval quality (nDCG@10, exact sparse search) and
# reconstruction (FVU of the pooled embedding from its k latents), and plots both against k, one
# line per S. Runs with different S come from training with `--config.sae.num_latents=...`.
# Parameters from the environment: `SAEJAX_RUNS` (comma-separated workdirs; default
# `SAEJAX_RUN`), `SAEJAX_KS` (comma-separated k; default k/4, k/2, k of each run), `SAEJAX_BEIR`,
# `SAEJAX_SPLIT`, `SAEJAX_MAX_DOCS`, `SAEJAX_OUT`.

# %%
import os
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from saejax.data.beir import load_beir
from saejax.eval import quickeval
from saejax.hub import trained
from saejax.retrieval.encode import EncodeConfig, encode, encode_sparse
from saejax.retrieval.index import IDF_POWER, SparseIndex

RUNS = os.environ.get("SAEJAX_RUNS", os.environ.get("SAEJAX_RUN", "runs/quickstart")).split(",")
BEIR = os.environ.get("SAEJAX_BEIR", "data/debian-quickstart/beir-dev")
SPLIT = os.environ.get("SAEJAX_SPLIT", "dev")
MAX_DOCS = int(os.environ.get("SAEJAX_MAX_DOCS", "1000"))
KS = [int(k) for k in os.environ.get("SAEJAX_KS", "").split(",") if k]
OUT = Path(os.environ.get("SAEJAX_OUT", "notebook_outputs"))
OUT.mkdir(parents=True, exist_ok=True)
data = load_beir(BEIR, SPLIT, max_docs=MAX_DOCS)


def fvu_fn(model, k):
  """A jitted (ids, valid) -> per-text squared error and squared deviation of the pooled v."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, valid):
    m = nnx.merge(graphdef, state)
    out = m(ids, valid, k)
    return ((out.v - out.v_hat) ** 2).sum(-1), out.v

  return lambda ids, valid: forward(state, ids, valid)


# %%
results = []
for run in RUNS:
  config, model, tokenizer = trained.load_run(run)
  S, k_train = model.sae.config.num_latents, model.sae.config.k
  d_cfg = EncodeConfig(max_len=config.data.max_doc_len, progress=False)
  q_cfg = EncodeConfig(max_len=config.data.max_query_len, progress=False)
  for k in sorted({min(k, k_train) for k in KS} or
                  {max(1, k_train // 4), max(1, k_train // 2), k_train}):
    d = encode_sparse(model, tokenizer, data.docs, k, d_cfg)
    q = encode_sparse(model, tokenizer, data.queries, k, q_cfg)
    index = SparseIndex.build(d.values, d.indices, S, idf_power=IDF_POWER)  # as saejax searches
    scores, ids = index.search(q.values, q.indices, 10)
    run_ = quickeval.to_run(data, np.maximum(ids, 0), np.where(ids >= 0, scores, -np.inf))
    ndcg = quickeval.evaluate(data.qrels, run_)["ndcg@10"]
    (err, v), _ = encode(fvu_fn(model, k), tokenizer, data.docs, d_cfg)
    fvu = err.sum() / ((v - v.mean(0)) ** 2).sum()
    results.append({"run": run, "S": S, "k": k, "ndcg@10": ndcg, "fvu": float(fvu)})
    print(results[-1])

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for s in sorted({r["S"] for r in results}):
  rs = [r for r in results if r["S"] == s]
  ax1.plot([r["k"] for r in rs], [r["ndcg@10"] for r in rs], marker="o", label=f"S={s}")
  ax2.plot([r["k"] for r in rs], [r["fvu"] for r in rs], marker="o", label=f"S={s}")
ax1.set_xlabel("active latents k")
ax1.set_ylabel("nDCG@10")
ax1.legend()
ax2.set_xlabel("active latents k")
ax2.set_ylabel("FVU (reconstruction)")
ax2.legend()
fig.tight_layout()
fig.savefig(OUT / "sparsity_tradeoff.png", dpi=90)
