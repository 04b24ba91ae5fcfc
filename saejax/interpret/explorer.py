"""A static, self-contained HTML feature explorer for a trained SAE embedder.

    python -m saejax.interpret.explorer --run runs/quickstart \
        --beir data/debian-quickstart/beir-dev --split dev --out report.html

One file, no server: CSS and JavaScript inline, the data as embedded JSON. It shows

* every listed latent with its label (`saejax.interpret.labels`), firing frequency, mean activation,
  held-out label AUC and co-activation family (`saejax.interpret.latents`), filterable by label
  words;
* a histogram of latent firing frequencies (inline SVG, drawn at build time: visible without JS);
* a latent's top documents with the tokens that drive it highlighted (leave-one-token-out
  evidence, `saejax.interpret.latents.token_evidence`);
* a search box over the corpus' queries: a query's active latents, its top documents, and steer
  buttons (boost / suppress / exclude / only per latent) that re-rank in the page with the same
  arithmetic as `saejax.interpret.steer` (sparse dot product over the embedded document codes).

Codes and labels can come precomputed (``--codes``, ``--labels``); both carry the fingerprint of
the model that made them (`saejax.interpret.latents.model_fingerprint`) and a mismatch with
``--run``'s model is refused (`FingerprintError`), so a report never pairs one model's latents with
another's documents.
"""

import dataclasses
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jaxtyping import Int
from tokenizers import Tokenizer

from saejax import cli
from saejax.errors import ConfigError, DataError
from saejax.interpret import labels as labels_lib, latents as latents_lib
from saejax.retrieval.encode import EncodeConfig, encode_sparse
from saejax.sae.embedder import Embedder

TEMPLATE = Path(__file__).with_name("explorer_template.html")
# Characters written as \uXXXX in the page's embedded JSON (`script_json`).
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


@dataclasses.dataclass(frozen=True)
class ExplorerConfig:
  """What the report holds.

  Attributes:
    latents: latents listed (the most frequent live ones).
    top_docs: top documents shown per latent.
    evidence_latents: latents (most frequent first) whose top documents get token evidence.
    evidence_docs: top documents per such latent that get token evidence.
    doc_chars: characters of a document shown.
    max_doc_len: token budget of documents.
    max_query_len: token budget of queries.
    batch_size: texts per forward pass.
  """
  latents: int = 300
  top_docs: int = 5
  evidence_latents: int = 40
  evidence_docs: int = 3
  doc_chars: int = 400
  max_doc_len: int = 256
  max_query_len: int = 64
  batch_size: int = 64

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if not isinstance(value, int) or value < (0 if f.name.startswith("evidence") else 1):
        raise ConfigError(f"ExplorerConfig.{f.name}={value!r} must be a positive int")


def _histogram_svg(frequency: np.ndarray, num_dead: int, width: int = 380,
                   height: int = 170) -> str:
  """Inline SVG histogram of log10 firing frequency of live latents."""
  live = frequency[frequency > 0]
  if live.size == 0:
    return "<svg id='histogram' width='0' height='0'></svg>"
  logs = np.log10(live)
  lo, hi = math.floor(logs.min()), max(math.ceil(logs.max()), math.floor(logs.min()) + 1)
  counts, edges = np.histogram(logs, bins=4 * (hi - lo), range=(lo, hi))
  pad, top = 30, counts.max()
  bar_w = (width - 2 * pad) / len(counts)
  parts = [f"<svg id='histogram' xmlns='http://www.w3.org/2000/svg' width='{width}' "
           f"height='{height + 40}' role='img' aria-label='latent frequency histogram'>"]
  for i, c in enumerate(counts):
    h = (height - 20) * c / top
    parts.append(f"<rect x='{pad + i * bar_w:.1f}' y='{height - h:.1f}' width='{bar_w - 1:.1f}' "
                 f"height='{h:.1f}' fill='#4a7ab5'><title>{c} latents, frequency "
                 f"10^{edges[i]:.2f}-10^{edges[i + 1]:.2f}</title></rect>")
  for e in range(lo, hi + 1):
    x = pad + (e - lo) * 4 * bar_w
    parts.append(f"<text x='{x:.1f}' y='{height + 15}' font-size='11' text-anchor='middle'>"
                 f"1e{e}</text>")
  parts.append(f"<text x='{width / 2}' y='{height + 33}' font-size='12' text-anchor='middle'>"
               f"firing frequency, log scale ({live.size} live, {num_dead} dead)</text></svg>")
  return "".join(parts)


