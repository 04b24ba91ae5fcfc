"""A saejax model for the `mteb` package (Massive Text Embedding Benchmark, Muennighoff et al.,
EACL 2023), written against mteb 2.x's model protocols (checked with mteb 2.26).

    import mteb
    from saejax.eval.mteb_adapter import SaejaxMTEB
    model = SaejaxMTEB.from_path("runs/quickstart")         # a run's workdir or an export
    mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]))  # where the hub is reachable

`SaejaxMTEB` implements both protocols mteb 2 defines for text models:
  * `mteb.SearchProtocol` (``index`` / ``search``): used by mteb for retrieval tasks whenever a
    model provides it. The corpus goes into saejax's exact `SparseIndex` and queries are scored
    by the dot product of the sparse codes, as the model is trained, with the query k and the
    document k of the adapter: mteb then measures exactly what `saejax.eval.harness` measures.
  * `mteb.EncoderProtocol` (``encode`` / ``similarity`` / ``similarity_pairwise``): every other
    task type (STS, classification, clustering, ...). mteb's encoder protocol has only dense
    arrays, so a sparse code is returned scattered into a dense [N, S] float32 array (S = the
    SAE's latents; N x S x 4 bytes, mind it for large N) with the dot product as its similarity
    (``ModelMeta.similarity_fn_name = "dot"``, ``model_type = ["sparse"]``). A model without SAE
    (the dense ablation) returns its mean-pooled [N, D] vectors with cosine similarity.

Texts are assembled as mteb's own dataloaders do: a document is "title text", a query is its text
followed by its instruction where the task has one. Conversation queries (lists of turns) are
not supported (a ConfigError). Queries use k_query and max_query_len; documents, and texts of
non-retrieval tasks (no prompt type), use k_doc and max_doc_len.

`beir_task` builds an mteb retrieval task from a local BEIR folder, so that mteb runs offline
(tests/test_eval.py checks that mteb's nDCG@10 equals the harness's on one).
"""

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType
from tokenizers import Tokenizer

from saejax.data.beir import load_beir
from saejax.data.sources import beir_document
from saejax.errors import ConfigError, DataError
from saejax.eval import harness
from saejax.eval import quickeval
from saejax.retrieval.encode import EncodeConfig, encode_dense, encode_sparse
from saejax.retrieval.index import IDF_POWER, SparseIndex
from saejax.sae.embedder import Embedder


def _param_count(model) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


