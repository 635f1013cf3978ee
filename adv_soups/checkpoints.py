"""Orbax checkpoints under `workdir/checkpoints`: save, find and restore; nothing else.

Each checkpoint step holds three items: `params` and `opt_state` (pytrees of arrays, `opt_state` and
`ema_params` may be absent) and `meta` (JSON: step, RNG key data, data position, anything small).
Parameters are their own item so that evaluation and notebooks restore them without the optimizer.
Saves are atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete), so a
crash mid-save leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

ARRAY_ITEMS = ("params", "opt_state", "ema_params")


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

  def close(self) -> None:
    self._manager.close()


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
