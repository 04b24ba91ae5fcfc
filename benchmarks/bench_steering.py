"""Steering on real data: does suppressing / boosting a latent do what it says, and nothing else?

Model: a trained quickstart-type run (MiniLM + TopK SAE, default runs/quickstart). Data: a BEIR
folder (default the Debian package descriptions, dev split: synopsis -> description), every
document indexed exactly (`saejax.retrieval.index.SparseIndex`, idf-weighted as saejax searches
unless ``--idf_power 0``), top 10 per query.

Latents: the ``--latents`` latents present in the most (query, top-10 result) pairs of the
unsteered search, skipping latents that fire in more than ``--max_frequency`` of the documents
(a latent in half the corpus is a "generic" direction, not a concept to steer by). For each:

* frac@10: over all queries, the mean fraction of the top 10 that activate the latent (value > 0
  in the document's code), unsteered, then with ``suppress`` (strength ``--strength``), with
  ``exclude`` (hard post-filter) and with ``boost`` (strength ``--boost``).
* affected: the queries whose unsteered top 10 holds a document activating the latent; their
  nDCG@10 before and after ``suppress`` (what removing the concept costs or gains the queries it
  touched: a measure that moves with the model and the latent, not zero by construction).
* changed@10 q-unrelated: over the queries whose own code lacks the latent, the mean fraction of
  their top 10 that differs after ``suppress`` and after ``boost`` (collateral change for queries
  that never asked for the concept; their results may hold documents that activate it).
* kept@10: over the affected queries, the fraction of their unsteered top-10 documents that do NOT
  activate the latent and are still in the top 10 after ``suppress`` (suppressing a concept must
  demote only documents carrying it: a value below 1.000 is a steering bug).
* dnDCG@10 q-unrelated and all (suppress and boost), for scale.

    .venv/bin/python benchmarks/bench_steering.py --run runs/quickstart \
        --beir ../shared/data/debian-descriptions/beir-dev --split dev

Codes are cached in ``--cache`` (npz with the model fingerprint; a stale cache of another model
is refused and re-encoded).
"""

import argparse
import datetime
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from saejax.data.beir import load_beir
from saejax.eval import quickeval
from saejax.hub import trained
from saejax.interpret import labels as labels_lib, latents as interpret, steer
from saejax.retrieval.encode import EncodeConfig, encode_sparse
from saejax.retrieval.index import IDF_POWER, SparseIndex

REPO = Path(__file__).resolve().parents[1]


def _codes(model, tokenizer, texts, k, max_len, cache: Path, fingerprint: str, what: str):
  path = cache / f"{what}.npz"
  if path.is_file():
    try:
      stored = interpret.load_codes(path, fingerprint=fingerprint)
      if stored.values.shape[0] == len(texts):
        return stored.values, stored.indices
    except interpret.FingerprintError:
      pass
  codes = encode_sparse(model, tokenizer, texts, k, EncodeConfig(max_len=max_len, batch_size=64),
                        desc=what)
  cache.mkdir(parents=True, exist_ok=True)
  interpret.save_codes(path, interpret.StoredCodes(codes.values, codes.indices,
                                                   model.sae.config.num_latents, fingerprint))
  return codes.values, codes.indices


def _ndcg(data, qrels_subset, scores, ids) -> float:
  run = quickeval.to_run(data, np.where(ids >= 0, ids, 0), np.where(ids >= 0, scores, -np.inf))
  run = {q: r for q, r in run.items() if q in qrels_subset}
  if not qrels_subset:
    return float("nan")
  return quickeval.evaluate(qrels_subset, run)["ndcg@10"]


def changed_fraction(before: np.ndarray, after: np.ndarray) -> np.ndarray:
  """Per query, the fraction of its unsteered results (ids >= 0) missing from its steered ones."""
  out = np.zeros(len(before))
  for row, (b, a) in enumerate(zip(before, after)):
    b = set(b[b >= 0].tolist())
    out[row] = len(b - set(a[a >= 0].tolist())) / len(b) if b else 0.0
  return out


