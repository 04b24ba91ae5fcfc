"""Choose the idf power on held-out paraphrase retrieval (STS-B dev+test >= 4, SICK test
entailment, MRPC test positives: sentence1 -> its sentence2 among every sentence2), wd1's codes."""
import json, sys
import numpy as np
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import sweep
from saejax.data.beir import BeirData
from saejax.retrieval.index import sparse_matrix
from saejax.retrieval.encode import EncodeConfig, encode_dense
from saejax.eval import quickeval
from saejax.hub import trained

D = "../shared/data/"
pairs = []
for f, keep in ((D + "stsbenchmark/dev.jsonl", lambda r: r["score"] >= 4),
                (D + "stsbenchmark/test.jsonl", lambda r: r["score"] >= 4),
                (D + "sick/test.jsonl", lambda r: r["label"] == "ENTAILMENT"),
                (D + "mrpc/test.jsonl", lambda r: r["label"] == 1)):
  for line in open(f):
    r = json.loads(line)
    pairs.append((r["sentence1"], r["sentence2"], keep(r)))
docs = sorted({p[1] for p in pairs})
doc_id = {t: str(i) for i, t in enumerate(docs)}
qs = {}
for s1, s2, ok in pairs:
  if ok and s1 != s2:
    qs.setdefault(s1, set()).add(doc_id[s2])
queries = sorted(qs)
qrels = {str(i): {d: 1 for d in qs[t]} for i, t in enumerate(queries)}
data = BeirData(tuple(doc_id[t] for t in docs), tuple(docs), tuple(str(i) for i in range(len(queries))),
                tuple(queries), qrels)
print(len(queries), "queries", len(docs), "docs", flush=True)
_, model, tok = trained.load_run(sys.argv[1])
cfg = EncodeConfig(max_len=64, batch_size=64)
q = encode_dense(model.encoder, tok, queries, cfg).v
d = encode_dense(model.encoder, tok, docs, EncodeConfig(max_len=128, batch_size=64)).v
print("dense", quickeval.evaluate(qrels, quickeval.to_run(data, *quickeval.search_dense(
    q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True))))["ndcg@10"])
codes = sweep.codes_fn(model.sae); S = model.sae.config.num_latents
def weigh(values, indices, w):
  out = values * w[indices]
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
for kq in (64, 512):
  qv, qi = codes(q, kq, True); dv, di = codes(d, 64, True)
  df = np.bincount(di[dv > 0], minlength=S)
  for a in (0, 0.25, 0.5, 0.75, 1.0):
    idf = np.log((len(dv) + 1) / (df + 0.5)) ** a
    docs_, scores = quickeval.search_sparse(sparse_matrix(weigh(qv, qi, idf), qi, S),
                                            sparse_matrix(weigh(dv, di, idf), di, S))
    r = quickeval.evaluate(qrels, quickeval.to_run(data, docs_, scores))["ndcg@10"]
    print(f"heldout q{kq} both a={a}: {r:.4f}", flush=True)
