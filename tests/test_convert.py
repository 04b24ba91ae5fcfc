"""Conversion CLI, Orbax encoder checkpoints and tokenizer checks."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from saejax import cli
from saejax.data.tokenizer import load_tokenizer, pad_id
from saejax.errors import CheckpointError, ConfigError
from saejax.hub import convert
from saejax.retrieval import encode

REPO = Path(__file__).resolve().parents[1]

# ModernBERT's own vocabulary, so that its tokenizer.json fits the model.
TINY = dict(vocab_size=50368, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=2, local_attention=8, max_position_embeddings=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def _hf_dir(directory, data_dir, **overrides):
  torch.manual_seed(0)
  model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**{**TINY, **overrides}))
  model.save_pretrained(directory)
  shutil.copyfile(data_dir / "modernbert-tokenizer" / "tokenizer.json",
                  directory / "tokenizer.json")
  return directory


@pytest.fixture
def hf_dir(tmp_path, data_dir):
  return _hf_dir(tmp_path / "hf", data_dir)


def test_cli_round_trip_through_orbax(tmp_path, hf_dir, capsys):
  convert.main(["hf-to-saejax", str(hf_dir), str(tmp_path / "ckpt")])
  assert "tokenizer.json" in capsys.readouterr().out
  assert (tmp_path / "ckpt" / "params").is_dir() and (tmp_path / "ckpt" / "tokenizer.json").exists()
  convert.main(["saejax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")])
  a, b = convert.read_tensors(hf_dir), convert.read_tensors(tmp_path / "back")
  a.pop("decoder.weight", None)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "back")
  assert reloaded.config.layer_types == transformers.AutoConfig.from_pretrained(hf_dir).layer_types


def test_cli_writes_every_file_with_the_umask_mode(tmp_path, hf_dir):
  """Every file ``python -m saejax.hub.convert`` writes, both ways, gets 0666 less the umask, and
  every directory 0777 less it: safetensors alone would leave model.safetensors 0600. A umask other
  than the usual 022 tells the umask's mode from a fixed 0644."""
  mask = 0o027
  for direction, src, out in (("hf-to-saejax", hf_dir, tmp_path / "ckpt"),
                              ("saejax-to-hf", tmp_path / "ckpt", tmp_path / "back")):
    done = subprocess.run([sys.executable, "-m", "saejax.hub.convert", direction, str(src),
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(mask))
    assert done.returncode == 0, done.stderr
    files = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in out.rglob("*") if p.is_file()}
    assert files and set(files.values()) == {oct(0o666 & ~mask)}, (direction, files)
    dirs = {oct(p.stat().st_mode & 0o777) for p in (out, *out.rglob("*")) if p.is_dir()}
    assert dirs == {oct(0o777 & ~mask)}, (direction, dirs)
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
      p.name for p in (tmp_path / "back").iterdir())


def test_cli_round_trip_keeps_an_untied_decoder(tmp_path, data_dir):
  src = _hf_dir(tmp_path / "hf", data_dir, tie_word_embeddings=False)
  convert.main(["hf-to-saejax", str(src), str(tmp_path / "ckpt")])
  convert.main(["saejax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")])
  a, b = convert.read_tensors(src), convert.read_tensors(tmp_path / "back")
  assert "decoder.weight" in b and a.keys() == b.keys()
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not transformers.AutoConfig.from_pretrained(tmp_path / "back").tie_word_embeddings


def test_cli_refuses_a_tokenizer_bigger_than_the_model(tmp_path, data_dir, capsys):
  """ModernBERT's tokenizer (ids to 50367) beside a 1,000-row model: refused, nothing written."""
  src = _hf_dir(tmp_path / "hf", data_dir, vocab_size=1000)
  capsys.readouterr()  # transformers' progress bar
  with pytest.raises(SystemExit) as exit_info:
    cli.run(convert.main, ["hf-to-saejax", str(src), str(tmp_path / "ckpt")])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.count("\n") == 1
  assert "emits ids up to 50367" in err and "vocab_size=1000" in err
  assert not (tmp_path / "ckpt").exists()
  (src / "tokenizer.json").unlink()  # a WordPiece vocab.txt is checked too
  (src / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(1001)) + "\n")
  with pytest.raises(ConfigError, match=r"vocab.txt emits ids up to 1000 .*vocab_size=1000"):
    convert.main(["hf-to-saejax", str(src), str(tmp_path / "ckpt")])


def test_encode_refuses_a_tokenizer_bigger_than_the_model(tmp_path, data_dir):
  """A tokenizer loaded without vocab_size is caught where it meets the model."""
  from flax import nnx

  from saejax.models import modernbert
  tok = load_tokenizer(data_dir / "modernbert-tokenizer")  # no vocab_size: not checked here
  cfg = modernbert.ModernBertConfig.from_hf_config({"model_type": "modernbert",
                                                    **TINY, "vocab_size": 1000})
  model = modernbert.ModernBert(cfg, rngs=nnx.Rngs(0))
  config = encode.EncodeConfig(max_len=16, batch_size=2, buckets=(16,), progress=False)
  with pytest.raises(ConfigError, match="emits ids up to 50367 .*vocab_size=1000"):
    encode.encode_dense(model, tok, ["hello world"], config)
  with pytest.raises(ConfigError, match="emits ids up to 50367 .*vocab_size=1000"):
    encode.tokenize(tok, ["hello world"], 16, vocab_size=cfg.vocab_size)


