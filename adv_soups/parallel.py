"""Device mesh and shardings for data parallelism (one `data` axis over all devices), and the
multi-process start (`initialize`, `barrier`).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of a value copied on every device (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Builds global arrays sharded over `data` from this process's part of a batch (numpy pytree).

  Every leaf's leading axis is the process-local batch; the global batch is the concatenation over
  processes in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def pad_to_multiple(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------------------------
# Multi-process start (jax.distributed): TPU pod slices, SLURM, Open MPI, or explicit addresses.

ENV_PREFIX = "ADV_SOUPS_"
# (kind, name, default, help) like evaluate.COMMON_FLAGS; every program adds these to its flags.
DISTRIBUTED_FLAGS = (
    ("string", "coordinator_address", None,
     "host:port of process 0's coordinator for a multi-process run (default: "
     "$ADV_SOUPS_COORDINATOR_ADDRESS, or auto-detected on TPU pods, SLURM and Open MPI)."),
    ("integer", "num_processes", None,
     "Processes in the job (default: $ADV_SOUPS_NUM_PROCESSES, or auto-detected)."),
    ("integer", "process_id", None,
     "This process's index in [0, num_processes) (default: $ADV_SOUPS_PROCESS_ID, or "
     "auto-detected)."),
)

_initialized_here = False


def define_distributed_flags(flag_values: Any) -> Any:
  """Adds DISTRIBUTED_FLAGS to an absl `FlagValues` (returned) of a program's own flags."""
  from absl import flags
  for kind, name, default, help_text in DISTRIBUTED_FLAGS:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values)
  return flag_values


def detected_cluster() -> str | None:
  """The multi-process environment jax.distributed can configure itself from, or None.

  'SLURM' (srun with more than one task), 'Open MPI' (mpirun with more than one rank) or 'TPU VM'
  (a Cloud TPU VM, one host of a pod slice or a single host). Reads only the environment and /dev.
  """
  env = os.environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if all(v in env for v in slurm) and int(env["SLURM_NTASKS"]) > 1:
    return "SLURM"
  if ("OMPI_MCA_orte_hnp_uri" in env or "OMPI_VERSION" in env) and int(
      env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  if os.path.exists("/dev/accel0") or glob.glob("/dev/vfio/[0-9]*"):
    return "TPU VM"
  return None


def distributed_is_initialized() -> bool:
  """Whether `jax.distributed.initialize` has run in this process (by us or by the caller)."""
  try:
    from jax._src import distributed
    return distributed.global_state.client is not None
  except (ImportError, AttributeError):  # private API moved: fall back to what we know
    return _initialized_here


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts JAX's multi-controller runtime when the job has more than one process; call it first
  thing in a program's main, before anything asks JAX for devices.

  Explicit settings (arguments, else $ADV_SOUPS_COORDINATOR_ADDRESS / $ADV_SOUPS_NUM_PROCESSES /
  $ADV_SOUPS_PROCESS_ID) need all three (CPU hosts, other clusters); without them the environment
  is auto-detected (`detected_cluster`). `num_processes=1` means a single process. Returns whether
  jax.distributed is initialised afterwards; calling it twice is harmless. ValueError (one line)
  for an incomplete or inconsistent setting.
  """
  global _initialized_here
  if distributed_is_initialized():
    return True
  env = os.environ
  address = coordinator_address or env.get(ENV_PREFIX + "COORDINATOR_ADDRESS") or None
  count = _int_setting(num_processes, "NUM_PROCESSES")
  index = _int_setting(process_id, "PROCESS_ID")
  if count == 1:
    return False
  if address or count is not None or index is not None:
    missing = [name for name, v in (("coordinator_address", address), ("num_processes", count),
                                    ("process_id", index)) if v is None]
    if missing:
      raise ValueError(f"a multi-process start needs --coordinator_address, --num_processes and "
                       f"--process_id (or {ENV_PREFIX}* variables): missing {', '.join(missing)}")
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"--process_id={index} must be in [0, {count}) with --num_processes={count}")
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
  elif detected_cluster() is not None:
    jax.distributed.initialize()  # jax reads the cluster's own variables / metadata
  else:
    return False
  _initialized_here = True
  return True


def initialize_from_flags(flag_values: Any) -> bool:
  """`initialize` with the DISTRIBUTED_FLAGS values of a parsed absl `FlagValues`."""
  return initialize(flag_values.coordinator_address, flag_values.num_processes,
                    flag_values.process_id)


def _int_setting(value: int | None, name: str) -> int | None:
  if value is not None:
    return int(value)
  text = os.environ.get(ENV_PREFIX + name)
  if text in (None, ""):
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"${ENV_PREFIX}{name}={text!r} is not an integer") from None


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True when `flag` is true on any process (every process must call it; no-op with one)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def is_primary() -> bool:
  """True on process 0, the one that writes reports, metrics and config files."""
  return jax.process_index() == 0
