"""saejax <-> sentence-transformers: export a trained model as a `SparseEncoder`, import one back.

Export (``python -m saejax.hub.export --ckpt WORKDIR --out DIR``) writes the directory that
sentence-transformers itself writes for ``SparseEncoder(modules=[Transformer, Pooling("mean"),
SparseAutoEncoder])`` (CSR: Wen et al., ICML 2025, "Beyond Matryoshka: Revisiting Sparse Coding
for Adaptive Representation"), followed by ``Normalize`` when the SAE's
`saejax.sae.topk.SAEConfig.normalize_codes` is set: saejax's embedding is then the code scaled to
unit L2 norm (`saejax.sae.topk.SAE.embed`), and sentence-transformers' ``Normalize`` module
L2-normalises the ``sentence_embedding`` the SparseAutoEncoder outputs (a dense [B, S] tensor with k
non-zeros, so sparsity is kept). The SparseAutoEncoder's own ``normalize`` option is something else,
a LayerNorm of its input, and stays False. The files are produced by sentence-transformers' own
``save``, so the layout is the installed version's, with two saejax-specific changes:

  * ``2_SparseAutoEncoder/model.safetensors`` holds exactly ``pre_bias``, ``latent_bias``,
    ``stats_last_nonzero`` (int64) and ``encoder.weight`` [S, D] (= saejax ``w_enc``.T).
    sentence-transformers ties its decoder to the encoder, but its inference forward reads only
    the encoder: ``ReLU(TopK((v - pre_bias) @ encoder.weight.T + latent_bias))`` with
    ``normalize=False`` (no LayerNorm of v), which is saejax's code exactly. saejax's untied,
    unit-norm decoder stays in saejax's checkpoint; a tied copy would be wrong for training.
  * ``README.md`` is saejax's model card: training config, data sources, measured metrics
    (``eval.json`` / ``summary.json`` of the workdir) and the latent labels
    (``latent_labels.json``, copied beside it when the workdir has one). A card is published:
    it names no absolute local path (`portable_path`: the run by its directory's name, files in
    the saejax repository or an installed package relative to it, others by their last two
    components).

Every file of the export gets the mode the process's umask gives a new file (safetensors writes
its files 0600 while everything else gets 0644 under the usual umask 022), every directory the
same for directories (`saejax.hub.convert.match_umask`, the rule ``python -m saejax.hub.convert``
follows too).

The backbone directory at the root of the export is a plain Hugging Face model
(``transformers.AutoModel.from_pretrained(DIR)`` loads it); ``--backbone-only`` writes just that
(`saejax.hub.convert.save_hf` plus the tokenizer). Max sequence length (the run's
``data.max_doc_len``) and k carry over: ``max_seq_length`` in sentence_bert_config.json (written
explicitly: sentence-transformers reads it before the tokenizer's ``model_max_length``, which is
set too, for plain transformers users) and the SAE's ``k``; ``dead_threshold`` becomes saejax's
``dead_after_tokens`` in steps of the run's batch.

Import (`load_sparse_encoder`) reads such a directory, as saved by sentence-transformers itself,
into an `Embedder`: the backbone through `saejax.hub.convert`, the SAE as ``w_enc =
encoder.weight.T`` (exact: the imported model encodes as the SparseEncoder does),
``normalize_codes`` = whether a ``Normalize`` module follows the SparseAutoEncoder (CSR models
trained by sentence-transformers have none: their scores are raw dot products), and ``w_dec =`` the
encoder's rows normalised to unit length. Why normalised: saejax trains with unit-norm decoder rows
(`saejax.sae.topk.normalize_decoder` after every step), so the tied rows, rescaled, are the nearest
start that keeps that invariant; reconstruction changes by each row's norm until training adapts.
`init_run_from_sparse_encoder` turns the import into a training workdir at step 0 that
``python -m saejax.train --config WORKDIR/config.py --workdir WORKDIR`` resumes from.

sentence-transformers and torch are imported only inside the functions that need them (the import
costs ~9 s).
"""

import dataclasses
import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from saejax import cli, paths
from saejax.data.tokenizer import Tokenizer, load_tokenizer
from saejax.errors import CheckpointError, ConfigError, SaejaxError
from saejax.hub import convert
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder

# The one weights file layout sentence-transformers' SparseAutoEncoder loads with encoder and
# decoder tied; "decoder.linear.weight" is the other name of the same tensor.
SAE_KEYS = ("pre_bias", "latent_bias", "stats_last_nonzero", "encoder.weight")
SAE_WEIGHT_NAMES = ("encoder.weight", "decoder.linear.weight")
LATENT_LABELS = "latent_labels.json"
# Special tokens named in a generated tokenizer_config.json (BERT and ModernBERT / RoBERTa names).
_SPECIAL_TOKENS = {"cls_token": ("[CLS]", "<s>"), "sep_token": ("[SEP]", "</s>"),
                   "pad_token": ("[PAD]", "<pad>"), "mask_token": ("[MASK]", "<mask>"),
                   "unk_token": ("[UNK]", "<unk>")}


class OutputExistsError(SaejaxError, FileExistsError):
  """The export directory exists and is not empty, and overwriting was not asked for."""


