"""saejax <-> sentence-transformers SparseEncoder, checked with the real libraries.

Every comparison encodes real sentences (SciFact abstracts, long enough to be truncated, and STS-B
sentences) both ways and asks for the same active latents and values within 1e-4: raw codes for
CSR models trained by sentence-transformers, unit-norm codes (a trailing Normalize module) for
saejax models with `SAEConfig.normalize_codes`.
"""

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from saejax import cli
from saejax.data.tokenizer import load_tokenizer
from saejax.errors import CheckpointError, ConfigError
from saejax.hub import convert, export, trained
from saejax.hub.demo import minilm_dir
from saejax.retrieval.encode import EncodeConfig, encode_sparse
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder
from saejax.train import loop

sys.path.insert(0, str(Path(__file__).parent))
import tiny_config  # noqa: E402

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SparseEncoder  # noqa: E402
from sentence_transformers.sparse_encoder.modules import (  # noqa: E402
    MLMTransformer, SparseAutoEncoder, SpladePooling, Transformer)
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling  # noqa: E402


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
  corpus = data_dir / "scifact/corpus.jsonl"
  docs = [json.loads(line)["text"] for _, line in zip(range(10), corpus.open())]
  sts = [json.loads(line)["sentence1"]
         for _, line in zip(range(8), (data_dir / "stsbenchmark/test.jsonl").open())]
  return docs + sts


def _st_sparse_encoder(backbone_dir: Path, out: Path, *, max_len: int, latents: int, k: int,
                       seed: int = 0, after: tuple = ()) -> Path:
  """A CSR SparseEncoder built and saved by sentence-transformers itself, with non-zero biases
  (and the modules `after` following its SparseAutoEncoder)."""
  torch.manual_seed(seed)
  transformer = Transformer(str(backbone_dir), max_seq_length=max_len)
  d = transformer.get_embedding_dimension()
  head = SparseAutoEncoder(input_dim=d, hidden_dim=latents, k=k, k_aux=2 * k)
  with torch.no_grad():
    head.pre_bias.normal_(0, 0.05)
    head.latent_bias.normal_(0, 0.02)
  SparseEncoder(modules=[transformer, Pooling(d, pooling_mode="mean"), head, *after]).save(str(out))
  return out


def _st_encode(directory: Path, texts: list[str]) -> np.ndarray:
  model = SparseEncoder(str(directory))
  return model.encode(texts, convert_to_tensor=True).to_dense().numpy()


def _assert_same_codes(values: np.ndarray, indices: np.ndarray, dense: np.ndarray):
  """saejax (values, indices) and a sentence-transformers dense code: same active set, 1e-4."""
  for row in range(dense.shape[0]):
    active = values[row] > 0
    assert set(indices[row][active].tolist()) == set(np.flatnonzero(dense[row]).tolist()), row
    ours = np.zeros(dense.shape[1], np.float32)
    ours[indices[row]] = values[row]
    np.testing.assert_allclose(ours, dense[row], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def minilm_st(tmp_path_factory) -> Path:
  return _st_sparse_encoder(minilm_dir(), tmp_path_factory.mktemp("st") / "minilm_csr",
                            max_len=64, latents=1024, k=16)


@pytest.fixture(scope="module")
def minilm_st_codes(minilm_st, texts) -> np.ndarray:
  return _st_encode(minilm_st, texts)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
  """A tiny random BertModel saved by transformers, with MiniLM's tokenizer."""
  import transformers
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=128)
  out = tmp_path_factory.mktemp("tiny_bert")
  transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
  convert.copy_tokenizer(minilm_dir(), out)
  return out


