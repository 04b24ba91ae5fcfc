"""Multi-controller runtime: one Python process per host (or per GPU), all running the same program.

JAX's multi-controller model (https://docs.jax.dev/en/latest/multi_process.html): every process
calls `jax.distributed.initialize` before it touches a device, then sees every device of the job
in `jax.devices()` and its own in `jax.local_devices()`. saejax's training loop is written for it:

  * each process reads only its shard of the data (`data.make_iterator(shard_index=process_index)`)
    and turns its rows into one global array with `jax.make_array_from_process_local_data`;
  * only process 0 writes config.json, logs, metrics.jsonl, TensorBoard events and summary.json;
    every process writes its own batch fingerprints and takes part in every Orbax save and restore;
  * a preemption notice (SIGTERM) reaching any process stops every process at the same step, the
    step JAX's coordination service agrees on (`multihost_utils.reached_preemption_sync_point`),
    so the checkpoint written on the way out is a collective that all of them join.

How a process finds the others (`detect`):

  * explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (all three);
  * SLURM: inside `srun` with more than one task (SLURM_NTASKS > 1): JAX reads SLURM_* itself;
  * TPU: on a Cloud TPU VM, or under GKE's TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES:
    JAX reads the worker list from the TPU metadata;
  * otherwise a single process, and `initialize` does nothing.
"""

import dataclasses
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import numpy as np
from absl import flags, logging

from saejax.errors import ConfigError

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0's coordination service, for a multi-process run started by hand "
    "(with --num_processes and --process_id). Unset: detected from SLURM / TPU, else one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index in [0, num_processes).")

# srun sets these in every task; JAX reads them (jax/_src/clusters/slurm_cluster.py).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
# GKE's TPU worker list; on TPU VMs the same list comes from the metadata server instead.
TPU_WORKER_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a run: alone, or with the others through a coordinator."""
  method: Literal["single", "explicit", "slurm", "tpu"]
  # Set for "explicit" only; SLURM and TPU runs leave them to JAX's cluster detection.
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _on_cloud_tpu_vm() -> bool:
  # Set by `import jax` when libtpu is installed and TPU chips are on the PCI bus.
  from jax._src import cloud_tpu_init
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, *, env: Mapping[str, str] = os.environ,
           on_tpu_vm: bool | None = None) -> Launch:
  """Decide how this process joins the run, from explicit arguments, then the environment.

  Args:
    coordinator_address: HOST:PORT of process 0 (explicit launch; give all three or none).
    num_processes: the number of processes (explicit launch).
    process_id: this process's index (explicit launch).
    env: the environment to read SLURM_* / TPU_* from.
    on_tpu_vm: whether this is a Cloud TPU VM; None asks JAX.

  Returns:
    The `Launch`; method "single" means there is nothing to initialise.
  """
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = {k for k, v in explicit.items() if v is not None}
  if given and given != set(explicit):
    raise ConfigError(f"multi-process flags: got --{', --'.join(sorted(given))} but not "
                      f"--{', --'.join(sorted(set(explicit) - given))}; give all three or none")
  if given:
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} is not in [0, --num_processes="
                        f"{num_processes})")
    if ":" not in coordinator_address:
      raise ConfigError(f"--coordinator_address={coordinator_address!r} needs the form HOST:PORT")
    return Launch("explicit", coordinator_address, num_processes, process_id)
  if all(v in env for v in SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
    return Launch("slurm")
  if any(len(env.get(v, "").split(",")) > 1 for v in TPU_WORKER_VARS):
    return Launch("tpu")
  if _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm:
    return Launch("tpu")  # a single-host TPU VM finds itself alone: harmless
  return Launch("single")


def initialize(launch: Launch | None = None) -> str:
  """Join the run (`jax.distributed.initialize`) before any device is touched; print and return a
  hello line naming this process and its devices.

  Args:
    launch: how to join; None reads --coordinator_address / --num_processes / --process_id (when
      the flags are parsed) and the environment (`detect`).
  """
  if launch is None:
    parsed = flags.FLAGS.is_parsed()
    launch = detect(_COORDINATOR.value if parsed else None,
                    _NUM_PROCESSES.value if parsed else None, _PROCESS_ID.value if parsed else None)
  if launch.method != "single" and not jax.distributed.is_initialized():
    # Explicit flags say everything: without "deactivate" JAX would still read SLURM's variables
    # and pin this process to GPU number SLURM_LOCALID (local_device_ids), one GPU per process,
    # when the launch script runs one process per node over all of its GPUs.
    detection = "deactivate" if launch.method == "explicit" else None
    jax.distributed.initialize(launch.coordinator_address, launch.num_processes,
                               launch.process_id, cluster_detection_method=detection)
  line = (f"process {jax.process_index()}/{jax.process_count()} ({launch.method}): "
          f"{jax.local_device_count()} local of {jax.device_count()} devices, "
          f"platform {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
  print(line, flush=True)
  return line


def check_padding(padding: str, process_count: int | None = None) -> None:
  """Refuse per-host length buckets in a multi-process run.

  `jax.make_array_from_process_local_data` needs every process to contribute the same shape, but
  with padding="bucket" each host pads to the bucket of its own longest text.

  Args:
    padding: config.data.padding.
    process_count: processes in the run; None asks JAX.
  """
  process_count = jax.process_count() if process_count is None else process_count
  if padding != "fixed" and process_count > 1:
    raise ConfigError(
        f"config.data.padding={padding!r} pads each process's batch to its own length bucket, so "
        f"the {process_count} processes would build global batches of different shapes; "
        "set --config.data.padding=fixed for multi-process runs")


def gather_batches(batches: Sequence[dict]) -> list[dict]:
  """Each process's local batches -> the global batches (rows of process 0, then 1, ...).

  For statistics every process must compute identically, e.g. b_pre from data: computed from local
  rows, each process would hold a different "replicated" value. One process: returned as is.
  """
  if jax.process_count() == 1:
    return list(batches)
  from jax.experimental import multihost_utils
  return [{k: np.asarray(v) for k, v in
           multihost_utils.process_allgather(dict(batch), tiled=True).items()}
          for batch in batches]


class Preemption:
  """A preemption notice (SIGTERM) turned into a step at which every process stops.

  One process: a SIGTERM handler sets `requested`. Several: JAX's coordination service traps
  SIGTERM on whichever process gets it, and `update(step)` turns True on every process at the same
  step (max of the steps the processes had reached, plus one), so all of them save and leave
  together instead of one waiting forever in a collective the others never join.
  """

  def __init__(self):
    self.requested = False
    self._synced = jax.distributed.is_initialized()
    if not self._synced:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    if not self.requested:
      logging.warning("signal %d: checkpointing at the end of this step, then exiting", signum)
    self.requested = True

  def update(self, step: int) -> bool:
    """Call once per step on every process, with the step just finished; returns `requested`."""
    if self._synced and not self.requested:
      from jax.experimental import multihost_utils
      self.requested = multihost_utils.reached_preemption_sync_point(step)
      if self.requested:
        logging.warning("preemption notice: every process checkpoints at step %d and exits", step)
    return self.requested