@dataclasses.dataclass(frozen=True)
class ExportSettings:
  """What a SparseEncoder export carries besides the weights.

  Attributes:
    max_seq_length: token budget per text, [CLS] and [SEP] included (the run's max_doc_len).
    k: active latents per document (and per query, unless ``query_k`` says otherwise; the
      SAE's training k unless overridden).
    k_aux: AuxK latents, recorded for training in sentence-transformers.
    dead_threshold: sentence-transformers counts a latent dead after this many silent steps.
    query_k: active latents per query when queries should be denser than documents (0: ``k``).
      The export then routes queries and documents (a ``Router`` after the pooling, used by
      ``encode_query`` / ``encode_document``; plain ``encode`` is the document route) through two
      copies of the one SAE that differ only in k: the index keeps k latents per document, and
      each query reads more of its latents against it (RESULTS.md "Quality": +0.02-0.03 mean
      nDCG@10 for queries at 256-512 against documents at 64).
  """
  max_seq_length: int
  k: int
  k_aux: int
  dead_threshold: int = 30
  query_k: int = 0

  def __post_init__(self):
    for name in ("max_seq_length", "k", "k_aux", "dead_threshold"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"ExportSettings.{name}={value!r} must be a positive int")
    if not isinstance(self.query_k, int) or self.query_k < 0:
      raise ConfigError(f"ExportSettings.query_k={self.query_k!r} must be an int >= 0 (0: k)")

  @property
  def routed(self) -> bool:
    """Whether queries get their own k (a Router with a query and a document route)."""
    return self.query_k not in (0, self.k)


# ---------------------------------------------------------------------------------------------
# Export

def _prepare_out(out: Path, force: bool) -> Path:
  """A fresh staging directory beside `out`; refuses a non-empty `out` unless `force`."""
  if out.exists() and not out.is_dir():
    raise OutputExistsError(f"--out {out} is a file, not a directory")
  if out.is_dir() and any(out.iterdir()) and not force:
    raise OutputExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  stage = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
  stage.mkdir()
  return stage


def _commit(stage: Path, out: Path) -> Path:
  """Replace `out` by the complete staging directory (never leaves a half-written export)."""
  convert.match_umask(stage)
  if out.exists():
    shutil.rmtree(out)
  stage.rename(out)
  return out


def write_tokenizer(tokenizer_src: Path, out: Path, max_seq_length: int) -> None:
  """Tokenizer files for transformers' AutoTokenizer, truncating at ``max_seq_length``.

  Copies tokenizer.json (and tokenizer_config.json, vocab.txt... where the source has them) and
  sets ``model_max_length``; a source with only tokenizer.json (e.g. ModernBERT's) gets a
  tokenizer_config.json naming its special tokens, so transformers can pad.
  """
  if tokenizer_src.is_file():
    shutil.copyfile(tokenizer_src, out / "tokenizer.json")
  else:
    convert.copy_tokenizer(tokenizer_src, out)
  if not (out / "tokenizer.json").exists():
    raise ConfigError(f"no tokenizer.json at {tokenizer_src}: the export needs the run's tokenizer")
  file = out / "tokenizer_config.json"
  tok_cfg = json.loads(file.read_text()) if file.exists() else {
      "tokenizer_class": "PreTrainedTokenizerFast"}
  if not file.exists():
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for key, names in _SPECIAL_TOKENS.items():
      found = next((n for n in names if tok.token_to_id(n) is not None), None)
      if found is not None:
        tok_cfg[key] = found
  tok_cfg["model_max_length"] = max_seq_length
  file.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def write_backbone(model: Embedder, tokenizer_src: Path, out: Path, max_seq_length: int) -> Path:
  """The plain encoder as a Hugging Face directory (config.json, model.safetensors, tokenizer)."""
  convert.save_hf(model.encoder.cfg, model.encoder, out)
  write_tokenizer(tokenizer_src, out, max_seq_length)
  return out


def _sae_tensors(sae: sae_lib.SAE, stats_last_nonzero: np.ndarray | None) -> dict[str, np.ndarray]:
  s = sae.config.num_latents
  stats = (np.zeros(s, np.int64) if stats_last_nonzero is None
           else np.asarray(stats_last_nonzero, np.int64))
  if stats.shape != (s,):
    raise ConfigError(f"stats_last_nonzero has shape {stats.shape}; expected ({s},)")
  get = lambda p: np.asarray(jax.device_get(p[...]), np.float32)  # noqa: E731
  return {"pre_bias": get(sae.b_pre), "latent_bias": get(sae.b_lat),
          "stats_last_nonzero": stats,
          "encoder.weight": np.ascontiguousarray(get(sae.w_enc).T)}


