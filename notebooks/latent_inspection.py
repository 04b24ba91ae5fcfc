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
# # Latent inspection
#
# What do the latents of a trained saejax model respond to? This notebook encodes a BEIR corpus
# with a trained run, prints per-latent statistics with c-TF-IDF labels (`saejax.interpret.labels`),
# plots the firing-frequency distribution and the frequency / activation plane, and shows which
# tokens of a top document drive a latent (leave-one-token-out evidence,
# `saejax.interpret.latents`).
#
# Parameters come from the environment so that a test can run this on a tiny model:
# `SAEJAX_RUN` (training workdir), `SAEJAX_BEIR` (BEIR folder), `SAEJAX_SPLIT`,
# `SAEJAX_MAX_DOCS`, `SAEJAX_OUT` (folder for the plots).

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from saejax.data.beir import load_beir
from saejax.hub import trained
from saejax.interpret import labels, latents as interpret
from saejax.retrieval.encode import EncodeConfig, encode_sparse

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
codes = encode_sparse(model, tokenizer, data.docs, None,
                      EncodeConfig(max_len=config.data.max_doc_len, progress=False))
stats = interpret.latent_stats(codes.values, codes.indices, S)
labs = labels.label_latents(list(data.docs), codes.values, codes.indices, S,
                            fingerprint=interpret.model_fingerprint(model))
families = interpret.latent_families(interpret.coactivation(codes.values, codes.indices, S))
print(f"{len(data.docs)} documents, S={S}: {stats.live.size} live, {stats.dead.sum()} dead, "
      f"{stats.hot.sum()} hot latents; {families.max() + 1} co-activation families")
print(labels.label_quality(labs))

# %%
table = interpret.stats_table(stats, labels={j: labs.text(j) for j in labs.labels},
                              families=families)
print(interpret.format_table(table, max_rows=20))

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
live = stats.live
ax1.hist(np.log10(stats.frequency[live]), bins=30, color="#4a7ab5")
ax1.set_xlabel("log10 firing frequency")
ax1.set_ylabel("latents")
ax1.set_title(f"{live.size} live latents of {S}")
ax2.scatter(stats.frequency[live], stats.mean_activation[live], s=6, alpha=0.6)
ax2.set_xscale("log")
ax2.set_xlabel("firing frequency")
ax2.set_ylabel("mean activation when firing")
ax2.set_title("frequency vs activation")
fig.tight_layout()
fig.savefig(OUT / "latent_inspection.png", dpi=90)

# %% [markdown]
# Token evidence: the most frequent latent's top document, with each token's effect on the
# latent's pre-activation when the token is left out.

# %%
j = int(table[0]["latent"])
rows, acts = interpret.top_documents(codes.values, codes.indices, S, [j], n=3)
[ev] = interpret.token_evidence(model, tokenizer, [data.docs[rows[0, 0]]], [[j]],
                                max_len=config.data.max_doc_len)
order = np.argsort(-ev.scores[:, 0])[:8]
print(f"latent {j} ({labs.text(j)!r}), top document activation {acts[0, 0]:.3f}")
for t in order:
  print(f"  {ev.tokens[t]:>15s}  {ev.scores[t, 0]:+.4f}")
