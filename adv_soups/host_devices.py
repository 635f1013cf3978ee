"""Training on a CPU-only host: split the CPU into several jax devices so the data-parallel step
runs its shards at once.

XLA:CPU runs one program at a time per device, each op split over the cores; ops that split badly
(small or memory-bound: layer norms, GELU, softmax, transposes) leave cores idle. With the batch
sharded over k host devices (`--xla_force_host_platform_device_count=k`), k smaller programs run
concurrently and fill those gaps. Measured on a 2-core AMD EPYC (Zen 4), the standard co-training
step (ViT-Ti/4, 32 px, batch 128, PGD-2): 3.6-3.7 s with one device, 3.38 s with 2, 3.2-3.3 s
with 4 and with 8 (bench/README.md); the digits demo unchanged within noise (196 s with one
device, 201 s with 4, cold); losses equal to a relative 3e-7 over 50 steps.

`split_for_training(batch_size, multiple)` sets k before jax's backend starts (the flag is read
once, then): k = $ADV_SOUPS_CPU_DEVICES when set (1 leaves jax alone), else the largest of 4 and 2
that divides batch_size / multiple. The training programs (`adv_soups.train`, `make demo`, the experiments) call it;
importing adv_soups does not. Left alone: a host with an accelerator plugin (see `host_memory`),
a device count already named (XLA_FLAGS, JAX_NUM_CPU_DEVICES), a backend already started, a
multi-process run.
"""
from __future__ import annotations

import os

from adv_soups import host_memory

ENV = "ADV_SOUPS_CPU_DEVICES"
FLAG = "--xla_force_host_platform_device_count"
AUTO_COUNTS = (4, 2)  # tried in order; 8 measured no faster than 4 on 2 cores


def requested_count(batch_size: object, multiple: int = 1) -> int:
  """The number of CPU devices to ask for: $ADV_SOUPS_CPU_DEVICES (an integer >= 1; ValueError,
  one line, otherwise) or the largest of AUTO_COUNTS dividing `batch_size / multiple` (1 when none
  does, or when `batch_size` is not a positive integer: the config check reports that)."""
  setting = os.environ.get(ENV, "").strip()
  if setting:
    if not setting.isdigit() or int(setting) < 1:
      raise ValueError(f"{ENV}={setting!r}: allowed values are integers >= 1 (1: one device)")
    return int(setting)
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    return 1
  return next((k for k in AUTO_COUNTS if batch_size % (k * multiple) == 0), 1)


def _backend_started() -> bool:
  """Whether jax has created its backends (the flag is read then); True if that cannot be told."""
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # private API moved: leave jax alone
    return True


def split_for_training(batch_size: object, multiple: int = 1) -> int:
  """Before jax's backend starts, on a CPU-only single-process host, appends FLAG=k to XLA_FLAGS
  (k = `requested_count(batch_size, multiple)`; `multiple`: rows each device needs in pairs, 2 with
  mixup). Returns the k set, or 1 where jax is left alone (see the module's docstring)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if (FLAG in flags or _cpu_count_set_in_jax() or host_memory.accelerator_installed()
      or _backend_started() or _multi_process()):
    return 1
  count = requested_count(batch_size, multiple)  # read only where it is used
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}={count}".strip()
  return count


def _cpu_count_set_in_jax() -> bool:
  """Whether jax's own setting (JAX_NUM_CPU_DEVICES, jax.config) names the CPU device count: it
  overrides the XLA flag."""
  if os.environ.get("JAX_NUM_CPU_DEVICES", "").strip():
    return True
  import jax
  return getattr(jax.config, "jax_num_cpu_devices", -1) not in (-1, None)


def _multi_process() -> bool:
  from adv_soups import parallel
  return parallel.distributed_is_initialized()