def write_sparse_encoder(model: Embedder, tokenizer_src: str | Path, out: str | Path,
                         settings: ExportSettings, *, card: str | None = None,
                         extra_files: dict[str, Path] | None = None, force: bool = False,
                         stats_last_nonzero: np.ndarray | None = None) -> Path:
  """Write `model` as a sentence-transformers SparseEncoder directory.

  ``SparseEncoder(out).encode(texts)`` gives saejax's `saejax.retrieval.encode.encode_sparse` codes:
  the same active latents and values, unit-normalised (a trailing ``Normalize`` module) when the
  SAE's ``normalize_codes`` is set.

  Args:
    model: encoder (a registered HF architecture) + TopK SAE.
    tokenizer_src: the model's tokenizer.json or a directory holding it.
    out: the directory to write; must be absent or empty unless `force`.
    settings: max sequence length, k and the SAE's training settings.
    card: README.md text (default: sentence-transformers' generated card).
    extra_files: name -> file copied into the export (e.g. latent_labels.json).
    force: replace a non-empty `out`.
    stats_last_nonzero: [S] steps since each latent fired (default zeros: all fresh).

  Raises:
    ConfigError: the model has no SAE or an unsupported backbone.
    OutputExistsError: `out` is not empty and `force` is False.
  """
  if model.sae is None:
    raise ConfigError("the model has no SAE (sae.enabled=False, the dense ablation): a "
                      "SparseEncoder needs one; export the backbone with --backbone-only")
  if not any(isinstance(model.encoder.cfg, a.config_cls) for a in convert._registry().values()):
    raise ConfigError(f"backbone {type(model.encoder.cfg).__name__} has no Hugging Face "
                      "architecture registered in saejax.hub.convert")
  from safetensors.numpy import save_file
  from sentence_transformers import SparseEncoder
  from sentence_transformers.sparse_encoder.modules import SparseAutoEncoder, Transformer
  try:
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Router
  except ImportError:  # sentence-transformers < 5.2 kept them here
    from sentence_transformers.models import Normalize, Pooling, Router
  import torch
  import transformers

  out = Path(out).absolute()
  stage = _prepare_out(out, force)
  try:
    backbone = write_backbone(model, Path(tokenizer_src), stage / "backbone", settings.max_seq_length)
    # transformers reports BERT's pooler as newly initialised: expected (saejax drops it, mean
    # pooling never reads it), so the report is silenced for this one load.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
      transformer = Transformer(str(backbone), max_seq_length=settings.max_seq_length)
    finally:
      transformers.logging.set_verbosity(verbosity)
    cfg = model.sae.config
    tensors = _sae_tensors(model.sae, stats_last_nonzero)

    def head(k: int) -> list:  # the SAE at k active latents, then Normalize where saejax has it
      sae = SparseAutoEncoder(input_dim=cfg.d_model, hidden_dim=cfg.num_latents, k=k,
                              k_aux=min(settings.k_aux, cfg.num_latents), normalize=False,
                              dead_threshold=settings.dead_threshold)
      sae.load_state_dict({n: torch.tensor(v) for n, v in tensors.items()}, strict=False)
      # saejax's embedding is the unit-norm code (`SAE.embed`)
      return [sae, Normalize()] if cfg.normalize_codes else [sae]

    modules = [transformer, Pooling(cfg.d_model, pooling_mode="mean")]
    if settings.routed:
      modules.append(Router.for_query_document(query_modules=head(settings.query_k),
                                               document_modules=head(settings.k)))
    else:
      modules += head(settings.k)
    # "dot": with Normalize it is the cosine, as saejax's index scores; without, the raw dot.
    st = SparseEncoder(modules=modules, similarity_fn_name="dot")
    st_dir = stage / "model"
    st.save(str(st_dir))
    # sentence-transformers names the tied tensor decoder.linear.weight; write the encoder's name
    # and nothing else (its loader resolves the tie either way).
    for sae_dir in _sae_dirs(st_dir):
      save_file(tensors, sae_dir / "model.safetensors", metadata={"format": "pt"})
    pin_max_seq_length(st_dir, settings.max_seq_length)
    shutil.rmtree(backbone)
    if card is not None:
      (st_dir / "README.md").write_text(card)
    for name, file in (extra_files or {}).items():
      (st_dir / name).write_bytes(file.read_bytes())  # the file may be in a bucket (a gs:// run)
    result = _commit(st_dir, out)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return result


def pin_max_seq_length(st_dir: Path, max_seq_length: int) -> Path:
  """Write ``max_seq_length`` into the Transformer module's sentence_bert_config.json.

  sentence-transformers >= 5 leaves it out when it equals the tokenizer's ``model_max_length``,
  so the budget would hang on tokenizer_config.json alone (and on its max_position_embeddings
  cap); written here, every sentence-transformers version reads the trained length, and so does
  `load_sparse_encoder`.
  """
  modules = json.loads((st_dir / "modules.json").read_text())
  module = next(m for m in modules if _kind(m) == "Transformer")
  file = st_dir / module["path"] / "sentence_bert_config.json"
  config = _read_json(file) or {}
  config["max_seq_length"] = int(max_seq_length)
  file.write_text(json.dumps(config, indent=4) + "\n")
  return file


def resolve_ckpt(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
  """(workdir, step) of ``--ckpt``: a training workdir or one of its ``checkpoints/<step>``, on
  disk or in a bucket (gs://)."""
  path = Path(path).absolute() if paths.is_local(path) else paths.resolve(path, "--ckpt")
  if path.parent.name == "checkpoints" and path.name.isdigit():
    if step is not None and step != int(path.name):
      raise ConfigError(f"--ckpt {path} is step {path.name} but --step {step} was given")
    return path.parent.parent, int(path.name)
  if not (path / "config.json").is_file():
    raise CheckpointError(f"--ckpt {path} is neither a saejax training workdir (no config.json) "
                          "nor a WORKDIR/checkpoints/<step> directory")
  return path, step


def check_backbone(config: ml_collections.ConfigDict, workdir: Path) -> str:
  """The run's backbone model_type, or a ConfigError naming the workdir and the supported ones."""
  from saejax.hub import build
  try:
    arch, _ = build.encoder_config(config, fetch=False)  # the model_type only
  except ConfigError as e:
    raise ConfigError(f"cannot export {workdir}: {e}") from e
  return arch.model_type


def tokenizer_source(config: ml_collections.ConfigDict) -> Path:
  """The tokenizer.json (or its directory) a run trained with."""
  path = config.model.get("tokenizer") or config.model.get("init_from")
  if not path:
    raise ConfigError("config.model.tokenizer is empty and there is no init_from to take it from")
  return Path(path) if str(path).endswith(".json") else convert.resolve(path)


def settings_for_run(config: ml_collections.ConfigDict, k: int | None = None,
                     query_k: int = 0) -> ExportSettings:
  """Max length, k (per document; ``query_k`` per query, 0: k) and the dead-latent horizon of a
  run, in sentence-transformers' units; a k outside [1, S] is a ConfigError naming it."""
  k = int(config.sae.k if k is None else k)
  for flag, value in (("--k", k), ("--query-k", query_k or k)):
    if not 1 <= value <= config.sae.num_latents:
      raise ConfigError(f"{flag}={value} must be in [1, {config.sae.num_latents}] (the run's "
                        "sae.num_latents)")
  texts_per_step = config.data.global_batch_size * (2 + config.data.get("num_hard_negatives", 0))
  return ExportSettings(max_seq_length=int(config.data.max_doc_len), k=k,
                        k_aux=int(config.sae.k_aux), query_k=int(query_k),
                        dead_threshold=max(1, math.ceil(config.sae.dead_after_tokens
                                                        / texts_per_step)))


def _read_json(file: Path) -> Any:
  if not file.is_file():
    return None
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file} is not valid JSON (line {e.lineno}): {e.msg}") from e


