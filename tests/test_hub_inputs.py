"""What `saejax.hub` builds a run's model from: the training config's encoder and the workdir.

Training, `trained.load_run` (evaluation, export, corpus encoding) and export must build one and
the same encoder; an input that would make them differ, or that is not a training workdir at all,
is refused by name before anything is built.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from saejax import cli
from saejax.errors import CheckpointError, ConfigError
from saejax.hub import build, export, trained
from saejax.hub.demo import minilm_dir

sys.path.insert(0, str(Path(__file__).parent))
import tiny_config  # noqa: E402


def test_hf_config_must_describe_the_init_from_weights(tmp_path):
  """Training builds the encoder from init_from's config.json (with its weights); a run's loaders
  build it without the weights. A config.model.hf_config that describes another encoder than
  init_from's (here tests/tiny_config.py's: the same shapes, exact GELU and eps 1e-12) would make
  them differ silently, so both refuse it, naming the fields."""
  torch.manual_seed(0)
  hf = transformers.BertModel(transformers.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=128, hidden_act="gelu_new",
      layer_norm_eps=1e-5), add_pooling_layer=False).eval()
  hf.save_pretrained(tmp_path / "bert")
  config = tiny_config.get_config("2")
  config.model.init_from = str(tmp_path / "bert")
  for load_weights in (True, False):
    with pytest.raises(ConfigError, match=r"hf_config and .*bert/config.json .*different encoders: "
                                          r"layer_norm_eps: 1e-12 vs 1e-05; hidden_act: 'gelu' "
                                          r"vs 'gelu_new'"):
      build.build_model(config, nnx.Rngs(0), load_weights=load_weights)
  # Once they agree, the encoder built without the weights computes transformers' function when
  # given them (as load_run gives it the checkpoint's).
  config.model.hf_config.update(hidden_act="gelu_new", layer_norm_eps=1e-5)
  _, loaded = build.build_model(config, nnx.Rngs(0))
  _, shell = build.build_model(config, nnx.Rngs(1), load_weights=False)
  nnx.update(shell.encoder, nnx.state(loaded.encoder, nnx.Param))
  ids = np.random.default_rng(0).integers(1000, 30000, (2, 16))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
  got = np.asarray(shell.encoder(ids, mask.astype(bool)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want.numpy()[valid], atol=1e-4, rtol=0)


def test_modernbert_hf_config_must_describe_the_init_from_weights(tmp_path):
  """The same for ModernBERT: init_from's attention in every layer global and another RoPE theta
  (no parameter shape changes) are named; a hub id that is not fetched for a build without the
  weights leaves hf_config to stand in (the run checked them against each other when it trained)."""
  hf = dict(vocab_size=50368, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=2, max_position_embeddings=128, local_attention=8,
            pad_token_id=50283, cls_token_id=50281, sep_token_id=50282, bos_token_id=50281,
            eos_token_id=50282)
  transformers.ModernBertConfig(**hf, global_attn_every_n_layers=1,
                                global_rope_theta=10_000.0).save_pretrained(tmp_path / "mb")
  config = tiny_config.get_config("2")
  config.model.hf_config = dict(model_type="modernbert", **hf)
  config.model.init_from = str(tmp_path / "mb")
  with pytest.raises(ConfigError, match=r"layer_types: \('full_attention', 'sliding_attention', "
                                        r"'sliding_attention'\) vs \('full_attention', "
                                        r"'full_attention', 'full_attention'\); "
                                        r"global_rope_theta: 160000.0 vs 10000.0"):
    build.build_model(config, nnx.Rngs(0), load_weights=False)
  config.model.init_from = "nobody/not-fetched"
  shell = nnx.eval_shape(lambda: build.build_model(config, nnx.Rngs(0), load_weights=False)[1])
  assert shell.encoder.cfg.layer_types == ("full_attention", "sliding_attention",
                                           "sliding_attention")


def test_a_model_directory_is_not_a_training_workdir(tmp_path, capsys):
  """A sentence-transformers or Hugging Face model directory has a config.json too: given where a
  training workdir is expected, it is named for what it is, in one line from the command line."""
  hf_dir = tmp_path / "hf"
  transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64).save_pretrained(hf_dir)
  for directory in (minilm_dir(), hf_dir):
    with pytest.raises(CheckpointError, match=re.escape(f"{directory} looks like a Hugging Face "
                                                        "/ sentence-transformers model directory")):
      trained.load_run(directory)
    with pytest.raises(SystemExit) as exit_info:
      cli.run(export.main, ["--ckpt", str(directory), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "config.json is not a saejax training config" in err
  # A config.json without the sections a model is built from, or not an object at all.
  odd = tmp_path / "odd"
  odd.mkdir()
  (odd / "config.json").write_text(json.dumps({"optim": {"lr_sae": 1e-3}}))
  with pytest.raises(CheckpointError, match=r"config.json is not a saejax training config: it "
                                            r"lacks the sections \['model', 'sae', 'data'\]"):
    trained.load_run(odd)
  with pytest.raises(CheckpointError, match=r"lacks the sections \['model', 'sae', 'data'\]"):
    export.export_run(odd, tmp_path / "out")
  (odd / "config.json").write_text("[]")
  with pytest.raises(CheckpointError, match=r"odd/config.json holds a JSON list"):
    trained.read_config(odd)


def test_load_run_refuses_a_model_override_it_would_ignore(tmp_path):
  """``load_run(workdir, dtyp="float32")``: ConfigDict.update would add the misspelt key and the
  model would be built at the run's dtype; the override is refused by name instead."""
  (tmp_path / "config.json").write_text(tiny_config.get_config().to_json_best_effort())
  with pytest.raises(ConfigError, match=r"model_overrides \['dtyp'\] are not config.model fields"):
    trained.load_run(tmp_path, dtyp="float32")
  # Real fields (remat: one a run's config.json may predate) pass on to the checkpoint lookup.
  with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
    trained.load_run(tmp_path, dtype="float32", attention_backend="xla", remat=True)