def kept_non_activating(before: np.ndarray, after: np.ndarray, docs, latent: int) -> float:
  """Of the unsteered results that do not activate ``latent`` (over all given queries), the
  fraction still among the steered results."""
  plain = (before >= 0) & (docs.activation(before, latent) <= 0)
  kept = sum(int(np.isin(b[m], a).sum()) for b, a, m in zip(before, after, plain))
  total = int(plain.sum())
  return kept / total if total else float("nan")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", default=str(REPO / "runs/quickstart"))
  p.add_argument("--beir", default=str(REPO.parent / "shared/data/debian-descriptions/beir-dev"))
  p.add_argument("--split", default="dev")
  p.add_argument("--max_docs", type=int, default=0)
  p.add_argument("--latents", type=int, default=8)
  p.add_argument("--max_frequency", type=float, default=0.2)
  p.add_argument("--strength", type=float, default=1.0, help="suppress strength")
  p.add_argument("--boost", type=float, default=0.5, help="boost strength")
  p.add_argument("--cache", default="/tmp/saejax_bench_steering")
  p.add_argument("--idf_power", type=float, default=IDF_POWER,
                 help="the index's idf weighting (default: what saejax searches with; 0: plain)")
  args = p.parse_args()

  start = time.time()
  config, model, tokenizer = trained.load_run(args.run)
  fingerprint = interpret.model_fingerprint(model)
  data = load_beir(args.beir, args.split, max_docs=args.max_docs)
  s = model.sae.config.num_latents
  cache = Path(args.cache)
  d_v, d_i = _codes(model, tokenizer, data.docs, None, config.data.max_doc_len, cache,
                    fingerprint, "docs")
  q_v, q_i = _codes(model, tokenizer, data.queries, None, config.data.max_query_len, cache,
                    fingerprint, "queries")
  encoded = time.time()
  index = SparseIndex.build(d_v, d_i, s, idf_power=args.idf_power)
  docs = steer.DocActivations(d_v, d_i, s)
  search = steer.SteeredSearch(index, docs)
  scores0, ids0 = search.search(q_v, q_i, 10)
  stats = interpret.latent_stats(d_v, d_i, s)
  labs = labels_lib.label_latents(list(data.docs), d_v, d_i, s, fingerprint=fingerprint)

  # Latents by number of (query, result) pairs that activate them, generic ones skipped.
  pairs = np.bincount(d_i[ids0[ids0 >= 0]][d_v[ids0[ids0 >= 0]] > 0], minlength=s)
  candidates = [j for j in np.argsort(-pairs, kind="stable")
                if stats.frequency[j] <= args.max_frequency][:args.latents]
  qids = np.asarray(data.query_ids)
  all_q = data.qrels
  rows = []
  for j in candidates:
    j = int(j)
    base = steer.fraction_activating(ids0, docs, j)
    q_has = ((q_i == j) & (q_v > 0)).any(1)
    affected = {q: all_q[q] for q in qids[base > 0] if q in all_q}
    q_unrelated = {q: all_q[q] for q in qids[~q_has] if q in all_q}
    results = {}
    for name, steering in (("suppress", steer.Steering.by_id(suppress=[j], strength=args.strength)),
                           ("exclude", steer.Steering.by_id(exclude=[j])),
                           ("boost", steer.Steering.by_id(boost=[j], strength=args.boost))):
      results[name] = search.search(q_v, q_i, 10, steering)
    row = {"latent": j, "label": labs.text(j), "doc freq": stats.frequency[j],
           "queries hit": int((base > 0).sum()), "frac@10": base.mean()}
    for name, (sc, ids) in results.items():
      row[f"frac {name}"] = steer.fraction_activating(ids, docs, j).mean()
    sc_s, ids_s = results["suppress"]
    sc_b, ids_b = results["boost"]
    row["nDCG affected"] = _ndcg(data, affected, scores0, ids0)
    row["nDCG affected (supp)"] = _ndcg(data, affected, sc_s, ids_s)
    row["n affected"] = len(affected)
    row["changed q-unrel (supp)"] = changed_fraction(ids0[~q_has], ids_s[~q_has]).mean()
    row["changed q-unrel (boost)"] = changed_fraction(ids0[~q_has], ids_b[~q_has]).mean()
    row["n q-unrel"] = int((~q_has).sum())
    row["kept@10"] = kept_non_activating(ids0[base > 0], ids_s[base > 0], docs, j)
    row["dnDCG q-unrel (supp)"] = (_ndcg(data, q_unrelated, sc_s, ids_s)
                                   - _ndcg(data, q_unrelated, scores0, ids0))
    row["dnDCG all (supp)"] = _ndcg(data, all_q, sc_s, ids_s) - _ndcg(data, all_q, scores0, ids0)
    row["dnDCG all (boost)"] = _ndcg(data, all_q, sc_b, ids_b) - _ndcg(data, all_q, scores0, ids0)
    rows.append(row)

  commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
  machine = platform.processor() or platform.machine()
  print(f"# bench_steering {datetime.date.today()} on {platform.node()} ({machine}), "
        f"commit {commit}")
  print(f"run {args.run} (S={s}, k={model.sae.config.k}, fingerprint {fingerprint}); "
        f"{len(data.docs)} docs, {len(data.queries)} queries of {args.beir} [{args.split}]; "
        f"baseline nDCG@10 {_ndcg(data, all_q, scores0, ids0):.4f}")
  print(f"index idf power {args.idf_power:g}; suppress strength {args.strength}, boost strength "
        f"{args.boost}; encode "
        f"{encoded - start:.0f} s, total {time.time() - start:.0f} s")
  print(labels_lib.label_quality(labs))
  print()
  cols = list(rows[0])
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    print("| " + " | ".join(f"{v:+.4f}" if c.startswith("dnDCG") else
                             f"{v:.4f}" if c.startswith("nDCG") else
                             f"{v:.3f}" if isinstance(v, float) else str(v)
                             for c, v in r.items()) + " |")


if __name__ == "__main__":
  main()