def _read_object(file: Path) -> dict | None:
  """A JSON file that must hold an object (a module's config), or None where it is absent."""
  value = _read_json(file)
  if value is not None and not isinstance(value, dict):
    raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, not an object")
  return value


def _config_int(cfg: dict, key: str, file: Path, default: int | None = None) -> int:
  """``cfg[key]`` as an int (`default` where absent), or a CheckpointError naming file and key."""
  if key not in cfg and default is None:
    raise CheckpointError(f"{file} lacks {key!r} (an integer)")
  value = cfg.get(key, default)
  if (isinstance(value, bool) or not isinstance(value, int | float)
      or not math.isfinite(value) or value != int(value)):  # json reads Infinity, NaN, 1e400
    raise CheckpointError(f"{file}: {key!r} is {value!r}; expected an integer")
  return int(value)


def portable_path(path: str | os.PathLike) -> str:
  """A local path as a published card may name it: relative to the saejax repository or to the
  installed package that holds it, else its last two components; relative paths unchanged."""
  path = Path(path)
  if not path.is_absolute():
    return str(path)
  if "site-packages" in path.parts:  # an installed package: name it from the package on
    return Path(*path.parts[path.parts.index("site-packages") + 1:]).as_posix()
  repo = Path(__file__).resolve().parents[2]
  if path.is_relative_to(repo):
    return path.relative_to(repo).as_posix()
  return Path(*path.parts[-2:]).as_posix() if len(path.parts) > 2 else path.name


