"""Preemption (SIGTERM before a TPU VM or SLURM job is taken away) and the finished-run marker.

Every process calls `PreemptionWatch.reached(step)` once per training step; it returns True on all
processes at the same step once any of them received SIGTERM. With `jax.distributed` initialised
this is JAX's preemption sync protocol (orbax's `reached_preemption`: the runtime traps SIGTERM and
the processes agree on the step); in a single process we trap SIGTERM ourselves. The loop then
saves one checkpoint at that step and the program exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL:
"temporary failure, run me again"), so launchers relaunch it; a finished run writes `FINISHED`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import NoReturn

import tensorflow as tf

from adv_soups import parallel

EXIT_PREEMPTED = 75
FINISHED_FILE = "FINISHED"


class PreemptionWatch:
  """Polled once per step; a context manager (the single-process SIGTERM handler lives inside)."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._distributed = False

  def start(self) -> "PreemptionWatch":
    """Begins watching (single process: installs the SIGTERM handler); returns self."""
    self._distributed = parallel.distributed_is_initialized()
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def close(self) -> None:
    """Stops watching: the previous SIGTERM handler is back."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> "PreemptionWatch":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._signalled = True

  def reached(self, step: int) -> bool:
    """True when the run must save at `step` and stop (the same step on every process)."""
    if self._distributed:
      from orbax.checkpoint import multihost
      return bool(multihost.reached_preemption(int(step)))
    return self._signalled


def write_finished(workdir: str, step: int) -> str:
  """Writes `workdir/FINISHED` (JSON: step, time); returns its path. Call on process 0 only."""
  path = os.path.join(workdir, FINISHED_FILE)
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump({"step": int(step), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
  return path


def is_finished(workdir: str) -> bool:
  """Whether `workdir` holds a run that trained to its last step."""
  return tf.io.gfile.exists(os.path.join(workdir, FINISHED_FILE))


def exit_preempted(workdir: str, step: int, total_steps: int, process_index: int = 0) -> NoReturn:
  """The programs' exit after a preemption save: one line on stderr saying where the run stopped,
  then exit status `EXIT_PREEMPTED` (75: relaunch the same command to resume)."""
  print(f"preempted: process {process_index} saved step {step} of {total_steps} in {workdir}; "
        "run the same command to resume", file=sys.stderr, flush=True)
  sys.exit(EXIT_PREEMPTED)