def _js_offsets(text: str) -> Int[np.ndarray, "C+1"]:
  """Where each character offset of ``text`` (what the tokenizer's offsets count: code points)
  lies in JavaScript's string (UTF-16 code units, what the page's ``slice`` counts): a character
  beyond U+FFFF (an emoji, a math letter) is two units there, so later offsets shift by one."""
  wide = np.fromiter((ord(c) > 0xFFFF for c in text), bool, len(text))
  return np.arange(len(text) + 1) + np.concatenate([[0], np.cumsum(wide)])


def collect(model: Embedder, tokenizer: Tokenizer, docs: Sequence[str], queries: Sequence[str], *,
            codes: latents_lib.StoredCodes | None = None,
            labels: labels_lib.LatentLabels | None = None,
            config: ExplorerConfig = ExplorerConfig(), title: str = "saejax feature explorer"
            ) -> dict:
  """Everything the page shows, as one JSON-able dict.

  Args:
    model: the trained embedder.
    tokenizer: its tokenizer.
    docs: the corpus documents.
    queries: queries offered in the search box.
    codes: precomputed document codes (`latents.save_codes`); refused if another model made
      them or if they are not one row per document.
    labels: precomputed labels (`labels.load_labels`); refused if another model's.
    config: what the report holds.
    title: page title.

  Raises:
    FingerprintError: codes or labels of another model.
  """
  fingerprint = latents_lib.model_fingerprint(model)
  s = model.sae.config.num_latents
  enc = lambda n: EncodeConfig(max_len=n, batch_size=config.batch_size, progress=False)
  if codes is not None:
    latents_lib.check_fingerprint(fingerprint, codes.fingerprint, "the document codes")
    if codes.values.shape[0] != len(docs):
      raise DataError(f"the codes hold {codes.values.shape[0]} documents but {len(docs)} "
                      f"documents were given: they are not this corpus' codes")
    d_v, d_i = codes.values, codes.indices
  else:
    d = encode_sparse(model, tokenizer, docs, None, enc(config.max_doc_len))
    d_v, d_i = d.values, d.indices
  if labels is not None:
    latents_lib.check_fingerprint(fingerprint, labels.fingerprint, "the labels")
  else:
    labels = labels_lib.label_latents(docs, d_v, d_i, s, fingerprint=fingerprint)
  q = encode_sparse(model, tokenizer, queries, None, enc(config.max_query_len))

  stats = latents_lib.latent_stats(d_v, d_i, s)
  families = latents_lib.latent_families(latents_lib.coactivation(d_v, d_i, s))
  listed = stats.live[np.argsort(-stats.counts[stats.live], kind="stable")][:config.latents]
  top_rows, top_acts = latents_lib.top_documents(d_v, d_i, s, listed, config.top_docs)

  # Token evidence: one leave-one-token-out pass per document, for all latents it is shown for.
  wanted: dict[int, list[int]] = {}
  for j, rows in zip(listed[:config.evidence_latents], top_rows[:config.evidence_latents]):
    for r in rows[:config.evidence_docs]:
      if r >= 0:
        wanted.setdefault(int(r), []).append(int(j))
  spans: dict[tuple[int, int], list] = {}
  doc_rows = sorted(wanted)
  evidence = latents_lib.token_evidence(model, tokenizer, [docs[r] for r in doc_rows],
                                        [wanted[r] for r in doc_rows],
                                        max_len=config.max_doc_len)
  for r, ev in zip(doc_rows, evidence):
    js = _js_offsets(docs[r])
    for col, j in enumerate(ev.latents):
      score = ev.scores[:, col]
      peak = score.max()
      if peak <= 0:
        continue
      spans[(j, r)] = [[int(js[a]), int(js[b]), round(float(w / peak), 3)]
                       for (a, b), w in zip(ev.offsets, score)
                       if w > 0 and b > a and b <= config.doc_chars]

  latents = []
  for j, rows, acts in zip(listed, top_rows, top_acts):
    j = int(j)
    lab = labels.labels.get(j)
    latents.append({
        "id": j, "label": lab.label if lab else "", "terms": list(lab.terms) if lab else [],
        "freq": float(stats.frequency[j]), "mean": float(stats.mean_activation[j]),
        "max": float(stats.max_activation[j]), "auc": lab.auc if lab else None,
        "family": int(families[j]),
        "top": [{"doc": int(r), "act": round(float(a), 4), "spans": spans.get((j, int(r)))}
                for r, a in zip(rows, acts) if r >= 0]})
  all_labels = {str(j): x.label for j, x in labels.labels.items() if x.label}
  return {
      "title": title,
      "model": {"fingerprint": fingerprint, "num_latents": s, "k": model.sae.config.k,
                "num_docs": len(docs), "num_queries": len(queries),
                "dead": int(stats.dead.sum()), "hot": int(stats.hot.sum()),
                "label_quality": labels_lib.label_quality(labels)},
      "latents": latents,
      "labels": all_labels,
      "docs": [d[:config.doc_chars] for d in docs],
      "doc_codes": [[[int(i) for i, v in zip(ri, rv) if v > 0],
                     [round(float(v), 4) for v in rv if v > 0]] for ri, rv in zip(d_i, d_v)],
      "queries": [{"text": t, "idx": [int(i) for i, v in zip(ri, rv) if v > 0],
                   "val": [round(float(v), 4) for v in rv if v > 0]}
                  for t, ri, rv in zip(queries, q.indices, q.values)],
      "histogram_svg": _histogram_svg(stats.frequency, int(stats.dead.sum())),
  }


