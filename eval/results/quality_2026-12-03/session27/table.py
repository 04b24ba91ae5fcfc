"""Session 27: the README/RESULTS table from runs/s27/eval/results.json (a copy: results.json here)."""
import json
r = json.load(open("runs/s27/eval/results.json"))
D = r["datasets"]
sets = ["scifact", "scifact-unseen", "cranfield", "debian"]
names = list(D["scifact"]["systems"])
print("| system | SciFact | SciFact unseen | Cranfield | Debian | mean | unseen mean | k = 32 | k = 128 | queries at 128 / 256 / 512 |")
for n in names:
  s = {d: D[d]["systems"][n] for d in sets}
  nd = {d: s[d]["ndcg@10"] for d in sets}
  mean = (nd["scifact"] + nd["cranfield"] + nd["debian"]) / 3
  unseen = (nd["scifact-unseen"] + nd["cranfield"] + nd["debian"]) / 3
  def ksw(k):
    rows = [next((x["ndcg@10"] for x in s[d].get("k_sweep", []) if x["k"] == k), None) for d in ("scifact", "cranfield", "debian")]
    return "-" if None in rows else f"{sum(rows) / 3:.3f}"
  def qk(k):
    rows = [next((x["ndcg@10"] for x in s[d].get("k_query_sweep", []) if x["k_query"] == k), None) for d in ("scifact", "cranfield", "debian")]
    return "-" if None in rows else f"{sum(rows) / 3:.3f}"
  print(f"| {n} | {nd['scifact']:.4f} | {nd['scifact-unseen']:.4f} | {nd['cranfield']:.4f} | {nd['debian']:.4f} | **{mean:.4f}** | {unseen:.4f} | {ksw(32)} | {ksw(128)} | {qk(128)} / {qk(256)} / {qk(512)} |")
print()
for n in names:
  s = D["scifact"]["systems"][n]
  if "k_sweep" in s:
    ks = [x["k"] for x in s["k_sweep"]]
    means = [sum(next(x["ndcg@10"] for x in D[d]["systems"][n]["k_sweep"] if x["k"] == k) for d in ("scifact", "cranfield", "debian")) / 3 for k in ks]
    print(n, "mean vs k:", ", ".join(f"{k}: {m:.3f}" for k, m in zip(ks, means)))
for n in names:
  for d in ("scifact", "cranfield", "debian"):
    s = D[d]["systems"][n]
    if "hot_fraction" in s:
      print(n, d, "dead", f"{s['dead_fraction']:.1%}", "hot", round(s["hot_fraction"] * s["num_latents"]), "encode s", round(s["encode_queries_s"] + s["encode_docs_s"], 1))
    elif "encode_docs_s" in s:
      print(n, d, "encode s", round(s["encode_queries_s"] + s["encode_docs_s"], 1))
