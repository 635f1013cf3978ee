"""A run's workdir: its resolved config (config.json), what a resume may change, and moving a
previous run aside.

Layout: config.json, checkpoints/ (orbax, see checkpoints.py), data_state/<step>/process_<i>/
(each process's input-pipeline position for each checkpoint), events files (TensorBoard, process
0 only), FINISHED (written when the run reached its last step), damaged_checkpoints/ (unreadable
steps moved aside), previous_runs/ (--overwrite), sweep/ and eval/ (reports).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
PREVIOUS_RUNS = "previous_runs"


def _normalise(value: Any) -> Any:
  """JSON's view of a value (tuples become lists), so configs compare after a round trip."""
  return json.loads(json.dumps(value))


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A plain, JSON-compatible dict of `config`."""
  return _normalise(config.to_dict())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes `workdir/config.json` (atomically: a temp file, then a rename); returns its path."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = epath.Path(path + ".tmp")
  with tmp.open("w") as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
  tmp.replace(path)
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in `workdir/config.json` (local path or any etils.epath URL)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"no {CONFIG_FILE} in workdir {workdir!r}: is it a training workdir?")
  with path.open() as f:
    return ml_collections.ConfigDict(json.load(f))


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ between two config dicts."""
  keys = sorted(set(old) | set(new))
  diffs = []
  for key in keys:
    a, b = old.get(key), new.get(key)
    name = f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += config_differences(a, b, name + ".")
    elif _normalise(a) != _normalise(b):
      diffs.append(f"{name}: {a!r} -> {b!r}")
  return diffs


# Fields a resumed run may change: they leave the trajectory (model, optimiser, data order) alone.
# A name covers the field and everything under it.
TRAJECTORY_NEUTRAL = ("train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                      "data.data_dir", "eval", "evals")


def resume_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """(allowed, refused): the `config_differences` of a resumed run's saved config `old` and its
  new config `new`, split into trajectory-neutral ones (TRAJECTORY_NEUTRAL) and the others."""
  allowed, refused = [], []
  for diff in config_differences(old, new):
    name = diff.split(":", 1)[0]
    neutral = any(name == n or name.startswith(n + ".") for n in TRAJECTORY_NEUTRAL)
    (allowed if neutral else refused).append(diff)
  return allowed, refused


def move_aside(workdir: str) -> str | None:
  """Moves everything in `workdir` (but earlier moved-aside runs and the lock) into
  `workdir/previous_runs/<timestamp>/`; returns that folder, or None if there was nothing."""
  if not epath.Path(workdir).is_dir():
    return None
  entries = [e.name for e in epath.Path(workdir).iterdir()
             if e.name != PREVIOUS_RUNS and not e.name.startswith(".lock")]  # the run's lock
  if not entries:
    return None
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
  target = os.path.join(workdir, PREVIOUS_RUNS, stamp)
  epath.Path(target).mkdir(parents=True, exist_ok=True)
  for entry in entries:
    epath.Path(workdir, entry).rename(os.path.join(target, entry))
  return target
