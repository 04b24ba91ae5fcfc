"""The memory bank (`saejax.sae.memory`): its pieces against hand-built cases, the train step's
use of it (entries written and read back as negatives, in the sparse and the dense arm), and a run
with a bank that, stopped and resumed from its checkpoint, ends exactly where an uninterrupted one
does."""

import dataclasses
import functools
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from saejax.errors import ConfigError, ShapeError
from saejax.data import pipeline as data
from saejax.hub import build, checkpoint, trained
from saejax.hub.state import OptimConfig, init_state, make_optimizer
from saejax.sae import memory, topk as sae_lib
from saejax.train import loop, step as step_lib
from test_train import _final_params, _assert_same_params, _run, _tiny, _wait_for


def test_text_hash_ignores_padding_and_tells_texts_apart():
  ids = jnp.asarray([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9], [6, 5, 7, 0, 0], [5, 6, 0, 0, 0]])
  valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
  short = memory.text_hash(ids[:1, :3], valid[:1, :3])  # the same text in a shorter bucket
  h = np.asarray(memory.text_hash(ids, valid))
  assert h[0] == h[1] == int(short[0])  # padding (whatever its ids) changes nothing
  assert len({h[0], h[2], h[3]}) == 3   # order and length matter
  assert h.dtype == np.int32


def test_sparse_scores_match_dense_dot_products():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((3, 20)).astype(np.float32)
  indices = np.stack([rng.choice(20, 4, replace=False) for _ in range(5)]).astype(np.int32)
  values = rng.standard_normal((5, 4)).astype(np.float32)
  dense = np.zeros((5, 20), np.float32)
  np.put_along_axis(dense, indices, values, -1)
  np.testing.assert_allclose(memory.sparse_scores(jnp.asarray(q), jnp.asarray(values),
                                                  jnp.asarray(indices)), q @ dense.T, rtol=1e-5)


