"""The memory check before the first step: does every compiled program fit the device?

A program's need is what XLA's buffer assignment says it holds while it runs (arguments +
outputs + temporaries - the outputs that alias donated arguments, from
`Compiled.memory_analysis()`), plus what stays resident meanwhile and is not one of its
arguments (e.g. the train state during a periodic evaluation). What the device offers is
`memory_stats()["bytes_limit"]` on a GPU / TPU, MemAvailable of /proc/meminfo on the CPU (where
`memory_stats()` is None) shared equally by the process's CPU devices, or the environment
variable ADV_SOUPS_DEVICE_MEMORY (bytes: an override for tests and for users who want head room).
A program above it is refused with one line naming it, the bytes needed and offered and the
config field to lower with a suggested value; one within 10% of it is a warning.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax

ENV_OVERRIDE = "ADV_SOUPS_DEVICE_MEMORY"
WARN_FRACTION = 0.9  # above this share of the available bytes: a warning


class DoesNotFit(ValueError):
  """A program needs more memory than the device offers (the message is the one line to print)."""


@dataclasses.dataclass
class Program:
  """One compiled program to check.

  name: what it is, in words ('the train step', "periodic evaluation 'val' (PGD-20 at 32 px)").
  compiled: a `jax.stages.Compiled`.
  field / value: the config field that scales its memory and its value ('config.eval.batch_size',
    512); the suggestion scales `value` down.
  units: what the program was compiled for, in the field's units (default `value`; e.g. 500
    rows when a batch size of 512 is clamped to a 500-example split).
  fixed: bytes of its need that do not scale with `value` (e.g. parameters and optimizer state).
  resident: bytes that stay on the device while it runs and are not its arguments.
  multiple: the suggested value is a multiple of this (e.g. the device count; 2 for mixup).
  """
  name: str
  compiled: Any
  field: str
  value: int
  units: int | None = None
  fixed: int = 0
  resident: int = 0
  multiple: int = 1

  @property
  def needed(self) -> int:
    return compiled_bytes(self.compiled) + self.resident


def compiled_bytes(compiled: Any) -> int:
  """Bytes a compiled program holds on one device while it runs: arguments + outputs +
  temporaries - aliased (donated arguments reused for outputs). 0 when the backend gives no
  analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  if isinstance(stats, (list, tuple)):  # older jax: one entry per device
    stats = stats[0]
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of `tree` on one device, as replicated."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype") and hasattr(x, "size")))


def available_bytes(device: Any = None) -> int:
  """Bytes the device offers: $ADV_SOUPS_DEVICE_MEMORY when set, else
  `memory_stats()["bytes_limit"]` (GPU / TPU), else MemAvailable of /proc/meminfo divided by the
  process's CPU devices (CPU: the needs checked are one device's); 0 when nothing says (the check
  is then skipped)."""
  override = os.environ.get(ENV_OVERRIDE)
  if override:
    return int(float(override))
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without the call)
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  # Host devices (adv_soups.host_devices, XLA_FLAGS) share the host's memory, each holding its own
  # arguments and temporaries at once: each gets its share.
  return _mem_available() // max(len(jax.local_devices(backend=device.platform)), 1)


def _mem_available(path: str = "/proc/meminfo") -> int:
  try:
    with open(path) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def gigabytes(n: float) -> str:
  """37551194040 -> '37.6 GB' (decimal units, like the allocator's messages)."""
  return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def suggest(program: Program, available: int) -> int:
  """The largest value of `program.field` (a power of two times `multiple`, below its value)
  whose need, scaled linearly from the part above `fixed`, stays under 90% of `available`;
  0 when even the fixed part does not fit."""
  room = WARN_FRACTION * available - program.fixed - program.resident
  units = program.value if program.units is None else program.units
  per_unit = max(program.needed - program.fixed - program.resident, 1) / max(units, 1)
  if room < per_unit * program.multiple:
    return 0
  best = program.multiple
  while best * 2 < units and best * 2 * per_unit <= room:
    best *= 2
  return best


def check(programs: Sequence[Program], available: int | None = None) -> list[str]:
  """Checks each program's need against `available` (default `available_bytes()`).

  Returns the warning lines (programs within 10% of the limit). Raises `DoesNotFit` with one line
  for the biggest program above it, e.g. "config.eval.batch_size=512 needs ~37.6 GB for
  periodic evaluation 'val' (PGD-20 at 224 px); 21.9 GB available: try 64".
  """
  available = available_bytes() if available is None else int(available)
  if available <= 0:
    return []
  needs = [(p.needed, p) for p in programs]
  over = [(needed, p) for needed, p in needs if needed > available]
  if over:  # name the biggest: lowering its field fixes the others of that field too
    needed, p = max(over, key=lambda item: item[0])
    value = suggest(p, available)
    hint = (f"try {value}" if value else
            f"even its fixed part ({gigabytes(p.fixed + p.resident)}) does not fit: a smaller "
            "model or a bigger device")
    raise DoesNotFit(f"{p.field}={p.value} needs ~{gigabytes(needed)} for {p.name}; "
                     f"{gigabytes(available)} available: {hint}")
  return [f"{p.field}={p.value} needs ~{gigabytes(needed)} for {p.name}, within 10% of the "
          f"{gigabytes(available)} available; it may run out of memory"
          for needed, p in needs if needed > WARN_FRACTION * available]