def portable_config(value: Any) -> Any:
  """`value` (a config as plain dicts and lists) with every absolute path made `portable_path`."""
  if isinstance(value, dict):
    return {k: portable_config(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [portable_config(v) for v in value]
  if isinstance(value, str) and os.path.isabs(value):
    return portable_path(value)
  return value


def _metrics_table(eval_json: dict | None, summary: dict | None) -> str:
  lines = []
  if eval_json:
    beir_dir = portable_path(eval_json.get("beir_dir") or "?")
    lines += [f"Retrieval on `{beir_dir}` (split {eval_json.get('split')}, "
              f"{eval_json.get('num_queries')} queries x {eval_json.get('num_docs')} documents):",
              "", "| system | nDCG@10 | Recall@100 | MRR@10 |", "|---|---|---|---|"]
    for name, m in eval_json.get("systems", {}).items():
      lines.append(f"| {name} | {m.get('ndcg@10', float('nan')):.4f} | "
                   f"{m.get('recall@100', float('nan')):.4f} | {m.get('mrr@10', float('nan')):.4f} |")
    lines.append("")
  if summary:
    lines.append(f"Training: {summary.get('step')} steps in {summary.get('wall_s', 0) / 60:.1f} "
                 "min. Last logged metrics:")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(summary.get("last_metrics", {}).items())
              if isinstance(v, (int, float))]
    lines.append("")
  return "\n".join(lines) if lines else "No measured metrics: the workdir has no eval.json or " \
                                        "summary.json.\n"


def model_card(config: ml_collections.ConfigDict, settings: ExportSettings, *, backbone: str,
               workdir: Path, step: int, has_labels: bool) -> str:
  """README.md of an exported run: what it is, how to use it, config, data and metrics."""
  sources = [portable_path(s.get("path")) if s.get("path") else s.get("name") or s.get("kind")
             for s in config.data.sources]
  labels = (f"`{LATENT_LABELS}` names the latents (from saejax's interpretability analysis)."
            if has_labels else "No latent labels were available in the workdir.")
  scoring = (", each scaled to unit length by the final `Normalize` module (so the dot product is "
             "their cosine)" if config.sae.get("normalize_codes", False) else " (raw activations)")
  query_note = (f" ({settings.query_k} for a query encoded with `model.encode_query`: a `Router` "
                "sends queries and documents through the same SAE at their own k; "
                "`model.encode` and `model.encode_document` give documents)"
                if settings.routed else "")
  return f"""---
library_name: sentence-transformers
tags: [sentence-transformers, sparse-encoder, sparse, csr, saejax]
pipeline_tag: feature-extraction
---

# saejax sparse encoder ({backbone} + TopK SAE)

Exported by `python -m saejax.hub.export` from run `{Path(workdir).name}` (checkpoint step {step}).
Each text becomes a vector of {config.sae.num_latents:,} latents with at most k = {settings.k}
non-zero{query_note}, computed as
`ReLU(TopK(W_enc (v - b_pre) + b_lat))` over the mean-pooled {backbone} output `v`. Encoder and
SAE were trained end to end (contrastive + reconstruction losses); queries and documents are
scored by the dot product of their codes{scoring}. Texts longer than {settings.max_seq_length}
tokens are truncated (`max_seq_length` in sentence_bert_config.json: the run's document length
`data.max_doc_len`; its queries were trained at {config.data.get("max_query_len", "?")} tokens).

```python
from sentence_transformers import SparseEncoder
model = SparseEncoder("path/to/this/directory")
docs = model.encode_document(["a sentence", "another one"])   # sparse [2, {config.sae.num_latents}]
queries = model.encode_query(["a question"])
print(model.similarity(queries, docs))
```

The weights file of `SparseAutoEncoder` holds the encoder only; saejax's untied decoder (used for
training and interpretability) stays in the saejax checkpoint.

## Data

Training sources: {", ".join(f"`{s}`" for s in sources) or "none recorded"}.

## Metrics

{_metrics_table(_read_json(workdir / "eval.json"), _read_json(workdir / "summary.json"))}
## Latent labels

{labels}

## Training config

```json
{json.dumps(portable_config(json.loads(config.to_json_best_effort())), indent=2)}
```
"""


def export_run(ckpt: str | Path, out: str | Path, *, step: int | None = None, force: bool = False,
               backbone_only: bool = False, k: int | None = None, query_k: int = 0) -> Path:
  """Export a training run's checkpoint (see the module docstring).

  Args:
    ckpt: the training workdir, or ``WORKDIR/checkpoints/<step>``.
    out: the export directory (absent or empty unless `force`).
    step: which checkpoint (default: the newest readable one, which the model card names).
    force: replace a non-empty `out`.
    backbone_only: write only the Hugging Face backbone directory.
    k: active latents of the exported encoder (default: the training k); per document when
      ``query_k`` is given.
    query_k: active latents per query (0: k); see `ExportSettings.query_k`.
  """
  from saejax.hub import trained
  out = Path(out).absolute()
  if out.is_dir() and any(out.iterdir()) and not force:  # fail before loading anything
    raise OutputExistsError(f"--out {out} exists and is not empty; pass --force to replace it")
  workdir, step = resolve_ckpt(ckpt, step)
  config = trained.read_config(workdir, sections=trained.MODEL_SECTIONS)
  backbone = check_backbone(config, workdir)
  settings = settings_for_run(config, k, query_k)
  # The step read, not the newest: load_run passes over damaged checkpoints to an older one.
  config, model, _, step = trained.load_run_and_step(workdir, step, dtype="float32")
  tokenizer_src = tokenizer_source(config)
  if backbone_only:
    stage = _prepare_out(out, force)
    try:
      return _commit(write_backbone(model, tokenizer_src, stage, settings.max_seq_length), out)
    finally:
      shutil.rmtree(stage, ignore_errors=True)
  labels = workdir / LATENT_LABELS
  card = model_card(config, settings, backbone=backbone, workdir=workdir, step=step,
                    has_labels=labels.is_file())
  return write_sparse_encoder(model, tokenizer_src, out, settings, card=card, force=force,
                              extra_files={LATENT_LABELS: labels} if labels.is_file() else None)


# ---------------------------------------------------------------------------------------------
# Import

def _modules(path: Path) -> list[dict]:
  file = path / "modules.json"
  if not file.is_file():
    raise CheckpointError(f"{path} is not a sentence-transformers model directory: no modules.json")
  modules = _read_json(file)
  if not isinstance(modules, list) or not all(
      isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path"), str)
      for m in modules):
    raise CheckpointError(f"{file} is not a list of modules, each with a 'type' and a 'path'")
  return modules


def _kind(module: dict) -> str:
  return module["type"].rsplit(".", 1)[-1]


_LAYOUT = ["Transformer", "Pooling", "SparseAutoEncoder"]  # then an optional Normalize
# or Transformer + Pooling + Router, each route SparseAutoEncoder [+ Normalize] (`ExportSettings.query_k`)
_ROUTES = ("query", "document")
Head = tuple[Path, Path | None]  # (SparseAutoEncoder dir, Normalize dir or None)


def _router_modules(router_dir: Path) -> dict[str, list[dict]]:
  """A Router's routes as modules.json-like lists: {route: [{"type", "path"}, ...]}."""
  file = router_dir / "router_config.json"
  cfg = _read_json(file)
  if not isinstance(cfg, dict) or not isinstance(cfg.get("structure"), dict):
    raise CheckpointError(f"{file}: not a sentence-transformers Router config (no 'structure')")
  types = cfg.get("types") or {}
  return {route: [{"type": types.get(name, name), "path": name} for name in names]
          for route, names in cfg["structure"].items()}


def _sae_dirs(st_dir: Path) -> list[Path]:
  """Every SparseAutoEncoder directory of a saved SparseEncoder, inside a Router too."""
  dirs = []
  for module in _modules(st_dir):
    if _kind(module) == "SparseAutoEncoder":
      dirs.append(st_dir / module["path"])
    elif _kind(module) == "Router":
      router_dir = st_dir / module["path"]
      dirs += [router_dir / m["path"] for route in _router_modules(router_dir).values()
               for m in route if _kind(m) == "SparseAutoEncoder"]
  return dirs


def _check_head(path: Path, base: Path, modules: list[dict], kinds: list[str]) -> Head:
  """(SAE dir, Normalize dir or None) of SparseAutoEncoder [+ Normalize] saved under `base`."""
  normalize = modules[-1] if [_kind(m) for m in modules][-1:] == ["Normalize"] else None
  body = modules[:-1] if normalize is not None else modules
  head = body[-1] if body else {"type": "nothing", "path": ""}
  if _kind(head) != "SparseAutoEncoder":
    raise CheckpointError(
        f"{path}: the head module is {head['type']} (at {base / head.get('path', '')}), not a "
        f"SparseAutoEncoder; saejax imports only Transformer + Pooling(mean) + SparseAutoEncoder "
        f"[+ Normalize] (modules found: {kinds})")
  if len(body) != 1:
    raise CheckpointError(f"{path}: modules {kinds} are not Transformer + Pooling + "
                          "SparseAutoEncoder [+ Normalize], the only layout saejax imports")
  return base / head.get("path", ""), base / normalize.get("path", "") if normalize else None


def _check_layout(path: Path, modules: list[dict]) -> tuple[Path, Path, dict[str, Head]]:
  """(transformer dir, pooling dir, {route: head}) with one route, "document", for the plain
  layout and "query" and "document" for a Router; or an error naming the module that does not
  fit."""
  kinds = [_kind(m) for m in modules]
  if kinds[:2] != _LAYOUT[:2]:
    _check_head(path, path, modules, kinds)  # names the head module when that is what is wrong
    raise CheckpointError(f"{path}: modules {kinds} are not Transformer + Pooling + "
                          "SparseAutoEncoder [+ Normalize], the only layout saejax imports")
  transformer_dir, pool_dir = (path / m.get("path", "") for m in modules[:2])
  if kinds[2:] != ["Router"]:
    return transformer_dir, pool_dir, {"document": _check_head(path, path, modules[2:], kinds)}
  router_dir = path / modules[2].get("path", "")
  routes = _router_modules(router_dir)
  if sorted(routes) != sorted(_ROUTES):
    raise CheckpointError(f"{router_dir / 'router_config.json'}: routes {sorted(routes)}; saejax "
                          f"imports a Router with exactly the routes {list(_ROUTES)}")
  return transformer_dir, pool_dir, {
      route: _check_head(path, router_dir, routes[route], [*kinds, f"{route}: "
                         f"{[_kind(m) for m in routes[route]]}"]) for route in _ROUTES}


def _check_normalize(normalize_dir: Path) -> None:
  """A Normalize module must L2-normalise the SAE's output, the ``sentence_embedding``."""
  cfg = _read_object(normalize_dir / "config.json") or {}  # older versions write no config
  names = (cfg.get("module_input_name", "sentence_embedding"),
           cfg.get("module_output_name") or cfg.get("module_input_name", "sentence_embedding"))
  if names != ("sentence_embedding", "sentence_embedding"):
    raise CheckpointError(f"{normalize_dir / 'config.json'}: Normalize maps {names[0]!r} to "
                          f"{names[1]!r}; saejax imports only a Normalize of the "
                          "'sentence_embedding' (the SAE's code)")


def _check_pooling(pool_dir: Path) -> None:
  cfg = _read_object(pool_dir / "config.json") or {}
  # sentence-transformers >= 5.2 writes pooling_mode; older versions one boolean per mode.
  mode = cfg.get("pooling_mode") or ("mean" if cfg.get("pooling_mode_mean_tokens") else None)
  if mode != "mean":
    raise CheckpointError(f"{pool_dir / 'config.json'}: pooling is {mode or cfg!r}; saejax's "
                          "Embedder pools by the mean over valid tokens only")


def _max_seq_length(transformer_dir: Path, max_position_embeddings: int) -> int:
  """The token budget sentence-transformers' Transformer module reads texts at: its
  sentence_bert_config.json's ``max_seq_length`` as written, else the tokenizer's
  ``model_max_length`` capped at the backbone's ``max_position_embeddings`` (as the module caps
  it), else ``max_position_embeddings``."""
  for file, key in (("sentence_bert_config.json", "max_seq_length"),
                    ("tokenizer_config.json", "model_max_length")):
    value = (_read_object(transformer_dir / file) or {}).get(key)
    if isinstance(value, int) and 0 < value < 1_000_000:  # HF's "no limit" is a huge int
      return value if key == "max_seq_length" else min(value, max_position_embeddings)
  return max_position_embeddings


def _st_tokenizer(transformer_dir: Path, vocab_size: int) -> Tokenizer:
  """The Transformer module's tokenizer as sentence-transformers applies it: ``do_lower_case`` in
  its sentence_bert_config.json lowercases every text before the tokenizer's own normalizer."""
  tokenizer = load_tokenizer(transformer_dir, vocab_size=vocab_size)
  if (_read_object(transformer_dir / "sentence_bert_config.json") or {}).get("do_lower_case"):
    from tokenizers import normalizers
    own = [tokenizer.normalizer] if tokenizer.normalizer is not None else []
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *own])
  return tokenizer