def test_push_is_a_ring_of_whole_batches():
  bank = memory.init_bank(6, 2, 3)
  for step in range(4):  # batches of 2: slots 0-1, 2-3, 4-5, then 0-1 again
    entries = {"v": jnp.full((2, 2), step + 1.0), "text_hash": jnp.full((2,), step, jnp.int32),
               "values": jnp.full((2, 3), step + 1.0), "indices": jnp.full((2, 3), step, jnp.int32)}
    bank = memory.push(bank, entries, jnp.asarray(step))
    if step == 1:
      np.testing.assert_array_equal(bank["valid"], [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(bank["text_hash"], [3, 3, 1, 1, 2, 2])
  np.testing.assert_array_equal(bank["v"][:, 0], [4, 4, 2, 2, 3, 3])
  np.testing.assert_array_equal(bank["valid"], [1] * 6)
  with pytest.raises(ShapeError, match="multiple of the global batch"):
    memory.push(memory.init_bank(5, 2, 3), entries, jnp.asarray(0))


def test_candidate_mask_drops_empty_slots_own_positive_and_own_text():
  bank = memory.init_bank(3, 2, None)
  bank["valid"] = jnp.asarray([1, 1, 0], jnp.int32)
  bank["text_hash"] = jnp.asarray([7, 8, 9], jnp.int32)
  mask = memory.candidate_mask(bank, q_hash=jnp.asarray([8, 1]), pos_hash=jnp.asarray([2, 7]))
  np.testing.assert_array_equal(mask, [[True, False, False], [False, True, False]])


def _batch(seed: int) -> dict:
  """4 queries of 8 tokens with one positive of 12 tokens each (distinct random texts)."""
  rng = np.random.default_rng(seed)
  return {"q_ids": rng.integers(1000, 2000, (4, 8)).astype(np.int32),
          "q_valid": np.ones((4, 8), bool),
          "d_ids": rng.integers(1000, 2000, (4, 1, 12)).astype(np.int32),
          "d_valid": np.ones((4, 1, 12), bool)}


@pytest.mark.parametrize("sparse", [True, False])
def test_train_step_writes_positives_and_scores_queries_against_them(sparse):
  config = _tiny()
  config.sae.enabled = sparse
  _, model = build.build_model(config, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  optim = OptimConfig(warmup_steps=1, total_steps=10)
  tx = make_optimizer(optim, params)
  train = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx,
                                    loss_cfg=step_lib.LossConfig(bank_size=8), optim_cfg=optim))
  state = init_state(model, tx, bank_size=8)
  first = _batch(0)
  state, m0 = train(state, first)  # lr 0 at step 1 (warm-up): the model is unchanged
  assert "bank_score" in m0 and float(m0["bank_score"]) == 0.0  # empty bank: no candidates
  bank = jax.device_get(state.bank)
  np.testing.assert_array_equal(bank["valid"], [1] * 4 + [0] * 4)
  np.testing.assert_array_equal(bank["text_hash"][:4], memory.text_hash(
      first["d_ids"][:, 0], first["d_valid"][:, 0]))
  v = model.dense(first["d_ids"][:, 0], first["d_valid"][:, 0])
  np.testing.assert_allclose(bank["v"][:4], sae_lib.unit_norm(v), atol=1e-5)
  if sparse:
    out = model(first["d_ids"][:, 0], first["d_valid"][:, 0])
    np.testing.assert_array_equal(bank["indices"][:4], out.code.indices)
    np.testing.assert_allclose(bank["values"][:4], sae_lib.unit_norm(out.code.values), atol=1e-5)

  # Step 2 (the parameters are still step 0's): the same batch again, against an empty bank and
  # against the one holding its positives. Query i's own positive, at slot i, is masked for query
  # i and is a negative for the other three, so the loss rises.
  _, repeated = train(state, first)
  assert float(repeated["bank_score"]) != 0.0
  assert float(repeated["info_nce"]) > float(m0["info_nce"])
  _, unmasked = train(state.replace(bank={**state.bank, "text_hash": -1 - state.bank["text_hash"]}),
                      first)  # the same entries under other hashes: each query's copy counts too
  assert float(unmasked["info_nce"]) > float(repeated["info_nce"]) + 0.1


def test_bank_size_must_be_whole_batches(tmp_path):
  config = _tiny()
  config.loss.bank_size = 12  # the tiny config's global batch is 8
  with pytest.raises(ConfigError, match="bank_size=12 must be a multiple"):
    loop.train(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_band_wider_than_the_latents_outside_the_code_fails_before_the_run_starts(tmp_path):
  config = _tiny()
  config.loss.st_band = config.sae.num_latents - config.sae.k + 1
  with pytest.raises(ConfigError, match="st_band=.* is more than the"):
    loop.train(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_run_with_a_bank_resumes_exactly(tmp_path):
  bank = "--config.loss.bank_size=32"  # 4 batches of 8: the ring wraps during the run
  reference = tmp_path / "reference"
  _run(reference, bank, steps=12)
  resumed = tmp_path / "resumed"
  proc = _run(resumed, bank, steps=12, wait=False)
  _wait_for(lambda: (resumed / "checkpoints" / "6").is_dir(), proc)
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=120)
  _run(resumed, bank, steps=12)
  _assert_same_params(_final_params(resumed, 12), _final_params(reference, 12))
  banks = [_saved(run, 12)["bank"] for run in (resumed, reference)]
  _assert_same_params(banks[0], banks[1])
  assert np.asarray(banks[0]["valid"]).all()
  _, model, _ = trained.load_run(reference)  # the config's bank_size gives the saved tree
  _assert_same_params(nnx.state(model, nnx.Param), _final_params(reference, 12))


def test_checkpoint_from_before_the_bank_field_loads_and_resumes(tmp_path):
  """A TrainState saved without a ``bank`` entry (saejax before the memory bank) is still read by
  `load_run` and by a resuming run: Orbax restores only into the tree it saved."""
  config = _tiny()
  workdir = tmp_path / "old"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  _, model = build.build_model(config, nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(build.from_section(OptimConfig, config.optim, "optim"), params)
  tokenizer = trained.tokenizer_for(config, model.encoder.cfg.vocab_size)
  make_iter = lambda: data.make_iterator(build.data_config(config), tokenizer, shard_index=0,  # noqa: E731
                                         shard_count=1)
  state = init_state(model, tx)
  legacy = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "bank"}
  ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", save_every=1, keep=1,
                                      async_save=False)
  try:
    ckpt.save(0, legacy, make_iter(), force=True)
    ckpt.wait()
    assert "bank" not in _saved(workdir, 0)
    restored = ckpt.restore(jax.eval_shape(lambda: init_state(model, tx)), make_iter())
  finally:
    ckpt.close()
  assert restored.bank is None
  _assert_same_params(restored.params, state.params)
  _assert_same_params(restored.opt_state, state.opt_state)
  _, loaded, _ = trained.load_run(workdir)
  _assert_same_params(nnx.state(loaded, nnx.Param), state.params)


def _saved(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(workdir / "checkpoints" / str(step) / "state")
