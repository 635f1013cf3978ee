"""A full disk: tell a save that failed for lack of space from any other failure, and say so.

A checkpoint save that fails because the workdir's filesystem is full ends the run with one line
(the step not saved, the last good checkpoint, the space needed and free) and exit status
`EXIT_DISK_FULL` = 74 (EX_IOERR), never 75: launchers requeue 75, and a full disk would loop. The
classification looks at the error itself (errno ENOSPC / EDQUOT anywhere in its chain, or the
"RESOURCE_EXHAUSTED ... No space left" / "Failed writing" text of orbax's TensorStore writes) and,
for that text, at the free space left; any other error keeps its traceback. Only the lock holder
removes the partial save (`remove_partial_saves`); readers never touch a workdir's temp files.
"""
from __future__ import annotations

import errno
import glob
import os
import shutil
import time
from typing import Any

EXIT_DISK_FULL = 74
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SPACE_TEXT = ("no space left on device", "disk quota exceeded")
_RESOURCE_TEXT = ("resource_exhausted",)
PARTIAL_PATTERN = "*.orbax-checkpoint-tmp*"


class DiskFull(RuntimeError):
  """A save that failed for lack of space; str() is the one line the program prints."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def free_bytes(path: str) -> int | None:
  """Free bytes on the filesystem holding `path` (its nearest existing parent), None for object
  stores (gs://...) where there is no such number."""
  if "://" in path:
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays in `tree` (anything with .size and .dtype: arrays, ShapeDtypeStructs)."""
  import jax
  import numpy as np
  return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def _chain(error: BaseException):
  seen = set()
  stack = [error]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    stack.extend([e.__cause__, e.__context__] + list(getattr(e, "exceptions", ())))


def is_out_of_space(error: BaseException, path: str, needed: int | None = None) -> bool:
  """Whether `error` (raised while writing under `path`) is a lack of space: an OSError with
  errno ENOSPC / EDQUOT anywhere in its chain, or a 'No space left on device' message; or
  orbax / TensorStore's RESOURCE_EXHAUSTED text while `path` has less than `needed` bytes free
  (default: under 1% of the disk or 64 MiB). Programming errors (anything else) are not."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
      return True
    text = str(e).lower()
    if any(t in text for t in _SPACE_TEXT):
      return True
    if any(t in text for t in _RESOURCE_TEXT) and ("writ" in text or "space" in text):
      free = free_bytes(path)
      if free is None:
        return True  # an object store refusing a write for resources: nothing else to check
      threshold = needed if needed is not None else max(64 << 20, _total_bytes(path) // 100)
      if free < threshold:
        return True
  return False


def _total_bytes(path: str) -> int:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).total


def megabytes(n: int | None) -> str:
  return "unknown" if n is None else f"{n / 2**20:.1f} MiB"


def save_failed_message(workdir: str, step: int, last_good: int | None, needed: int,
                        free: int | None) -> str:
  """The one line of a save that failed for lack of space."""
  kept = (f"the last good checkpoint is step {last_good} (kept)" if last_good is not None
          else "no earlier checkpoint exists")
  return (f"no space left to save step {step} in {workdir} (one checkpoint needs about "
          f"{megabytes(needed)}, {megabytes(free)} free); {kept}; free some space and run the "
          "same command to resume")


def check_room(workdir: str, needed: int) -> None:
  """Raises DiskFull (one line) when `workdir`'s filesystem has less than `needed` bytes free
  (one checkpoint); does nothing on object stores."""
  free = free_bytes(workdir)
  if free is not None and free < needed:
    raise DiskFull(f"{workdir} has {megabytes(free)} free but one checkpoint needs about "
                   f"{megabytes(needed)}: free some space or use another --workdir", step=-1)


def saved_step_bytes(checkpoint_dir: str, data_state_dir: str) -> int:
  """Bytes of the newest complete step in `checkpoint_dir` plus its input-pipeline state in
  `data_state_dir`/<step> (0 when there is none, or for object stores)."""
  if "://" in checkpoint_dir or not os.path.isdir(checkpoint_dir):
    return 0
  steps = [int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()]
  if not steps:
    return 0
  step = str(max(steps))
  total = 0
  for root in (os.path.join(checkpoint_dir, step), os.path.join(data_state_dir, step)):
    for directory, _, files in os.walk(root):
      total += sum(os.path.getsize(os.path.join(directory, f)) for f in files)
  return total


def remove_partial_saves(checkpoint_dir: str) -> list[str]:
  """Removes `<step>.orbax-checkpoint-tmp*` left in `checkpoint_dir` by a save that did not
  finish; returns what it removed. Only the workdir's lock holder may call this."""
  removed = []
  if "://" in checkpoint_dir:
    from etils import epath
    for path in epath.Path(checkpoint_dir).glob(PARTIAL_PATTERN):
      path.rmtree()
      removed.append(str(path))
    return removed
  for attempt in range(3):  # a writer that was still finishing can leave a file behind once
    left = glob.glob(os.path.join(checkpoint_dir, PARTIAL_PATTERN))
    if not left:
      break
    if attempt:
      time.sleep(0.5)
    for path in left:
      shutil.rmtree(path, ignore_errors=True)
      if path not in removed:
        removed.append(path)
  return removed
