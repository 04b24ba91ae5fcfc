"""The one source of truth for sharding: a mesh from config and a logical-axis rules table.

Every parameter declares logical axes (`saejax.models.params.param`); `RULES` maps each logical axis
to mesh axes. Parameter shardings, batch shardings and the checks that nothing large is replicated
by accident all derive from here. The mesh uses Auto axes (GSPMD propagation, as MaxText and
Levanter do): jit gets explicit in/out shardings and XLA places the collectives, e.g. the all-gather
that gives the contrastive loss every negative of the global batch.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from saejax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. FSDP shards the model dimension of every matrix; tensor parallelism
# splits attention heads, the MLP and the SAE latents; the SAE's 16k x D matrices take fsdp through
# their model ("embed") axis and tensor through their latent axis.
RULES: dict[str, tuple[str, ...] | None] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "latent": ("tensor",),
    "position": None,
    "type": None,
}
BATCH_AXES = ("data", "fsdp")  # the batch is split over every data-parallel device


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; one axis may be -1 meaning "all remaining devices"."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), resolving the -1 axis."""
  devices = jax.devices() if devices is None else devices
  shape = [cfg.data, cfg.fsdp, cfg.tensor]
  bad = {a: s for a, s in zip(MESH_AXES, shape)
         if isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1)}
  if bad:
    raise ConfigError(f"mesh axis sizes must be positive ints or -1 (the rest of the devices); "
                      f"got {bad}")
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices; "
                      f"{len(devices)} are available")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    where: str = "") -> P:
  """PartitionSpec for logical `axes`; a mesh axis is used once and only where it divides."""
  used: set[str] = set()
  spec = []
  for name, size in zip(axes, shape):
    if name is not None and name not in RULES:
      raise ConfigError(f"parameter {where}: logical axis {name!r} has no sharding rule; "
                        f"known: {sorted(RULES)}")
    mesh_axes = tuple(a for a in (RULES.get(name) or ()) if a not in used and mesh.shape[a] > 1)
    if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
      used.update(mesh_axes)
      spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    else:
      spec.append(None)
  return P(*spec)


def param_specs(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A PartitionSpec per parameter from its `axes` metadata; a parameter without axes is an error."""
  def spec(path, var):
    axes = var.get_metadata().get("axes")
    value = var.get_value()
    name = ".".join(map(str, path))
    if axes is None:
      raise ConfigError(f"parameter {name} {value.shape} declares no logical axes")
    return var.replace(logical_to_spec(axes, value.shape, mesh, name))
  return nnx.map_state(spec, state)


def shardings(specs, mesh: Mesh):
  """NamedShardings from a pytree of PartitionSpecs (Variables unwrapped)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading axis over the data-parallel mesh axes, the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def sharding_like(x: jax.Array, keep: int, add: int) -> NamedSharding | None:
  """Under an Explicit mesh: x's sharding of its first ``keep`` axes followed by ``add`` whole axes.

  Explicit mesh axes (`jax.make_mesh`'s default) make JAX refuse ops whose output sharding it cannot
  infer, such as a gather of decoder rows at batch-sharded indices; this names the natural answer
  (batch axes stay sharded, latent and model axes are whole). None under Auto axes or without a
  mesh, where XLA's propagation decides.
  """
  sharding = jax.typeof(x).sharding
  if not (isinstance(sharding, NamedSharding) and sharding.mesh.explicit_axes):
    return None
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh, P(*spec[:keep], *(None,) * add))