def test_import_encodes_like_sentence_transformers(minilm_st, minilm_st_codes, texts):
  model, tok, info = export.load_sparse_encoder(minilm_st)
  assert (info["backbone"], info["max_seq_length"], info["k"], info["num_latents"]) == (
      "bert", 64, 16, 1024)
  # No Normalize module: sentence-transformers' CSR scores raw codes, so saejax must too.
  assert info["normalize_codes"] is False and model.sae.config.normalize_codes is False
  assert not np.allclose(np.linalg.norm(minilm_st_codes, axis=1), 1.0, atol=1e-3)
  codes = encode_sparse(model, tok, texts, config=EncodeConfig(max_len=64, progress=False))
  assert codes.stats.num_truncated >= 5  # the SciFact abstracts are cut at 64 tokens
  _assert_same_codes(codes.values, codes.indices, minilm_st_codes)
  # Decoder choice: the tied rows, normalised (saejax's invariant), encoder kept exactly.
  w_enc, w_dec = np.asarray(model.sae.w_enc[...]), np.asarray(model.sae.w_dec[...])
  np.testing.assert_allclose(np.linalg.norm(w_dec, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(w_dec * np.linalg.norm(w_enc.T, axis=1, keepdims=True), w_enc.T,
                             rtol=1e-5, atol=1e-6)


def test_round_trip_through_a_saejax_workdir(minilm_st, minilm_st_codes, texts, tmp_path):
  """ST dir -> saejax workdir (import) -> `python -m saejax.hub.export` -> encodes like the ST dir."""
  workdir = export.init_run_from_sparse_encoder(
      minilm_st, tiny_config.quickstart.get_config("runlocal"), tmp_path / "run")
  assert trained.checkpoint_steps(workdir) == [0]
  assert trained.read_config(workdir).sae.normalize_codes is False  # raw codes, as imported
  # As a run from before normalize_codes existed: its config.json lacks the key, and it must still
  # export raw codes (the checks below compare with the raw CSR codes).
  old = json.loads((workdir / "config.json").read_text())
  del old["sae"]["normalize_codes"]
  (workdir / "config.json").write_text(json.dumps(old))
  (workdir / "latent_labels.json").write_text(json.dumps({"17": "protein folding"}))
  (workdir / "eval.json").write_text(json.dumps({
      "beir_dir": "scifact", "split": "test", "num_queries": 3, "num_docs": 9,
      "systems": {"saejax": {"ndcg@10": 0.4321, "recall@100": 0.9, "mrr@10": 0.4}}}))
  out = tmp_path / "export"
  export.main(["--ckpt", str(workdir / "checkpoints" / "0"), "--out", str(out)])

  written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
  by_st = {p.relative_to(minilm_st).as_posix() for p in minilm_st.rglob("*") if p.is_file()}
  assert written == by_st | {"latent_labels.json"}
  assert json.loads((out / "modules.json").read_text()) == json.loads(
      (minilm_st / "modules.json").read_text())
  from safetensors.numpy import load_file
  sae_file = load_file(out / "2_SparseAutoEncoder" / "model.safetensors")
  assert set(sae_file) == set(export.SAE_KEYS)
  assert sae_file["stats_last_nonzero"].dtype == np.int64
  assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64
  assert json.loads((out / "2_SparseAutoEncoder/config.json").read_text())["k"] == 16
  card = (out / "README.md").read_text()
  assert "0.4321" in card and "latent_labels.json" in card and "debian-quickstart" in card

  _assert_same_codes(*_dense_to_sparse(_st_encode(out, texts), 16), minilm_st_codes)
  # The run's own budgets (README's snippet) give the codes the export gives.
  config, model, tok = trained.load_run(workdir)
  _, documents = trained.encode_configs(config, progress=False)
  assert documents.max_len == 64
  codes = encode_sparse(model, tok, texts, config=documents)
  _assert_same_codes(codes.values, codes.indices, minilm_st_codes)
  # The backbone at the root is a plain transformers model; --backbone-only writes it alone.
  import transformers
  assert transformers.AutoModel.from_pretrained(out).config.hidden_size == 384
  bb = tmp_path / "backbone"
  export.main(["--ckpt", str(workdir), "--out", str(bb), "--backbone-only"])
  assert transformers.AutoModel.from_pretrained(bb).config.num_hidden_layers == 6


def _dense_to_sparse(dense: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  indices = np.argsort(-dense, axis=1)[:, :k]
  return np.take_along_axis(dense, indices, 1), indices


@pytest.mark.parametrize("normalize_codes", [True, False])
def test_modernbert_export_matches_saejax(data_dir, texts, tmp_path, normalize_codes):
  """A tiny random ModernBERT (real tokenizer) + SAE: SparseEncoder(export) == saejax, with
  unit-norm codes or raw ones, and the export imports back with the same setting."""
  import transformers
  torch.manual_seed(0)
  hf_cfg = transformers.ModernBertConfig(
      vocab_size=50368, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
      intermediate_size=96, local_attention=8, global_attn_every_n_layers=2,
      max_position_embeddings=256, pad_token_id=50283, cls_token_id=50281, sep_token_id=50282)
  hf_dir = tmp_path / "modernbert"
  transformers.ModernBertModel(hf_cfg).save_pretrained(hf_dir)
  enc_cfg, encoder = convert.load_hf(hf_dir, head=False)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=64, num_latents=512, k=12,
                                      normalize_codes=normalize_codes), rngs=nnx.Rngs(1))
  sae.b_pre.set_value(jax.random.normal(jax.random.key(2), (64,)) * 0.1)
  sae.b_lat.set_value(jax.random.normal(jax.random.key(3), (512,)) * 0.05)
  model = Embedder(encoder, sae)
  tokenizer_json = data_dir / "modernbert-tokenizer" / "tokenizer.json"
  tok = load_tokenizer(tokenizer_json, vocab_size=enc_cfg.vocab_size)
  out = export.write_sparse_encoder(model, tokenizer_json, tmp_path / "export",
                                    export.ExportSettings(max_seq_length=48, k=12, k_aux=64))
  codes = encode_sparse(model, tok, texts, config=EncodeConfig(max_len=48, progress=False))
  assert codes.stats.num_truncated >= 5
  st_codes = _st_encode(out, texts)
  _assert_same_codes(codes.values, codes.indices, st_codes)
  # Unit norm exactly when asked: the values are not unit-norm by chance.
  norms = np.linalg.norm(st_codes, axis=1)
  assert np.allclose(norms, 1.0, atol=1e-5) == normalize_codes
  kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
  assert kinds == ["Transformer", "Pooling", "SparseAutoEncoder"] + ["Normalize"] * normalize_codes
  # Import reads the setting back and encodes as the export does.
  imported, _, info = export.load_sparse_encoder(out)
  assert info["normalize_codes"] is normalize_codes
  again = encode_sparse(imported, tok, texts, config=EncodeConfig(max_len=48, progress=False))
  _assert_same_codes(again.values, again.indices, st_codes)


def test_import_lowercases_where_sentence_bert_config_says(data_dir, texts, tmp_path):
  """``do_lower_case`` in sentence_bert_config.json (older sentence-transformers wrote it there,
  beside a cased tokenizer.json): sentence-transformers lowercases each text before tokenizing,
  and the import must encode as it does. ModernBERT's tokenizer is cased, so it shows."""
  import transformers
  torch.manual_seed(0)
  hf_dir = tmp_path / "modernbert"
  transformers.ModernBertModel(transformers.ModernBertConfig(
      vocab_size=50368, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=48, local_attention=8, max_position_embeddings=64, pad_token_id=50283,
      cls_token_id=50281, sep_token_id=50282)).save_pretrained(hf_dir)
  export.write_tokenizer(data_dir / "modernbert-tokenizer" / "tokenizer.json", hf_dir, 32)
  st_dir = _st_sparse_encoder(hf_dir, tmp_path / "csr", max_len=32, latents=128, k=8)
  cased = _st_encode(st_dir, texts)
  file = st_dir / "sentence_bert_config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), "do_lower_case": True}))
  lowercased = _st_encode(st_dir, texts)
  assert not np.allclose(cased, lowercased)  # the setting changes these texts' codes
  model, tok, _ = export.load_sparse_encoder(st_dir)
  codes = encode_sparse(model, tok, texts, config=EncodeConfig(max_len=32, progress=False))
  _assert_same_codes(codes.values, codes.indices, lowercased)
  # A run continued from it trains, evaluates and exports on the lowercased texts too.
  workdir = export.init_run_from_sparse_encoder(
      st_dir, tiny_config.quickstart.get_config("runlocal"), tmp_path / "run")
  config, model, tok = trained.load_run(workdir)
  _, documents = trained.encode_configs(config, progress=False)
  codes = encode_sparse(model, tok, texts, config=documents)
  _assert_same_codes(codes.values, codes.indices, lowercased)


def test_import_reads_max_active_dims_and_names_prompts(tiny_bert_dir, texts, tmp_path):
  """config_sentence_transformers.json's ``max_active_dims`` is the k SparseEncoder encodes with
  (in place of the SparseAutoEncoder's own k), so the import takes it as k; its prompts, which
  sentence-transformers prepends to queries, saejax does not apply: the import warns, naming them,
  and prepending info["prompts"]["query"] gives encode_query's codes."""
  torch.manual_seed(0)
  transformer = Transformer(str(tiny_bert_dir), max_seq_length=32)
  sae = SparseAutoEncoder(input_dim=32, hidden_dim=64, k=8, k_aux=16)
  with torch.no_grad():
    sae.latent_bias.normal_(0, 0.02)
  st_dir = tmp_path / "csr"
  SparseEncoder(modules=[transformer, Pooling(32, pooling_mode="mean"), sae], max_active_dims=3,
                prompts={"query": "query: ", "document": ""}).save(str(st_dir))
  st_model = SparseEncoder(str(st_dir))
  documents = st_model.encode_document(texts, convert_to_tensor=True).to_dense().numpy()
  queries = st_model.encode_query(texts, convert_to_tensor=True).to_dense().numpy()
  assert (documents != 0).sum(1).max() == 3 and not np.allclose(queries, documents)
  with pytest.warns(UserWarning, match=r"prompts \{'query': 'query: '\}"):
    model, tok, info = export.load_sparse_encoder(st_dir)
  assert (info["k"], info["query_k"], model.sae.config.k) == (3, 3, 3)
  assert info["prompts"] == {"query": "query: "}
  codes = encode_sparse(model, tok, texts, config=EncodeConfig(max_len=32, progress=False))
  _assert_same_codes(codes.values, codes.indices, documents)
  prompted = encode_sparse(model, tok, ["query: " + t for t in texts],
                           config=EncodeConfig(max_len=32, progress=False))
  _assert_same_codes(prompted.values, prompted.indices, queries)


def test_import_caps_the_tokenizer_length_as_sentence_transformers_does(tiny_bert_dir, tmp_path):
  """Saved without max_seq_length in sentence_bert_config.json, a Transformer module reads the
  tokenizer's model_max_length capped at the backbone's max_position_embeddings (128 here): a
  budget of 256 saved by a user reads back as 128 in sentence-transformers, and in the import."""
  transformer = Transformer(str(tiny_bert_dir), max_seq_length=256)
  st_dir = tmp_path / "csr"
  SparseEncoder(modules=[transformer, Pooling(32, pooling_mode="mean"),
                         SparseAutoEncoder(input_dim=32, hidden_dim=64, k=4)]).save(str(st_dir))
  assert json.loads((st_dir / "tokenizer_config.json").read_text())["model_max_length"] == 256
  assert SparseEncoder(str(st_dir)).max_seq_length == 128
  assert export.load_sparse_encoder(st_dir)[2]["max_seq_length"] == 128


def test_export_with_denser_queries_routes_queries_and_documents(tiny_bert_dir, texts, tmp_path):
  """`--query-k`: sentence-transformers' encode_query gives saejax's code at the query k and
  encode_document (and plain encode) at the document k, from one set of SAE weights; the import
  reads both back, and the evaluation harness searches its queries at the query k."""
  from saejax.eval import harness
  enc_cfg, encoder = convert.load_hf(tiny_bert_dir, head=False)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=32, num_latents=256, k=8, k_aux=16),
                    rngs=nnx.Rngs(1))
  sae.b_pre.set_value(jax.random.normal(jax.random.key(2), (32,)) * 0.1)
  sae.b_lat.set_value(jax.random.normal(jax.random.key(3), (256,)) * 0.05)
  model = Embedder(encoder, sae)
  tok = load_tokenizer(tiny_bert_dir, vocab_size=enc_cfg.vocab_size)
  out = export.write_sparse_encoder(
      model, tiny_bert_dir, tmp_path / "routed",
      export.ExportSettings(max_seq_length=48, k=8, k_aux=16, query_k=32))
  kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
  assert kinds == ["Transformer", "Pooling", "Router"]
  st_model = SparseEncoder(str(out))
  dense = lambda x: x.to_dense().numpy()  # noqa: E731
  cfg = EncodeConfig(max_len=48, progress=False)
  for k, got in ((32, st_model.encode_query(texts, convert_to_tensor=True)),
                 (8, st_model.encode_document(texts, convert_to_tensor=True)),
                 (8, st_model.encode(texts, convert_to_tensor=True))):
    ours = encode_sparse(model, tok, texts, k, cfg)
    _assert_same_codes(ours.values, ours.indices, dense(got))
    assert (dense(got) > 0).sum(1).max() == k
  imported, _, info = export.load_sparse_encoder(out)
  assert (info["k"], info["query_k"], info["normalize_codes"]) == (8, 32, True)
  np.testing.assert_array_equal(np.asarray(imported.sae.w_enc[...]), np.asarray(sae.w_enc[...]))
  system = harness.load_system(out)
  assert (system.k, system.query_k) == (8, 32)
  # Routes that do not share one SAE cannot become one saejax model.
  from safetensors.numpy import load_file, save_file
  q_file = out / "2_Router" / "query_0_SparseAutoEncoder" / "model.safetensors"
  tensors = load_file(q_file)
  tensors["latent_bias"] = tensors["latent_bias"] + 1.0
  save_file(tensors, q_file)
  with pytest.raises(CheckpointError, match=r"query_0_SparseAutoEncoder and .*document_0_"
                                            r"SparseAutoEncoder hold different latent_bias"):
    export.load_sparse_encoder(out)


def _load_config_py(file: Path):
  spec = importlib.util.spec_from_file_location("workdir_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("bank_size", [0, 16])
def test_training_continues_from_an_imported_sparse_encoder(tiny_bert_dir, tmp_path, bank_size):
  """bank_size 16: the XBM memory bank (two batches of 8) is part of the step-0 state too."""
  st_dir = _st_sparse_encoder(tiny_bert_dir, tmp_path / "csr", max_len=32, latents=128, k=8)
  config = tiny_config.get_config("2")
  config.loss.bank_size = bank_size
  workdir = export.init_run_from_sparse_encoder(st_dir, config, tmp_path / "run")
  config = _load_config_py(workdir / "config.py")  # what `--config WORKDIR/config.py` reads
  assert (config.sae.num_latents, config.sae.k, config.data.max_doc_len) == (128, 8, 32)
  _, start, _ = trained.load_run(workdir)
  summary, state, graphdef = loop.train(config, workdir)
  assert summary["step"] == 2 and trained.checkpoint_steps(workdir)[-1] == 2
  assert (state.bank is not None) == (bank_size > 0)
  trained_model = nnx.merge(graphdef, state.params)
  # Both parts trained: the imported backbone and the imported SAE encoder moved.
  head = SparseEncoder(str(st_dir))[2]
  np.testing.assert_array_equal(np.asarray(start.sae.w_enc[...]),
                                head.encoder.weight.detach().numpy().T)
  assert not np.allclose(np.asarray(trained_model.sae.w_enc[...]), np.asarray(start.sae.w_enc[...]))
  before, after = (jax.tree.leaves(nnx.state(m.encoder, nnx.Param)) for m in (start, trained_model))
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.fixture(scope="module")
def tiny_export(tiny_bert_dir, tmp_path_factory) -> tuple[Path, Path]:
  """(workdir, export) of a tiny run exported by `python -m saejax.hub.export`, with an eval.json."""
  root = tmp_path_factory.mktemp("tiny_export")
  st_dir = _st_sparse_encoder(tiny_bert_dir, root / "csr", max_len=48, latents=64, k=4)
  workdir = export.init_run_from_sparse_encoder(st_dir, tiny_config.get_config(), root / "run")
  (workdir / "eval.json").write_text(json.dumps({
      "beir_dir": str(tiny_config.quickstart.REPO / "data/debian-quickstart/beir-dev"),
      "split": "dev", "num_queries": 3, "num_docs": 9,
      "systems": {"saejax": {"ndcg@10": 0.5, "recall@100": 0.9, "mrr@10": 0.4}}}))
  out = root / "export"
  export.main(["--ckpt", str(workdir), "--out", str(out)])
  return workdir, out


def test_export_writes_the_trained_length_explicitly(tiny_export):
  workdir, out = tiny_export
  max_doc_len = trained.read_config(workdir).data.max_doc_len
  assert max_doc_len == 48  # the tiny config's 64, capped at the imported model's 48
  st_config = json.loads((out / "sentence_bert_config.json").read_text())
  assert st_config["max_seq_length"] == max_doc_len
  assert SparseEncoder(str(out)).max_seq_length == max_doc_len
  # sentence_bert_config.json is what decides: not the tokenizer's model_max_length.
  tok_file = out / "tokenizer_config.json"
  tok_config = json.loads(tok_file.read_text())
  tok_file.write_text(json.dumps({**tok_config, "model_max_length": 128}))
  try:
    assert SparseEncoder(str(out)).max_seq_length == max_doc_len
    _, _, info = export.load_sparse_encoder(out)
    assert info["max_seq_length"] == max_doc_len
    from saejax.eval import harness
    assert harness.load_system(out).trained_lens == (max_doc_len, max_doc_len)
  finally:
    tok_file.write_text(json.dumps(tok_config))


def test_export_cli_query_k(tiny_export, tmp_path):
  workdir, _ = tiny_export
  out = tmp_path / "routed"
  export.main(["--ckpt", str(workdir), "--out", str(out), "--query-k", "16"])
  _, _, info = export.load_sparse_encoder(out)
  assert (info["k"], info["query_k"]) == (trained.read_config(workdir).sae.k, 16)
  assert "16 for a query encoded with `model.encode_query`" in (out / "README.md").read_text()


def test_exported_files_get_the_umask_mode(tiny_export, tmp_path):
  workdir, out = tiny_export
  # Every file with the mode a new file gets here (safetensors alone would write 0600).
  mask = os.umask(0)
  os.umask(mask)
  modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777)
           for p in out.rglob("*") if p.is_file()}
  assert "2_SparseAutoEncoder/model.safetensors" in modes and "model.safetensors" in modes
  assert set(modes.values()) == {oct(0o666 & ~mask)}, modes
  dirs = {oct(p.stat().st_mode & 0o777) for p in [out, *out.rglob("*")] if p.is_dir()}
  assert dirs == {oct(0o777 & ~mask)}
  bb = export.export_run(workdir, tmp_path / "backbone", backbone_only=True)  # --backbone-only
  assert {oct(p.stat().st_mode & 0o777) for p in bb.rglob("*") if p.is_file()} == {
      oct(0o666 & ~mask)}