def _read_head(sae_dir: Path, normalize_dir: Path | None, transformer_dir: Path, hidden_size: int
               ) -> tuple[dict, dict[str, np.ndarray], str]:
  """(config.json, tensors, name of the weight tensor) of one SparseAutoEncoder directory,
  checked against itself and the backbone's ``hidden_size``."""
  if normalize_dir is not None:
    _check_normalize(normalize_dir)
  cfg_file = sae_dir / "config.json"
  st_cfg = _read_object(cfg_file)
  if not st_cfg:
    raise CheckpointError(f"{sae_dir} has no config.json")
  if st_cfg.get("normalize"):
    raise ConfigError(f"{sae_dir / 'config.json'}: normalize=True (a LayerNorm before the SAE) "
                      "has no saejax equivalent")
  file = sae_dir / "model.safetensors"
  if not file.is_file():
    raise CheckpointError(f"{sae_dir} has no model.safetensors")
  tensors = convert.load_safetensors(file)
  name = next((n for n in SAE_WEIGHT_NAMES if n in tensors), None)
  missing = [k for k in ("pre_bias", "latent_bias") if k not in tensors] + (
      [] if name else [" or ".join(SAE_WEIGHT_NAMES)])
  if missing:
    raise CheckpointError(f"{file} lacks tensors {missing}; it has {sorted(tensors)}")
  s, d = _config_int(st_cfg, "hidden_dim", cfg_file), _config_int(st_cfg, "input_dim", cfg_file)
  for key, shape in ((name, (s, d)), ("pre_bias", (d,)), ("latent_bias", (s,))):
    if tensors[key].shape != shape:
      raise CheckpointError(f"{file}: tensor {key} has shape {tensors[key].shape}, expected {shape} "
                            f"(input_dim={d}, hidden_dim={s} in its config.json)")
  if d != hidden_size:
    raise CheckpointError(f"{sae_dir}: SAE input_dim {d} != backbone hidden_size "
                          f"{hidden_size} of {transformer_dir / 'config.json'}")
  return st_cfg, tensors, name