def reshape_leading(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Reshape that merges or splits x's leading (batch) axis with the axis after it, the rest kept.

  Under an Explicit mesh JAX will not guess where a sharded batch axis goes when it is merged with
  or split from its neighbour; the batch's sharding stays on the leading axis (its major part, so
  each device keeps the rows it held) and the axes after the merged or split pair keep theirs.
  """
  sharding = jax.typeof(x).sharding
  if not (isinstance(sharding, NamedSharding) and sharding.mesh.explicit_axes):
    return x.reshape(shape)
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  merge = len(shape) < x.ndim          # merging drops x's axis 1; splitting adds a whole one
  rest = spec[2:] if merge else spec[1:]
  lead = (spec[0],) if merge else (spec[0], None)
  return jnp.reshape(x, shape, out_sharding=NamedSharding(sharding.mesh, P(*lead, *rest)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicated_large_params(state: nnx.State, mesh: Mesh, min_size: int = 1 << 16) -> list[str]:
  """Names of parameters with at least `min_size` elements that the rules leave fully replicated."""
  specs = param_specs(state, mesh)
  out = []
  for (path, var), (_, spec) in zip(nnx.to_flat_state(state), nnx.to_flat_state(specs)):
    value = var.get_value()
    if np.prod(value.shape) >= min_size and all(s is None for s in spec.get_value()):
      out.append(f"{'.'.join(map(str, path))} {tuple(value.shape)}")
  return out


def unsharded_warning(state: nnx.State, mesh: Mesh) -> str | None:
  """A warning when ``mesh`` shards parameters (fsdp or tensor > 1) yet large ones stay whole on
  every device: a mesh axis is used only where its size divides the dimension (fsdp = 5 on a
  768-wide model replicates 89 of ModernBERT-base's matrices), and the memory that costs shows up
  only as an out-of-memory error on a pod. None on a data-parallel mesh, which replicates by
  design."""
  if all(mesh.shape.get(a, 1) == 1 for a in ("fsdp", "tensor")):
    return None
  whole = replicated_large_params(state, mesh)
  if not whole:
    return None
  return (f"{len(whole)} parameters stay whole on every device although mesh {dict(mesh.shape)} "
          f"shards parameters (fsdp/tensor sizes that do not divide their dimensions): "
          f"{', '.join(whole[:4])}{' ...' if len(whole) > 4 else ''}; pick mesh sizes that divide "
          f"the model's dimensions")


def data_devices(mesh: Mesh) -> int:
  """The data-parallel devices of ``mesh``: the product of its `BATCH_AXES` (a batch splits over
  them)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


class OnMesh:
  """A jitted function traced, lowered and called with ``mesh`` as the ambient mesh
  (`jax.set_mesh`): `constrain_batch` and the model's per-shard kernels (splash attention, the
  Triton norms) read the mesh from there; outside it they are no-ops, leaving GSPMD to shard
  activations as it likes (on the hidden axis under FSDP, gathering the batch) or, for a TPU
  kernel, to fail to partition it."""

  def __init__(self, fn, mesh: Mesh):
    self.fn, self.mesh = fn, mesh

  def _ambient(self):
    """`jax.set_mesh`, which JAX allows only outside a trace; inside one (an eval_shape of the
    call), the mesh's abstract form, which is all tracing reads."""
    try:
      return jax.set_mesh(self.mesh)
    except ValueError as e:
      if "outside of `jax.jit`" not in str(e):
        raise
      return jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh)

  def __call__(self, *args):
    with self._ambient():
      return self.fn(*args)

  def lower(self, *args):
    with self._ambient():
      return self.fn.lower(*args)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pin an activation's leading (batch) axis to the data-parallel mesh axes.

  With FSDP the weights are split on their model dimension; left alone, GSPMD may follow the
  weights and split activations on the hidden axis instead of the batch, all-gathering the batch
  on every device. One constraint per block keeps activations batch-sharded (as MaxText does).
  A no-op outside a mesh context (`jax.set_mesh`) or where the batch does not divide.
  """
  axes = batch_split(x.shape[0])
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def batch_split(rows: int) -> tuple[str, ...]:
  """The data-parallel axes of the current mesh (`jax.set_mesh`) that split a leading axis of
  `rows`: those of size > 1. Empty outside a mesh, without the batch axes, or where `rows` does
  not divide over them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return ()
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
  if not axes or rows % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes
