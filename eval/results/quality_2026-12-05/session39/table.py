"""Per-set and mean nDCG@10 of a quality report (results.json): the tables of RESULTS.md."""
import json, sys
r = json.load(open(sys.argv[1]))
d = r["datasets"]
MEAN = ("scifact", "cranfield", "debian")
for name in d["scifact"]["systems"]:
  nd = {s: d[s]["systems"][name]["ndcg@10"] for s in d}
  mean = sum(nd[s] for s in MEAN) / 3
  unseen = (nd["scifact-unseen"] + nd["cranfield"] + nd["debian"]) / 3
  line = f"{name}: " + " / ".join(f"{nd[s]:.4f}" for s in ("scifact", "scifact-unseen", "cranfield", "debian"))
  line += f"  mean {mean:.4f} unseen-mean {unseen:.4f}"
  sys_ = d["scifact"]["systems"][name]
  if sys_.get("k_sweep"):
    ksm = {e["k"]: sum(next(x for x in d[s]["systems"][name]["k_sweep"] if x["k"] == e["k"])["ndcg@10"] for s in MEAN) / 3 for e in sys_["k_sweep"]}
    line += "  k: " + " / ".join(f"{v:.3f}" for v in ksm.values())
  if sys_.get("k_query_sweep"):
    qsm = {e["k_query"] if "k_query" in e else e["k"]: sum(next(x for x in d[s]["systems"][name]["k_query_sweep"] if x.get("k_query", x.get("k")) == e.get("k_query", e.get("k")))["ndcg@10"] for s in MEAN) / 3 for e in sys_["k_query_sweep"]}
    line += "  q: " + " / ".join(f"{v:.3f}" for v in qsm.values())
  print(line)
