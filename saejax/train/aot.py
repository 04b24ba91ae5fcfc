"""Compile the real training step for a pod-sized mesh without the pod: a check before launching.

    python -m saejax.train.aot --config configs/base.py --devices 64 [--mesh data=8,fsdp=8,tensor=1]
                         [--batch 64] [--budget_gib 16] [--config.sae.k=32]

The step is compiled ahead of time (`jax.jit(...).lower(...).compile()`, JAX's AOT API) on fake
CPU devices (`jax_num_cpu_devices`, set before the CPU backend starts), with:

  * an abstract TrainState from `jax.eval_shape` / `nnx.eval_shape` (shapes and dtypes only: no
    parameter is allocated, so ModernBERT-large builds in seconds on a laptop), as gemma and
    jax-llm-examples check their large configs;
  * the shardings `saejax.train` uses: parameters by `saejax.sharding.RULES`, optimiser moments
    like their parameters, the batch over the data axes, the state donated;
  * an abstract global batch of the config's lengths (`--batch` overrides the global batch size:
    compiling 512 x 544 tokens on a CPU is slow; memory per device scales with batch / devices).

It prints the mesh, XLA's per-device memory analysis (arguments, outputs, temporaries, the peak
estimate) and the sharding of the largest parameters, and exits non-zero with the reason when a
large parameter would be replicated on every device or the peak exceeds `--budget_gib`.

What it cannot tell: the numbers are XLA:CPU's buffer assignment for the same partitioned program;
TPU and GPU compilers fuse and rematerialise differently (and the attention backend is "xla" here,
not splash or cuDNN), so treat the peak as an estimate with a margin, not as the device's figure.
"""

import dataclasses
import math
import time

import jax
import ml_collections
from absl import app, flags
from flax import nnx

from saejax import sharding
from saejax.errors import ConfigError, SaejaxError
from saejax.hub.build import build_model, from_section
from saejax.hub.state import OptimConfig, init_state, make_optimizer
from saejax.train import loop, step as step_lib

GIB = 1 << 30


class CompileCheckError(SaejaxError):
  """The step compiles into something that must not be launched (replicated weights, no room)."""
  exit_code = 1  # the check ran and failed (saejax.cli exits 2 for input that is wrong)


@dataclasses.dataclass(frozen=True)
class ParamPlacement:
  """Where one parameter lives: its global shape, PartitionSpec and shape on each device."""
  name: str
  shape: tuple[int, ...]
  spec: str
  shard_shape: tuple[int, ...]
  bytes_per_device: int


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What the compiled step needs on each device (bytes) and where the big parameters go."""
  mesh: dict[str, int]
  global_batch: int
  num_params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int                 # outputs written into donated arguments
  temp_bytes: int
  compile_s: float
  largest: tuple[ParamPlacement, ...]

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs not aliased to them + temporaries: XLA's live-buffer upper bound."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def lines(self) -> list[str]:
    mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
    g = lambda n: f"{n / GIB:8.3f} GiB"  # noqa: E731
    out = [f"mesh {mesh} ({math.prod(self.mesh.values())} devices), global batch "
           f"{self.global_batch}, {self.num_params:,} parameters, compiled in "
           f"{self.compile_s:.1f} s",
           "per device:",
           f"  arguments     {g(self.argument_bytes)}  (state + batch shards)",
           f"  outputs       {g(self.output_bytes)}  ({g(self.alias_bytes).strip()} written into "
           "donated arguments)",
           f"  temporaries   {g(self.temp_bytes)}",
           f"  peak estimate {g(self.peak_bytes)}",
           "largest parameters (global shape -> spec -> shape on each device):"]
    out += [f"  {p.name:<40} {str(p.shape):<16} {p.spec:<28} {str(p.shard_shape):<16} "
            f"{p.bytes_per_device / 2**20:9.2f} MiB" for p in self.largest]
    return out


def abstract_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(jitted train_step, abstract state, abstract params, state shardings), nothing allocated."""
  loss_cfg = from_section(step_lib.LossConfig, config.loss, "loss")
  optim_cfg = from_section(OptimConfig, config.optim, "optim")
  build = lambda: build_model(config, nnx.Rngs(config.train.seed),  # noqa: E731
                              load_weights=False)[1]
  graphdef, params = nnx.split(nnx.eval_shape(build), nnx.Param)
  tx = make_optimizer(optim_cfg, params)
  state = jax.eval_shape(lambda: init_state(build(), tx, loss_cfg.bank_size))  # as training
  param_sh = sharding.shardings(sharding.param_specs(params, mesh), mesh)
  state_sh = loop._state_shardings(state, param_sh, mesh)
  step = loop.jit_train_step(graphdef, tx, loss_cfg, optim_cfg, state_sh, mesh)
  return step, state, params, state_sh


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of one global batch at the config's maximum lengths, batch-sharded."""
  d = config.data
  loop.check_batch_split(global_batch, config.optim.get("grad_accum", 1), mesh)  # as training
  shapes = {"q_ids": ((global_batch, d.max_query_len), "int32"),
            "q_valid": ((global_batch, d.max_query_len), "bool"),
            "d_ids": ((global_batch, 1 + d.num_hard_negatives, d.max_doc_len), "int32"),
            "d_valid": ((global_batch, 1 + d.num_hard_negatives, d.max_doc_len), "bool")}
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


def placements(params: nnx.State, mesh: jax.sharding.Mesh, top: int) -> tuple[ParamPlacement, ...]:
  """The `top` largest parameters with their spec and per-device shard shape."""
  specs = sharding.param_specs(params, mesh)
  rows = []
  for (path, var), (_, spec) in zip(nnx.to_flat_state(params), nnx.to_flat_state(specs)):
    value, spec = var.get_value(), spec.get_value()
    shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(value.shape)
    rows.append(ParamPlacement(".".join(map(str, path)), tuple(value.shape), str(spec), shard,
                               math.prod(shard) * value.dtype.itemsize))
  return tuple(sorted(rows, key=lambda p: -math.prod(p.shape))[:top])


def compile_check(config: ml_collections.ConfigDict, mesh_cfg: sharding.MeshConfig, *,
                  global_batch: int | None = None, budget_gib: float | None = None,
                  top: int = 8, min_replicated_size: int = 1 << 16) -> CompileReport:
  """Compile the training step for `mesh_cfg` over the current devices and check it.

  Args:
    config: a training config (`configs/*.py`).
    mesh_cfg: the mesh (one axis may be -1).
    global_batch: records per step; None takes config.data.global_batch_size.
    budget_gib: the most memory one device may need; None skips the check.
    top: how many of the largest parameters the report lists.
    min_replicated_size: parameters with this many elements must not be fully replicated.

  Returns:
    The `CompileReport`.

  Raises:
    CompileCheckError: a large parameter is replicated (before compiling), or the peak estimate
      exceeds `budget_gib` (the error carries the report's lines).
  """
  mesh = sharding.make_mesh(mesh_cfg)
  global_batch = global_batch or config.data.global_batch_size
  step, state, params, state_sh = abstract_step(config, mesh)
  # On one device nothing is copied; on several, a replicated large weight costs every device.
  replicated = (sharding.replicated_large_params(params, mesh, min_replicated_size)
                if mesh.size > 1 else [])
  if replicated:
    sizes = {".".join(map(str, path)): math.prod(var.get_value().shape)
             for path, var in nnx.to_flat_state(params)}
    replicated.sort(key=lambda entry: -sizes[entry.split(" ")[0]])  # the largest first
    raise CompileCheckError(
        f"{len(replicated)} parameters of >= {min_replicated_size:,} elements would be fully "
        f"replicated on all {mesh.size} devices of mesh {dict(mesh.shape)}: "
        f"{', '.join(replicated[:6])}{' ...' if len(replicated) > 6 else ''}. Map their logical "
        "axes (saejax/sharding.py RULES) to a mesh axis of size > 1, e.g. fsdp or tensor")
  batch = abstract_batch(config, mesh, global_batch)
  start = time.time()
  compiled = step.lower(state, batch, True).compile()  # a logging step: the larger one
  stats = compiled.memory_analysis()
  report = CompileReport(
      mesh=dict(mesh.shape), global_batch=global_batch,
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
      argument_bytes=stats.argument_size_in_bytes, output_bytes=stats.output_size_in_bytes,
      alias_bytes=stats.alias_size_in_bytes, temp_bytes=stats.temp_size_in_bytes,
      compile_s=time.time() - start, largest=placements(params, mesh, top))
  if budget_gib is not None and report.peak_bytes > budget_gib * GIB:
    raise CompileCheckError(
        "\n".join(report.lines()) + f"\nthe peak estimate {report.peak_bytes / GIB:.2f} GiB per "
        f"device exceeds --budget_gib={budget_gib}: lower the batch per device (more data "
        "devices, config.optim.grad_accum) or shard more (mesh fsdp/tensor)")
  return report


def parse_mesh(text: str) -> sharding.MeshConfig:
  """'data=8,fsdp=8,tensor=1' (any subset; the rest keep MeshConfig's defaults)."""
  fields = {f.name for f in dataclasses.fields(sharding.MeshConfig)}
  values = {}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    if key.strip() not in fields or not value.strip().lstrip("-").isdigit():
      raise ConfigError(f"--mesh item {item!r}: expected NAME=INT with NAME in {sorted(fields)}")
    values[key.strip()] = int(value)
  return sharding.MeshConfig(**values)


_CONFIG = loop._CONFIG  # --config and its --config.x.y overrides, as saejax.train defines them
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for (the pod's size).")
_MESH = flags.DEFINE_string("mesh", None, "data=..,fsdp=..,tensor=..; default: config.mesh.")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch; default config.data.global_batch_size.")
_BUDGET = flags.DEFINE_float("budget_gib", 16.0, "Most memory per device (GiB); <= 0: no check.")
_TOP = flags.DEFINE_integer("top", 8, "How many of the largest parameters to list.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  # Fake devices: must be set before the CPU backend starts (nothing above touched a device).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  config = _CONFIG.value
  if config.model.attention_backend not in ("", "xla"):
    print(f"note: attention_backend {config.model.attention_backend!r} needs its accelerator; "
          "compiling with 'xla'")
  config.model.attention_backend = "xla"
  if jax.device_count() != _DEVICES.value:
    raise ConfigError(f"asked for {_DEVICES.value} CPU devices but JAX has "
                      f"{jax.device_count()}; run saejax.train.aot in a fresh process")
  mesh_cfg = (parse_mesh(_MESH.value) if _MESH.value else
              from_section(sharding.MeshConfig, config.mesh, "mesh"))
  report = compile_check(config, mesh_cfg, global_batch=_BATCH.value,
                         budget_gib=_BUDGET.value if _BUDGET.value > 0 else None, top=_TOP.value)
  print("\n".join(report.lines()))
  print("ok: no large parameter is replicated" +
        (f"; the peak fits {_BUDGET.value} GiB" if _BUDGET.value > 0 else ""))


if __name__ == "__main__":
  from saejax import cli
  flags.mark_flag_as_required("config")
  cli.run(cli.check_command_line)  # a misspelt override or a missing file: one line
  cli.run(main, absl=True)
