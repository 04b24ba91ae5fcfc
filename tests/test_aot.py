"""The compile check: the real recipe's step compiled for 8 fake devices, and its two refusals."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from flax import nnx

import tiny_config  # tests/ is on sys.path (pytest rootdir-relative import)
from saejax import sharding
from saejax.errors import ConfigError
from saejax.hub import build
from saejax.train import aot

REPO = Path(__file__).resolve().parents[1]
# configs/base.py at full width (vocab, hidden 768, MLP, 16k latents, bf16) but 3 of its 22 layers
# (one global, two local attention layers): the same program, compiled in seconds, not a minute.
BASE = ["--config", str(REPO / "configs" / "base.py"), "--devices", "8", "--batch", "8",
        "--mesh", "data=2,fsdp=4,tensor=1", "--config.model.hf_config.num_hidden_layers=3"]


def _aot(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
  cmd = [sys.executable, "-m", "saejax.train.aot", *args] if code is None else \
      [sys.executable, "-c", code, *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True,
                        text=True, timeout=300)


def test_base_recipe_compiles_for_8_devices_with_memory_report():
  out = _aot(*BASE, "--budget_gib=4")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout
  assert "mesh data=2, fsdp=4, tensor=1 (8 devices), global batch 8" in lines
  for name in ("arguments", "outputs", "temporaries", "peak estimate"):
    assert f"  {name} " in lines
  peak = float(lines.split("peak estimate")[1].split("GiB")[0])
  assert 0 < peak <= 4
  # The largest weights are split over fsdp: the token embedding keeps a quarter of D per device.
  row = next(x for x in lines.splitlines() if "encoder.tok_embeddings" in x)
  assert "(50368, 768)" in row and "P(None, 'fsdp')" in row and "(50368, 192)" in row
  assert "ok: no large parameter is replicated; the peak fits 4.0 GiB" in lines


def test_budget_too_small_fails_with_the_report():
  out = _aot(*BASE, "--budget_gib=0.01")  # the same program: a compilation-cache hit
  assert out.returncode == 1
  assert "peak estimate" in out.stderr
  assert "exceeds --budget_gib=0.01" in out.stderr and "fsdp/tensor" in out.stderr


REPLICATING_RULE = """
from saejax import cli, sharding
from saejax.train import aot
sharding.RULES["embed"] = None  # the model dimension no longer takes fsdp
cli.run(aot.main, absl=True)
"""


def test_rule_that_replicates_large_params_fails_before_compiling():
  out = _aot(*BASE, code=REPLICATING_RULE)
  assert out.returncode == 1, out.stdout
  assert "would be fully replicated on all 8 devices" in out.stderr
  assert "encoder.tok_embeddings (50368, 768)" in out.stderr
  assert "compiled in" not in out.stdout + out.stderr


def test_parse_mesh():
  assert aot.parse_mesh("data=8,fsdp=4") == sharding.MeshConfig(data=8, fsdp=4, tensor=1)
  assert aot.parse_mesh("tensor=2,data=-1") == sharding.MeshConfig(data=-1, fsdp=1, tensor=2)
  with pytest.raises(ConfigError, match=r"--mesh item 'pipeline=2'"):
    aot.parse_mesh("data=2,pipeline=2")
  with pytest.raises(ConfigError, match=r"--mesh item 'fsdp=x'"):
    aot.parse_mesh("fsdp=x")
  for bad, named in (("data=-1,fsdp=0", r"\{'fsdp': 0\}"), ("data=-1,tensor=-2", r"\{'tensor': -2\}")):
    with pytest.raises(ConfigError, match=rf"mesh axis sizes must be positive ints or -1.*{named}"):
      sharding.make_mesh(aot.parse_mesh(bad))


def test_the_checked_state_is_the_one_training_builds():
  """The compile check sizes the state training runs with, memory bank included."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", REPO / "tests" / "tiny_config.py")
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = tiny.get_config()
  config.loss.bank_size = 16
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=1))
  _, state, _, _ = aot.abstract_step(config, mesh)
  assert state.bank is not None and state.bank["v"].shape == (16, config.model.hf_config.hidden_size)


ON_MESH = """
import importlib.util, sys
from saejax import sharding
from saejax.train import aot
spec = importlib.util.spec_from_file_location("tiny", sys.argv[1])
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
config = tiny.get_config()
mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=1))
step, state, _, _ = aot.abstract_step(config, mesh)
batch = aot.abstract_batch(config, mesh, 8)
print("constraints", step.lower(state, batch, True).as_text().count("sharding_constraint"),
      step.fn.lower(state, batch, True).as_text().count("sharding_constraint"))
"""


def test_the_train_step_is_traced_under_its_mesh():
  """Training's step (and the compile check's) sees its mesh while traced: under FSDP each
  encoder block's activations are pinned to the batch axes (`sharding.constrain_batch`); traced
  without the ambient mesh, the same jit has none of those constraints."""
  out = subprocess.run([sys.executable, "-c", ON_MESH, str(REPO / "tests" / "tiny_config.py")],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert out.returncode == 0, out.stderr[-3000:]
  with_mesh, without = map(int, out.stdout.split("constraints")[1].split())
  assert with_mesh >= 2 * 2 and without == 0  # two tiny BERT layers, queries and documents


def test_training_warns_when_mesh_sizes_leave_large_params_whole():
  """A mesh axis is used only where its size divides the dimension: fsdp = 3 on the tiny model's
  32-wide embedding table leaves it whole on every device, which the trainer says at start (it
  would otherwise show only as an out-of-memory error on a pod). fsdp = 2 divides it; a
  data-parallel mesh replicates by design."""
  config = tiny_config.get_config()
  model = nnx.eval_shape(lambda: build.build_model(config, nnx.Rngs(0), load_weights=False)[1])
  _, params = nnx.split(model, nnx.Param)

  def warning(**shape):
    return sharding.unsharded_warning(params, types.SimpleNamespace(
        shape={"data": 1, "fsdp": 1, "tensor": 1, **shape}))

  message = warning(fsdp=3)
  assert message.startswith("1 parameters stay whole on every device although mesh "
                            "{'data': 1, 'fsdp': 3, 'tensor': 1}"), message
  assert "word (30522, 32)" in message, message
  assert warning(fsdp=2) is None and warning(data=8) is None