def render(payload: dict) -> str:
  """The HTML page of a `collect` payload."""
  template = TEMPLATE.read_text(encoding="utf-8")
  return (template.replace("{{TITLE}}", html.escape(payload["title"]))
          .replace("{{HISTOGRAM}}", payload["histogram_svg"])
          .replace("{{DATA}}", script_json(payload)))


def script_json(payload: dict) -> str:
  """``payload`` as JSON safe to embed in a <script> element.

  Inside a script the HTML parser reacts to "<" alone ("</script", and "<!--" followed by
  "<script", which makes it swallow the page's own script: HTML spec, "Restrictions for contents
  of script elements"), so every "<" becomes \\u003c; ">" and "&" too, as Django's json_script
  does. ``ensure_ascii`` writes U+2028 / U+2029 as escapes as well. These characters occur only
  inside JSON strings, so the result is still valid JSON and parses to ``payload``.
  """
  text = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
  return text.translate(_SCRIPT_ESCAPES)


def write_report(path: str | Path, payload: dict) -> Path:
  """Write the page to ``path``."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(render(payload), encoding="utf-8")
  return path


def main(argv: Sequence[str] | None = None) -> Path:
  """The command line (see the module docstring)."""
  from saejax.data.beir import load_beir
  from saejax.hub import trained
  p = cli.ArgumentParser(prog="python -m saejax.interpret.explorer",
                         description=__doc__.splitlines()[0])
  p.add_argument("--run", required=True, help="training workdir (saejax.hub.trained.load_run)")
  p.add_argument("--beir", required=True, help="BEIR folder: corpus, queries, qrels/<split>.tsv")
  p.add_argument("--split", default="dev")
  p.add_argument("--out", required=True, help="the HTML file to write")
  p.add_argument("--max-docs", "--max_docs", dest="max_docs", type=int, default=1000,
                 help="subsample the corpus (0: all)")
  p.add_argument("--max-queries", "--max_queries", dest="max_queries", type=int, default=300,
                 help="queries in the search box")
  p.add_argument("--codes", help="precomputed document codes (.npz from latents.save_codes)")
  p.add_argument("--labels", help="precomputed latent_labels.json")
  p.add_argument("--latents", type=int, default=ExplorerConfig.latents)
  p.add_argument("--evidence-latents", "--evidence_latents", dest="evidence_latents", type=int,
                 default=ExplorerConfig.evidence_latents)
  args = p.parse_args(argv)
  if args.max_queries < 0:
    raise ConfigError(f"--max-queries={args.max_queries} must be >= 0")
  config, model, tokenizer = trained.load_run(args.run)
  if model.sae is None:
    raise ConfigError(f"--run {args.run} has no SAE (trained with sae.enabled=False, a dense "
                      f"ablation): the explorer shows SAE latents; pass a run trained with an SAE")
  data = load_beir(args.beir, args.split, max_docs=args.max_docs)
  fingerprint = latents_lib.model_fingerprint(model)
  codes = latents_lib.load_codes(args.codes, fingerprint=fingerprint) if args.codes else None
  labels = labels_lib.load_labels(args.labels, fingerprint=fingerprint) if args.labels else None
  cfg = ExplorerConfig(latents=args.latents, evidence_latents=args.evidence_latents,
                       max_doc_len=int(config.data.max_doc_len),
                       max_query_len=int(config.data.max_query_len))
  payload = collect(model, tokenizer, list(data.docs), list(data.queries[:args.max_queries]),
                    codes=codes, labels=labels, config=cfg,
                    title=f"saejax explorer: {Path(args.run).name}")
  out = write_report(args.out, payload)
  print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(payload['latents'])} latents, "
        f"{len(data.docs)} documents, {len(payload['queries'])} queries")
  return out


if __name__ == "__main__":
  cli.run(main)
