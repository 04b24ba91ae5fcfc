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
# # Steering
#
# Query-time steering (`saejax.interpret.steer`): suppress or boost one latent and watch the share
# of top-10 results that activate it, as a function of the steering strength, next to the retrieval
# quality (nDCG@10) of all queries. Parameters from the environment: `SAEJAX_RUN`, `SAEJAX_BEIR`,
# `SAEJAX_SPLIT`, `SAEJAX_MAX_DOCS`, `SAEJAX_OUT`.

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from saejax.data.beir import load_beir
from saejax.eval import quickeval
from saejax.hub import trained
from saejax.interpret import labels, steer
from saejax.retrieval.encode import EncodeConfig, encode_sparse
from saejax.retrieval.index import IDF_POWER, SparseIndex

RUN = os.environ.get("SAEJAX_RUN", "runs/quickstart")
BEIR = os.environ.get("SAEJAX_BEIR", "data/debian-quickstart/beir-dev")
SPLIT = os.environ.get("SAEJAX_SPLIT", "dev")
MAX_DOCS = int(os.environ.get("SAEJAX_MAX_DOCS", "1000"))
OUT = Path(os.environ.get("SAEJAX_OUT", "notebook_outputs"))
OUT.mkdir(parents=True, exist_ok=True)

# %%
config, model, tokenizer = trained.load_run(RUN)
data = load_beir(BEIR, SPLIT, max_docs=MAX_DOCS)
S = model.sae.config.num_latents
d = encode_sparse(model, tokenizer, data.docs, None,
                  EncodeConfig(max_len=config.data.max_doc_len, progress=False))
q = encode_sparse(model, tokenizer, data.queries, None,
                  EncodeConfig(max_len=config.data.max_query_len, progress=False))
docs = steer.DocActivations(d.values, d.indices, S)
# The index saejax searches with: the idf-weighted cosine of the codes (`saejax.retrieval.index`).
index = SparseIndex.build(d.values, d.indices, S, idf_power=IDF_POWER)
search = steer.SteeredSearch(index, docs)
labs = labels.label_latents(list(data.docs), d.values, d.indices, S)


def ndcg(scores, ids):
  run = quickeval.to_run(data, np.maximum(ids, 0), np.where(ids >= 0, scores, -np.inf))
  return quickeval.evaluate(data.qrels, run)["ndcg@10"]


scores0, ids0 = search.search(q.values, q.indices, 10)
# The latent present in the most top-10 results.
hits = np.bincount(d.indices[ids0[ids0 >= 0]].ravel(), minlength=S)
j = int(hits.argmax())
print(f"latent {j} ({labs.text(j)!r}); unsteered nDCG@10 {ndcg(scores0, ids0):.4f}")

# %%
strengths = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0]
curves = {"suppress": [], "boost": []}
quality = {"suppress": [], "boost": []}
for kind in curves:
  for s in strengths:
    steering = steer.Steering((steer.SteerOp(kind, (j,), s),)) if s else steer.Steering()
    sc, ids = search.search(q.values, q.indices, 10, steering)
    curves[kind].append(steer.fraction_activating(ids, docs, j).mean())
    quality[kind].append(ndcg(sc, ids))
_, ex = search.search(q.values, q.indices, 10, steer.Steering.by_id(exclude=[j]))
print("exclude: fraction", steer.fraction_activating(ex, docs, j).mean())
for kind in curves:
  print(kind, [f"{x:.3f}" for x in curves[kind]], "nDCG", [f"{x:.3f}" for x in quality[kind]])

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for kind, marker in (("suppress", "v"), ("boost", "^")):
  ax1.plot(strengths, curves[kind], marker=marker, label=kind)
  ax2.plot(strengths, quality[kind], marker=marker, label=kind)
ax1.set_xlabel("strength (x query weight)")
ax1.set_ylabel(f"fraction of top-10 activating latent {j}")
ax1.legend()
ax2.set_xlabel("strength (x query weight)")
ax2.set_ylabel("nDCG@10, all queries")
ax2.legend()
fig.suptitle(f"steering latent {j}: {labs.text(j)}")
fig.tight_layout()
fig.savefig(OUT / "steering.png", dpi=90)
