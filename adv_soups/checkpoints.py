"""Orbax checkpoints under `workdir/checkpoints`: save, find and restore; nothing else.

Each checkpoint step holds three items: `params` and `opt_state` (pytrees of arrays, `opt_state` and
`ema_params` may be absent) and `meta` (JSON: step, RNG key data, data position, anything small).
Parameters are their own item so that evaluation and notebooks restore them without the optimizer.
Saves are atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete), so a
crash mid-save leaves the previous checkpoint as the latest one.

A damaged checkpoint (a truncated or missing array file, as a full disk, a broken copy or a bad
object store leaves it) is moved aside by `restore_latest_readable` into
`workdir/damaged_checkpoints/<step>[-<time>]` (never deleted), with one warning line, and the
previous step is used.
"""
from __future__ import annotations

import datetime
import os
import re
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from adv_soups import parallel

ARRAY_ITEMS = ("params", "opt_state", "ema_params")
DAMAGED_DIR = "damaged_checkpoints"
T = TypeVar("T")


def checkpoint_dir(workdir: str) -> str:
  """Where the checkpoints of a workdir live (absolute for local paths: orbax requires it)."""
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return os.path.join(workdir, "checkpoints")


class Checkpoints:
  """A thin wrapper over `ocp.CheckpointManager` that keeps the last `max_to_keep` steps."""

  def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True):
    directory = epath.Path(checkpoint_dir(workdir))
    if not create and not directory.exists():
      raise FileNotFoundError(f"no checkpoints in {workdir!r}: {directory} does not exist")
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))

  def all_steps(self) -> list[int]:
    """The saved steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, meta: dict[str, Any], **arrays: Any) -> None:
    """Saves `arrays` (params=..., opt_state=..., ema_params=...) and the JSON `meta` at `step`.

    Blocks until the checkpoint is complete, so that nothing is lost if the process dies next.
    """
    unknown = set(arrays) - set(ARRAY_ITEMS)
    if unknown:
      raise ValueError(f"unknown checkpoint items {sorted(unknown)}: allowed {ARRAY_ITEMS}")
    items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items() if tree is not None}
    items["meta"] = ocp.args.JsonSave(dict(meta, step=int(step)))
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()

  def wait_quietly(self) -> None:
    """Waits for what a failed `save` may still run in orbax's background threads (they can
    write after the error reached us); their errors are dropped: the caller is handling one."""
    try:
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass

  def restore(self, step: int | None = None, targets: dict[str, Any] | None = None,
              items: tuple[str, ...] = ("params",)) -> dict[str, Any]:
    """Restores `items` (and always `meta`) of `step` (default: the latest).

    `targets` maps an item name to a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings)
    giving the structure to restore into; without one an item comes back as saved (nested dicts of
    arrays). Raises ValueError naming the step and the available ones if it does not exist.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self._manager.directory}")
      step = steps[-1]
    if step not in steps:
      raise ValueError(f"checkpoint step {step} does not exist: available steps {steps}")
    targets = targets or {}
    args = {}
    for name in items:
      target = targets.get(name)
      if target is not None:
        target = jax.tree.map(_abstract, target)
      args[name] = ocp.args.StandardRestore(target)
    args["meta"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in list(items) + ["meta"]}

  def item_names(self, step: int) -> list[str]:
    """The items saved at `step` (e.g. to see whether `ema_params` exists)."""
    return sorted(p.name for p in (epath.Path(self._manager.directory) / str(step)).iterdir()
                  if p.is_dir())

  def restore_latest_readable(self, restore: Callable[[int], T], workdir: str,
                              move_aside: bool = True) -> tuple[int, T] | None:
    """(step, restore(step)) for the newest step whose restore does not fail to read, or None when
    no step is left.

    A step whose `restore` raises (TensorStore / orbax read errors, a missing or truncated file)
    is reported in one warning line and, with `move_aside`, moved to
    `workdir/damaged_checkpoints/` by process 0 (never deleted); then the previous step is tried.
    With several processes the decision is collective (a step is damaged when any process failed
    to read it), so every process restores the same step; all must call this together.
    """
    skipped: set[int] = set()
    while True:
      steps = [s for s in self.all_steps() if s not in skipped]
      if not steps:
        return None
      step = steps[-1]
      error = None
      try:
        value = restore(step)
      except Exception as e:  # pylint: disable=broad-except  (any read error counts as damage)
        if is_mismatch(e):  # the caller asked for another structure: not the checkpoint's fault
          raise
        error = e
      if not parallel.any_process(error is not None):
        return step, value
      reason = _one_line(error) if error is not None else "another process could not read it"
      previous = steps[-2] if len(steps) > 1 else None
      where = "kept in place"
      if move_aside:
        target = damaged_target(workdir, step)
        if jax.process_index() == 0:
          try:
            epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
            (epath.Path(self._manager.directory) / str(step)).rename(epath.Path(target))
            where = f"moved it to {target}"
          except OSError as e:  # a read-only workdir: skip the step without moving it
            where = f"could not move it aside ({_one_line(e)})"
        else:
          where = f"moved it to {target}"
        parallel.barrier(f"adv_soups.checkpoints moved {step} aside")
        self._manager.reload()
      skipped.add(step)
      then = f"using step {previous}" if previous is not None else "no earlier checkpoint is left"
      logging.warning("checkpoint step %d in %s is unreadable (%s); %s; %s", step,
                      self._manager.directory, reason, where, then)

  def close(self) -> None:
    self._manager.close()


def damaged_target(workdir: str, step: int) -> str:
  """Where a damaged step goes: `workdir/damaged_checkpoints/<step>`, timestamped if taken."""
  root = os.path.join(os.path.dirname(checkpoint_dir(workdir)), DAMAGED_DIR)
  target = os.path.join(root, str(step))
  if epath.Path(target).exists():
    target += "-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
  return target


class RestoreMismatch(ValueError):
  """A checkpoint that does not fit what the caller restores into (raised, never moved aside)."""


def is_mismatch(error: BaseException) -> bool:
  """Whether a restore error says the requested structure / shape / dtype differs from the saved
  one (a caller's mistake, re-raised) rather than that the files cannot be read (damage)."""
  if isinstance(error, RestoreMismatch):
    return True
  text = str(error)
  return (isinstance(error, ValueError) and "error while reading" not in text and bool(
      re.search(r"structure mismatch|tree structures|not compatible with the stored", text,
                re.IGNORECASE)))


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