def test_model_card_names_no_local_path(tiny_export):
  workdir, out = tiny_export
  card = (out / "README.md").read_text()
  # Not the run's directory, nor the repository's (data), nor the environment's (MiniLM).
  for local in (workdir.parent, tiny_config.quickstart.REPO, Path(sys.prefix).resolve(),
                Path(sys.prefix)):
    assert str(local) not in card, local
  assert "from run `run` (checkpoint step 0)" in card
  assert "`data/debian-quickstart/train.jsonl`" in card  # repository files: relative to it
  assert "Retrieval on `data/debian-quickstart/beir-dev`" in card
  assert f'"init_from": "{workdir.parent.name}/csr"' in card  # elsewhere: the last two components


def test_bad_input_names_the_problem(tiny_bert_dir, tmp_path):
  # A run whose backbone saejax has no converter for.
  run = tmp_path / "roberta_run"
  run.mkdir()
  config = tiny_config.get_config()
  config.model.hf_config.model_type = "roberta"
  (run / "config.json").write_text(config.to_json_best_effort())
  with pytest.raises(ConfigError, match=rf"{run}.*'roberta'.*supported: modernbert"):
    export.export_run(run, tmp_path / "out")
  # Exporting over a non-empty directory without --force, from the command line.
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  with pytest.raises(export.OutputExistsError, match=rf"{full} exists and is not empty.*--force"):
    export.export_run(run, full)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(export.main, ["--ckpt", str(run), "--out", str(full)])
  assert exit_info.value.code == 2 and (full / "keep.txt").read_text() == "mine"
  # A SparseEncoder whose head is SPLADE's pooling, not a SparseAutoEncoder.
  splade = tmp_path / "splade"
  mlm = MLMTransformer(str(tiny_bert_dir), max_seq_length=32)
  SparseEncoder(modules=[mlm, SpladePooling("max")]).save(str(splade))
  with pytest.raises(CheckpointError, match=rf"{splade}: the head module is .*SpladePooling"):
    export.load_sparse_encoder(splade)
  with pytest.raises(CheckpointError, match="no modules.json"):
    export.load_sparse_encoder(tiny_bert_dir)
  # A query k the SAE cannot give, named by its flag before anything is loaded or written.
  config = tiny_config.get_config()
  with pytest.raises(ConfigError, match=rf"--query-k=99999 must be in \[1, "
                                        rf"{config.sae.num_latents}\]"):
    export.settings_for_run(config, query_k=99999)
  assert export.settings_for_run(config, query_k=config.sae.k).routed is False
  # A Normalize of something other than the SAE's code.
  odd = _st_sparse_encoder(tiny_bert_dir, tmp_path / "odd", max_len=32, latents=64, k=4,
                           after=(Normalize(module_input_name="token_embeddings"),))
  with pytest.raises(CheckpointError, match=r"3_Normalize/config.json: Normalize maps "
                                            r"'token_embeddings'"):
    export.load_sparse_encoder(odd)