def test_orbax_restore_equals_saved(tmp_path, hf_dir):
  cfg, model = convert.load_hf(hf_dir, head=False)
  convert.save_encoder(cfg, model, tmp_path / "ckpt")
  cfg2, model2 = convert.restore_encoder(tmp_path / "ckpt")
  assert cfg2 == cfg
  ids = np.arange(3, 23, dtype=np.int32)[None]
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model2(ids)))
  with pytest.raises(CheckpointError, match="refusing to overwrite"):
    convert.save_encoder(cfg, model, tmp_path / "ckpt")


def test_restore_rejects_a_config_that_does_not_fit(tmp_path, hf_dir):
  cfg, model = convert.load_hf(hf_dir, head=False)
  convert.save_encoder(cfg, model, tmp_path / "ckpt")
  text = (tmp_path / "ckpt" / "config.json").read_text().replace('"hidden_size": 32',
                                                                 '"hidden_size": 64')
  (tmp_path / "ckpt" / "config.json").write_text(text)
  with pytest.raises(CheckpointError, match="does not fit the model"):
    convert.restore_encoder(tmp_path / "ckpt")


@pytest.mark.parametrize("pooler, args", [(False, []), (True, ["--no-head"])])
def test_cli_round_trip_of_a_bert_without_pooler(tmp_path, pooler, args):
  """A BERT without its pooler (an embedding model saved without one, or --no-head): its saejax
  checkpoint restores, and saejax-to-hf gives back its tensors bit for bit, from which
  transformers computes the original model's hidden states."""
  torch.manual_seed(0)
  original = transformers.BertModel(transformers.BertConfig(
      vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64), add_pooling_layer=pooler).eval()
  original.save_pretrained(tmp_path / "hf")
  convert.main(["hf-to-saejax", *args, str(tmp_path / "hf"), str(tmp_path / "ckpt")])
  cfg, _ = convert.restore_encoder(tmp_path / "ckpt")
  assert cfg.pooler is False
  convert.main(["saejax-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "back")])
  a, b = convert.read_tensors(tmp_path / "hf"), convert.read_tensors(tmp_path / "back")
  assert b.keys() == {k for k in a if not k.startswith("pooler.")}
  assert all(np.array_equal(a[k], b[k]) for k in b)
  ids = torch.tensor(np.random.default_rng(0).integers(1, 100, (2, 12)))
  with torch.no_grad():
    want = original(input_ids=ids).last_hidden_state.numpy()
    got = transformers.BertModel.from_pretrained(tmp_path / "back").eval()(
        input_ids=ids).last_hidden_state.numpy()
  np.testing.assert_array_equal(got, want)


def test_damaged_index_and_config_are_named(tmp_path):
  """A sharded checkpoint whose model.safetensors.index.json is truncated, lacks its weight_map or
  is not an object, and a config.json that is not an object: CheckpointErrors naming the file."""
  torch.manual_seed(0)
  base = tmp_path / "base"
  transformers.BertModel(transformers.BertConfig(
      vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=64)).save_pretrained(base,
                                                                        max_shard_size="20KB")
  index = "model.safetensors.index.json"
  assert (base / index).exists()
  cases = [(index, lambda text: text[: len(text) // 2], "is not valid JSON"),
           (index, lambda text: json.dumps({"metadata": {}}), "has no 'weight_map' object"),
           (index, lambda text: "[]", "has no 'weight_map' object"),
           ("config.json", lambda text: "[]", "holds a JSON list, not a model config object")]
  for i, (name, damage, match) in enumerate(cases):
    directory = tmp_path / f"case{i}"
    shutil.copytree(base, directory)
    (directory / name).write_text(damage((directory / name).read_text()))
    with pytest.raises(CheckpointError, match=re.escape(str(directory / name)) + ".* " + match):
      convert.load_hf(directory)


def test_tokenizer_vocab_mismatch_is_caught(data_dir):
  path = data_dir / "modernbert-tokenizer" / "tokenizer.json"
  tok = load_tokenizer(path, vocab_size=50368)
  assert pad_id(tok) == 50283
  with pytest.raises(ConfigError, match="emits ids up to 50367 .*only 30522 embedding rows"):
    load_tokenizer(path, vocab_size=30522)


def test_bad_tokenizer_file(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
    load_tokenizer(tmp_path)
  with pytest.raises(ConfigError, match="no tokenizer.json"):
    load_tokenizer(tmp_path / "missing")
