"""JAX's persistent compilation cache for the command-line programs: a second run of the same
programs (another alpha, checkpoint or eps of one model) loads its compiled attack stages and train
step from disk instead of compiling them again (on the demo's AutoAttack, ~25 s of ~130 s).

The programs (`train`, `evaluate`, `sweep`, `demo`, the experiments) call `enable()` right after
their flags parse, so bad input still writes nothing. `ADV_SOUPS_COMPILATION_CACHE` chooses:
unset or 'auto': $XDG_CACHE_HOME/adv_soups/xla (default ~/.cache/adv_soups/xla); 'off': no
cache; any other value: that directory. A cache directory the user gave JAX itself
(`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is left as it is. `load()` and the Python API do
not touch JAX's configuration; call `enable()` there to opt in.

JAX keys each entry by the program, the compiler flags, the devices and the jax / jaxlib version,
and a program compiled in under `jax_persistent_cache_min_compile_time_secs` (1 s) is not stored.
"""
from __future__ import annotations

import os

ENV = "ADV_SOUPS_COMPILATION_CACHE"


def default_dir() -> str:
  """$XDG_CACHE_HOME/adv_soups/xla, XDG_CACHE_HOME defaulting to ~/.cache."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "adv_soups", "xla")


def enable(setting: str | None = None) -> str | None:
  """Turns JAX's persistent compilation cache on for this process; returns its directory (None
  when off). `setting` as the environment variable (default: its value, else 'auto')."""
  import jax
  setting = (os.environ.get(ENV, "auto") if setting is None else setting).strip()
  if setting.lower() == "off":
    return None
  current = jax.config.jax_compilation_cache_dir
  if current:  # the user's own choice
    return current
  path = default_dir() if setting.lower() in ("", "auto") else os.path.expanduser(setting)
  jax.config.update("jax_compilation_cache_dir", path)
  return path