class SaejaxMTEB(AbsEncoder):
  """A saejax model under mteb's `EncoderProtocol` and `SearchProtocol` (module docstring).

  Args:
    model: a saejax `Embedder` (``sae=None``: a dense model).
    tokenizer: its tokenizer.
    name: the model's name in mteb's results (``org/name``).
    k_query: latents per query (None: the training k).
    k_doc: latents per document and per text of non-retrieval tasks (None: the training k).
    max_query_len: query token budget.
    max_doc_len: document token budget.
    batch_size: texts per forward pass.
    idf_power: retrieval scores the idf-weighted cosine of the codes with this power
      (`saejax.retrieval.index`; 0: the plain cosine).
  """

  def __init__(self, model: Embedder, tokenizer: Tokenizer, *, name: str = "saejax/model",
               k_query: int | None = None, k_doc: int | None = None, max_query_len: int = 64,
               max_doc_len: int = 256, batch_size: int = 64, idf_power: float = IDF_POWER):
    self.model, self.tokenizer = model, tokenizer
    self.idf_power = idf_power
    self.sparse = model.sae is not None
    k = model.sae.config.k if self.sparse else None
    self.k_query, self.k_doc = k_query or k, k_doc or k
    budgets = harness.HarnessConfig(max_query_len=max_query_len, max_doc_len=max_doc_len)
    self.max_query_len, self.max_doc_len = harness.token_budgets(budgets, model.encoder)
    self.batch_size = batch_size
    self._index: SparseIndex | None = None
    self._dense_docs: np.ndarray | None = None
    self._doc_ids: list[str] = []
    width = model.sae.config.num_latents if self.sparse else model.encoder.cfg.hidden_size
    self.mteb_model_meta = ModelMeta(
        loader=None, name=name if "/" in name else f"saejax/{name}", revision=None,
        release_date=None, languages=None, n_parameters=_param_count(model), memory_usage_mb=None,
        max_tokens=self.max_doc_len, embed_dim=width, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["JAX"],
        similarity_fn_name="dot" if self.sparse else "cosine", use_instructions=False,
        training_datasets=None, model_type=["sparse" if self.sparse else "dense"])

  @classmethod
  def from_path(cls, path: str | Path, **kwargs) -> "SaejaxMTEB":
    """Load a run's workdir or an exported SparseEncoder directory (`harness.load_system`); the
    token budgets default to the ones the model was trained with."""
    system = harness.load_system(path)
    if system.trained_lens:
      kwargs = {"max_query_len": system.trained_lens[0], "max_doc_len": system.trained_lens[1],
                **kwargs}
    model = system.model if isinstance(system, harness.SparseSystem) else Embedder(
        system.encoder, None)
    return cls(model, system.tokenizer, **{"name": f"saejax/{system.name}", **kwargs})

  # -------------------------------------------------------------------------------------------
  # Encoding

  def _budget(self, prompt_type: PromptType | None) -> tuple[int | None, EncodeConfig]:
    query = prompt_type == PromptType.query
    return (self.k_query if query else self.k_doc), EncodeConfig(
        max_len=self.max_query_len if query else self.max_doc_len, batch_size=self.batch_size,
        progress=False)

  def _codes(self, texts: Sequence[str], prompt_type: PromptType | None):
    k, config = self._budget(prompt_type)
    return encode_sparse(self.model, self.tokenizer, texts, k, config, desc="mteb")

  def _dense(self, texts: Sequence[str], prompt_type: PromptType | None) -> np.ndarray:
    _, config = self._budget(prompt_type)
    return encode_dense(self.model.encoder, self.tokenizer, texts, config, desc="mteb").v

  def encode_texts(self, texts: Sequence[str],
                   prompt_type: PromptType | None = None) -> np.ndarray:
    """[N, S] scattered sparse codes (or [N, D] pooled vectors of a dense model), float32."""
    if not self.sparse:
      return self._dense(texts, prompt_type)
    codes = self._codes(texts, prompt_type)
    out = np.zeros((len(texts), self.model.sae.config.num_latents), np.float32)
    np.add.at(out, (np.arange(len(texts))[:, None], codes.indices), codes.values)
    return out

  def encode(self, inputs: Iterable[dict], *, task_metadata: TaskMetadata, hf_split: str,
             hf_subset: str, prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
    """mteb's `EncoderProtocol.encode`: the texts of every batch of ``inputs``, encoded."""
    del task_metadata, hf_split, hf_subset, kwargs  # one model for every task; no prompts
    texts = []
    for batch in inputs:
      if "text" not in batch:
        raise DataError(f"mteb batch has no 'text' column (columns {sorted(batch)}): saejax "
                        f"encodes text only")
      texts.extend(batch["text"])
    return self.encode_texts(_strings(texts, "input"), prompt_type)

  # -------------------------------------------------------------------------------------------
  # Search

  def index(self, corpus, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
            encode_kwargs: dict, num_proc: int | None = None, **kwargs: Any) -> None:
    """mteb's `SearchProtocol.index`: encode the corpus and build the exact sparse index."""
    del task_metadata, hf_split, hf_subset, encode_kwargs, num_proc, kwargs
    titles = corpus["title"] if "title" in corpus.column_names else [""] * len(corpus)
    texts = [beir_document({"title": t, "text": x}) for t, x in zip(titles, corpus["text"])]
    self._doc_ids = [str(i) for i in corpus["id"]]
    texts = _strings(texts, "corpus")
    if self.sparse:
      codes = self._codes(texts, PromptType.document)
      self._index = SparseIndex.build(codes.values, codes.indices,
                                      self.model.sae.config.num_latents, idf_power=self.idf_power)
    else:
      self._dense_docs = self._dense(texts, PromptType.document)

  def search(self, queries, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
             top_k: int, encode_kwargs: dict, top_ranked: dict | None = None,
             num_proc: int | None = None, **kwargs: Any) -> dict[str, dict[str, float]]:
    """mteb's `SearchProtocol.search`: {query id: {document id: score}}, ``top_k`` each.

    With ``top_ranked`` (reranking tasks) only each query's listed documents are kept, still
    scored by the model.
    """
    del task_metadata, hf_split, hf_subset, encode_kwargs, num_proc, kwargs
    if self._index is None and self._dense_docs is None:
      raise ConfigError("search() before index(): mteb indexes the corpus first")
    texts = list(queries["text"])
    if "instruction" in queries.column_names:
      texts = [t if i is None else f"{t} {i}" for t, i in zip(texts, queries["instruction"])]
    texts = _strings(texts, "queries")
    depth = len(self._doc_ids) if top_ranked is not None else top_k
    if self.sparse:
      codes = self._codes(texts, PromptType.query)
      scores, rows = self._index.search(codes.values, codes.indices, depth)
    else:
      rows, scores = quickeval.search_dense(self._dense(texts, PromptType.query),
                                            self._dense_docs, depth)
    out = {}
    for qid, row_ids, row_scores in zip(queries["id"], rows, scores):
      hits = {self._doc_ids[r]: float(s) for r, s in zip(row_ids, row_scores)
              if r >= 0 and np.isfinite(s)}
      if top_ranked is not None:
        allowed = set(top_ranked.get(qid, ()))
        hits = {d: s for d, s in hits.items() if d in allowed}
      out[str(qid)] = dict(sorted(hits.items(), key=lambda x: -x[1])[:top_k])
    return out


def _strings(texts: Sequence, what: str) -> list[str]:
  bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
  if bad is not None:
    raise ConfigError(f"mteb {what} row {bad} is a {type(texts[bad]).__name__}, not a string: "
                      f"saejax supports text inputs only (no conversations or images)")
  return list(texts)


# ---------------------------------------------------------------------------------------------
# A local task

def beir_task(folder: str | Path, split: str = "test", *, name: str | None = None,
              max_docs: int = 0, seed: int = 0) -> AbsTaskRetrieval:
  """An mteb retrieval task over a local BEIR folder (read by `load_beir`), offline.

  Args:
    folder: BEIR folder.
    split: qrels split (the task's eval split).
    name: the task's name (default: ``Local`` + the folder's name).
    max_docs: subsample the corpus (0: all).
    seed: seed of the subsample.
  """
  from datasets import Dataset  # pylint: disable=import-outside-toplevel  (an mteb dependency)
  data = load_beir(folder, split, max_docs=max_docs, seed=seed)
  task_name = name or "Local" + "".join(p.capitalize() for p in Path(folder).name.split("-"))
  metadata = TaskMetadata(
      name=task_name, description=f"The BEIR folder {folder}, split {split}, read locally.",
      reference=None, dataset={"path": str(folder), "revision": "local"}, type="Retrieval",
      category="t2t", modalities=["text"], eval_splits=[split], eval_langs=["eng-Latn"],
      main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
      annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)
  split_data = RetrievalSplitData(
      queries=Dataset.from_dict({"id": list(data.query_ids), "text": list(data.queries)}),
      # load_beir joined "title text" already; an empty title keeps the join as it is.
      corpus=Dataset.from_dict({"id": list(data.doc_ids), "text": list(data.docs),
                                "title": [""] * len(data.docs)}),
      relevant_docs=data.qrels, top_ranked=None)

  class LocalBeirRetrieval(AbsTaskRetrieval):
    """A BEIR folder on disk as an mteb retrieval task."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
      del num_proc, kwargs
      self.dataset = {"default": {split: split_data}}
      self.data_loaded = True

  LocalBeirRetrieval.metadata = metadata
  LocalBeirRetrieval.__name__ = task_name
  return LocalBeirRetrieval()
