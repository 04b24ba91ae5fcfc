"""Session 27: what Cranfield's hot latents (in > 10% of its documents) are. Encodes Cranfield's
and Debian's documents with the benchmark's sparse arm, counts each latent's document frequency in
both, labels latents by c-TF-IDF over the two corpora together (so a label contrasts domains)."""
import sys
import numpy as np
from saejax.data.beir import load_beir
from saejax.hub import trained
from saejax.interpret import labels as labels_lib
from saejax.retrieval.encode import EncodeConfig, encode_sparse

run = sys.argv[1]
_, model, tok = trained.load_run(run)
S = model.sae.config.num_latents
sets = {"cranfield": ("/work/shared/data/cranfield", "test"),
        "debian": ("/work/shared/data/debian-descriptions/beir-dev", "dev")}
codes, texts = {}, {}
for name, (folder, split) in sets.items():
  docs = list(load_beir(folder, split).docs)
  codes[name] = encode_sparse(model, tok, docs, None, EncodeConfig(max_len=128, progress=False))
  texts[name] = docs
freq = {}
for name, c in codes.items():
  counts = np.zeros(S)
  for vals, idx in zip(c.values, c.indices):
    counts[idx[vals > 0]] += 1
  freq[name] = counts / len(c.values)
hot = np.flatnonzero(freq["cranfield"] > 0.1)
print(f"Cranfield: {hot.size} latents in > 10% of its {len(texts['cranfield'])} documents; "
      f"busiest {freq['cranfield'].max():.1%}; live {(freq['cranfield'] > 0).sum()}")
print(f"those latents on Debian: median {np.median(freq['debian'][hot]):.2%}, "
      f"max {freq['debian'][hot].max():.2%}, in > 10%: {(freq['debian'][hot] > 0.1).sum()}")
all_texts = texts["cranfield"] + texts["debian"]
values = np.concatenate([codes["cranfield"].values, codes["debian"].values])
indices = np.concatenate([codes["cranfield"].indices, codes["debian"].indices])
labs = labels_lib.label_latents(all_texts, values, indices, S)
by_id = labs.labels
order = hot[np.argsort(-freq["cranfield"][hot])]
for j in order[:15]:
  lab = by_id.get(int(j))
  print(f"latent {j:5d}: Cranfield {freq['cranfield'][j]:.1%}, Debian {freq['debian'][j]:.2%}: "
        f"{lab.label if lab else '?'} {list(lab.terms[:6]) if lab else []} AUC {lab.auc if lab else None}")