def _model_settings(path: Path, num_latents: int) -> tuple[int | None, dict[str, str]]:
  """(max_active_dims, non-empty prompts) of config_sentence_transformers.json.

  ``max_active_dims``, where set, is the k sentence-transformers encodes with: `SparseEncoder`
  passes it to every SparseAutoEncoder (inside a Router too) in place of the module's own k, then
  keeps that many values. Prompts are prepended to the texts by ``encode_query`` /
  ``encode_document`` (and by ``encode`` with a ``default_prompt_name``).
  """
  file = path / "config_sentence_transformers.json"
  cfg = _read_object(file) or {}
  max_active = None
  if cfg.get("max_active_dims") is not None:
    max_active = _config_int(cfg, "max_active_dims", file)
    if not 1 <= max_active <= num_latents:
      raise CheckpointError(f"{file}: max_active_dims={max_active} must be in [1, {num_latents}] "
                            "(the SparseAutoEncoder's hidden_dim)")
  prompts = cfg.get("prompts") or {}
  if not isinstance(prompts, dict):
    raise CheckpointError(f"{file}: 'prompts' is {prompts!r}; expected an object name -> text")
  return max_active, {name: text for name, text in prompts.items() if text}


def load_sparse_encoder(path: str | Path, *, dead_after_tokens: int = 1_000_000
                        ) -> tuple[Embedder, Tokenizer, dict]:
  """Load a sentence-transformers CSR SparseEncoder directory into saejax.

  Args:
    path: a directory saved by ``SparseEncoder.save`` with modules Transformer, Pooling(mean),
      SparseAutoEncoder and optionally Normalize (then the imported SAE has
      ``normalize_codes=True``, else False); or Transformer, Pooling(mean) and a Router whose
      "query" and "document" routes are each that head, with the same weights (a saejax export
      with ``--query-k``): the model is the document route's, ``info["query_k"]`` the query's k.
      ``do_lower_case`` in the Transformer's sentence_bert_config.json gives the tokenizer a
      Lowercase normalizer before its own, so texts are lowercased as sentence-transformers does.
    dead_after_tokens: saejax's dead-latent horizon in texts (sentence-transformers counts steps,
      which have no fixed number of texts).

  Returns:
    (model, tokenizer, info): info holds ``max_seq_length``, ``k``, ``query_k`` (= k without a
    Router; both are config_sentence_transformers.json's ``max_active_dims`` where it is set, as
    sentence-transformers encodes with it in place of each SparseAutoEncoder's k), ``k_aux``,
    ``num_latents``, ``normalize_codes``, ``dead_threshold``, ``backbone``
    (model_type), ``transformer_dir``, ``prompts`` (the non-empty prompts of
    config_sentence_transformers.json, which sentence-transformers prepends to texts and saejax
    does not: a warning names them), ``decoder`` (how w_dec was made) and
    ``decoder_row_norms`` (min, max of the tied rows before normalising).

  Raises:
    CheckpointError: not a SparseEncoder directory, a head that is not a SparseAutoEncoder,
      non-mean pooling, missing or misshapen SAE tensors, routes with different weights.
    ConfigError: an unsupported backbone, or ``normalize=True`` (a LayerNorm saejax does not have).
  """
  path = Path(path).absolute()
  transformer_dir, pool_dir, heads = _check_layout(path, _modules(path))
  _check_pooling(pool_dir)
  enc_cfg, encoder = convert.load_hf(transformer_dir, head=False)
  tokenizer = _st_tokenizer(transformer_dir, enc_cfg.vocab_size)
  read = {route: _read_head(*head, transformer_dir, enc_cfg.hidden_size)
          for route, head in heads.items()}
  st_cfg, tensors, name = read["document"]
  if "query" in read:  # saejax has one SAE: the routes may differ in k only
    q_cfg, q_tensors, q_name = read["query"]
    q_dir, d_dir = heads["query"][0], heads["document"][0]
    if (heads["query"][1] is None) != (heads["document"][1] is None):
      raise CheckpointError(f"{path}: one route normalises its codes and the other does not")
    for key in ("pre_bias", "latent_bias", name):
      other = q_tensors.get(q_name if key == name else key)
      if other is None or other.shape != tensors[key].shape or not np.array_equal(other,
                                                                                  tensors[key]):
        raise CheckpointError(f"{q_dir} and {d_dir} hold different {key} tensors; saejax imports "
                              "routes that share one SAE and differ only in k")
  weight = tensors[name].astype(np.float32)
  s, d = weight.shape  # (hidden_dim, input_dim), checked by _read_head
  sae_cfg_file = heads["document"][0] / "config.json"
  k = _config_int(st_cfg, "k", sae_cfg_file, 8)
  k_aux = _config_int(st_cfg, "k_aux", sae_cfg_file, 512)
  query_k = (_config_int(read["query"][0], "k", heads["query"][0] / "config.json", k)
             if "query" in read else k)
  max_active, prompts = _model_settings(path, s)
  if max_active is not None:  # what SparseEncoder encodes with, on every route
    k = query_k = max_active
  if prompts:
    warnings.warn(f"{path}: sentence-transformers prepends the prompts {prompts} to the texts "
                  "(encode_query / encode_document); saejax's import does not: prepend "
                  "info['prompts'][name] to each text to encode as sentence-transformers does",
                  stacklevel=2)
  cfg = sae_lib.SAEConfig(d_model=d, num_latents=s, k=k, k_aux=min(k_aux, s),
                          dead_after_tokens=dead_after_tokens,
                          normalize_codes=heads["document"][1] is not None)
  sae = nnx.eval_shape(lambda: sae_lib.SAE(cfg, rngs=nnx.Rngs(0)))
  norms = np.linalg.norm(weight, axis=1)
  values = {"w_enc": weight.T, "b_lat": tensors["latent_bias"], "b_pre": tensors["pre_bias"],
            "w_dec": np.asarray(sae_lib.normalize_decoder(weight))}
  for attr, value in values.items():
    getattr(sae, attr).set_value(jax.numpy.asarray(np.ascontiguousarray(value), jax.numpy.float32))
  info = {"path": str(path), "transformer_dir": str(transformer_dir),
          "backbone": enc_cfg.to_hf_config()["model_type"],
          "max_seq_length": _max_seq_length(transformer_dir, enc_cfg.max_position_embeddings),
          "k": k, "query_k": query_k, "prompts": prompts,
          "k_aux": cfg.k_aux, "num_latents": s, "normalize_codes": cfg.normalize_codes,
          "dead_threshold": _config_int(st_cfg, "dead_threshold", sae_cfg_file, 30),
          "stats_last_nonzero": tensors.get("stats_last_nonzero"),
          "decoder": "w_dec = encoder.weight rows normalised to unit L2 norm (tied weights)",
          "decoder_row_norms": (float(norms.min()), float(norms.max()))}
  return Embedder(encoder, sae), tokenizer, info