def test_card_names_the_step_exported_past_a_damaged_one(tiny_run, tmp_path):
  """The newest checkpoint damaged: the export reads the one before (as load_run does) and its
  card names that step, whose SAE the export holds."""
  import shutil
  run = tmp_path / "run"
  shutil.copytree(tiny_run, run)
  *_, older, newest = trained.checkpoint_steps(run)
  biggest = max((p for p in (run / "checkpoints" / str(newest) / "state").rglob("*")
                 if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
  out = export.export_run(run, tmp_path / "export")
  assert f"from run `run` (checkpoint step {older})." in (out / "README.md").read_text()
  from safetensors.numpy import load_file
  exported = load_file(out / "2_SparseAutoEncoder" / "model.safetensors")["encoder.weight"]
  _, expected, _ = trained.load_run(run, older)
  np.testing.assert_array_equal(exported, np.asarray(expected.sae.w_enc[...]).T)


def _edit_json(file: Path, edit) -> None:
  file.write_text(json.dumps(edit(json.loads(file.read_text()))))


def test_damaged_sparse_encoder_files_are_named(tiny_bert_dir, tmp_path):
  """Each damaged file of a SparseEncoder directory is a CheckpointError naming it, not a raw
  safetensors / KeyError / AttributeError from deep inside the import."""
  import shutil
  good = _st_sparse_encoder(tiny_bert_dir, tmp_path / "good", max_len=32, latents=64, k=4)
  sae = "2_SparseAutoEncoder"
  without = lambda key: lambda d: {k: v for k, v in d.items() if k != key}  # noqa: E731
  cases = [
      (f"{sae}/model.safetensors", None, "is not a readable safetensors file"),
      (f"{sae}/config.json", without("hidden_dim"), "lacks 'hidden_dim'"),
      (f"{sae}/config.json", lambda d: {**d, "k": "four"}, ": 'k' is 'four'; expected an integer"),
      (f"{sae}/config.json", lambda d: {**d, "k": float("inf")}, ": 'k' is inf; expected an "),
      (f"{sae}/config.json", lambda d: [d], "holds a JSON list, not an object"),
      ("1_Pooling/config.json", lambda d: [d], "holds a JSON list, not an object"),
      ("modules.json", lambda ms: [without("path")(m) for m in ms],
       "is not a list of modules, each with a 'type' and a 'path'")]
  for i, (name, edit, match) in enumerate(cases):
    directory = tmp_path / f"case{i}"
    shutil.copytree(good, directory)
    file = directory / name
    if edit is None:  # truncated
      file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
      _edit_json(file, edit)
    with pytest.raises(CheckpointError, match=re.escape(f"{file}") + ".*" + re.escape(match)):
      export.load_sparse_encoder(directory)


def test_old_run_config_reads_as_raw_codes(tmp_path):
  """A config.json written before `SAEConfig.normalize_codes` existed trained on raw dot products:
  it reads back as normalize_codes=False, not as today's default True."""
  config = tiny_config.get_config()
  config.sae.normalize_codes = True
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  assert trained.read_config(tmp_path).sae.normalize_codes is True
  old = json.loads((tmp_path / "config.json").read_text())
  del old["sae"]["normalize_codes"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert trained.read_config(tmp_path).sae.normalize_codes is False
  assert sae_lib.SAEConfig(d_model=8, num_latents=16, k=2, k_aux=2).normalize_codes is True