_CONFIG_PY = '''"""The resolved config of this workdir (config.json), for `python -m saejax.train --config`."""

import json
from pathlib import Path

import ml_collections


def get_config(arg=None):
  return ml_collections.ConfigDict(json.loads((Path(__file__).parent / "config.json").read_text()))
'''


def init_run_from_sparse_encoder(st_dir: str | Path, config: ml_collections.ConfigDict,
                                 workdir: str | Path) -> Path:
  """A saejax training workdir whose step-0 checkpoint is an imported SparseEncoder.

  Training then continues end to end with::

    python -m saejax.train --config WORKDIR/config.py --workdir WORKDIR

  Args:
    st_dir: the sentence-transformers SparseEncoder directory.
    config: a training config (data, losses, optimiser); its model and sae sections are replaced
      by the imported model's (backbone = the SparseEncoder's Transformer directory, S, k, k_aux,
      normalize_codes),
      and its token budgets are capped at the model's max sequence length.
    workdir: a directory without checkpoints.
  """
  from saejax.data import pipeline
  from saejax.hub import build, checkpoint
  from saejax.hub.state import OptimConfig, init_state, make_optimizer
  workdir = Path(workdir).absolute()
  if (workdir / "checkpoints").exists():
    raise OutputExistsError(f"{workdir / 'checkpoints'} exists; choose an empty workdir")
  model, tokenizer, info = load_sparse_encoder(
      st_dir, dead_after_tokens=int(config.sae.dead_after_tokens))
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.init_from = info["transformer_dir"]
  config.model.hf_config = ml_collections.ConfigDict()
  workdir.mkdir(parents=True, exist_ok=True)
  # The tokenizer as the SparseEncoder applies it (do_lower_case included): training, evaluation
  # and export of the continued run read texts as the imported model did.
  tokenizer.save(str(workdir / "tokenizer.json"))
  config.model.tokenizer = str(workdir / "tokenizer.json")
  for key in ("num_latents", "k", "k_aux", "normalize_codes"):
    config.sae[key] = info[key]
  config.data.max_query_len = min(config.data.max_query_len, info["max_seq_length"])
  config.data.max_doc_len = min(config.data.max_doc_len, info["max_seq_length"])
  paths.write_atomic(paths.resolve(workdir / "config.json"),
                     config.to_json_best_effort(indent=2) + "\n")
  (workdir / "config.py").write_text(_CONFIG_PY)
  _, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(build.from_section(OptimConfig, config.optim, "optim"), params)
  state = init_state(model, tx, bank_size=config.loss.get("bank_size", 0))
  data_iter = pipeline.make_iterator(build.data_config(config), tokenizer, shard_index=0,
                                     shard_count=1)
  ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", save_every=1, keep=1,
                                      async_save=False)
  try:
    ckpt.save(0, state, data_iter, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return workdir


# ---------------------------------------------------------------------------------------------
# CLI

def main(argv: list[str] | None = None) -> None:
  """``python -m saejax.hub.export --ckpt WORKDIR --out DIR [--force] [--step N] [--k K]
  [--query-k KQ] [--backbone-only]``."""
  parser = cli.ArgumentParser(prog="python -m saejax.hub.export", description=main.__doc__)
  parser.add_argument("--ckpt", required=True,
                      help="training workdir, or WORKDIR/checkpoints/<step>")
  parser.add_argument("--out", required=True, help="export directory (absent or empty)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--k", type=int, default=None,
                      help="active latents per text (default: training k); per document with "
                      "--query-k")
  parser.add_argument("--query-k", type=int, default=0,
                      help="active latents per query, denser than the documents' (0: --k): "
                      "encode_query and encode_document then take two routes")
  parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
  parser.add_argument("--backbone-only", action="store_true",
                      help="write only the Hugging Face backbone directory")
  args = parser.parse_args(argv)
  out = export_run(args.ckpt, args.out, step=args.step, force=args.force,
                   backbone_only=args.backbone_only, k=args.k, query_k=args.query_k)
  kind = "Hugging Face backbone" if args.backbone_only else "sentence-transformers SparseEncoder"
  print(f"wrote {out} ({kind})")


if __name__ == "__main__":
  cli.run(main)
