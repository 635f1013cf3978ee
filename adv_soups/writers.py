"""Training metrics: clu's writer and progress report where TensorFlow is installed, and a
TensorFlow-free equivalent where it is not (clu's `metric_writers` imports TensorFlow).

Both write absl log lines and, on process 0, TensorBoard event files in the workdir
(`events.out.tfevents.*`): the fallback writes them with TensorBoard's own event-file writer.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from absl import logging

from adv_soups.data.memory import importable


def tensorflow_available() -> bool:
  """Whether `import tensorflow` can succeed here (checked without importing it)."""
  return importable("tensorflow")


class EventWriter:
  """Scalars to absl INFO lines and (unless `just_logging`) to a TensorBoard event file in
  `logdir`; the subset of clu's `MetricWriter` that training uses."""

  def __init__(self, logdir: str, just_logging: bool = False):
    self._events = None
    if not just_logging:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._events = EventFileWriter(str(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One line `[step] name = value, ...` and one event per scalar (float)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
    if self._events is not None:
      values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's flattened config, to the log and TensorBoard's hparams plugin."""
    logging.info("hparams: %s", dict(hparams))
    if self._events is not None:
      from tensorboard.compat.proto import event_pb2
      from tensorboard.plugins.hparams import summary_v2
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=0,
                                             summary=summary_v2.hparams_pb(dict(hparams))))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


class ProgressReport:
  """Call with each step: every `every_steps` steps writes `steps_per_sec` and logs the ETA (the
  part of clu's `ReportProgress` training uses)."""

  def __init__(self, num_train_steps: int, writer: EventWriter, every_steps: int):
    self._total, self._writer, self._every = num_train_steps, writer, every_steps
    self._last_step, self._last_time = None, None

  def __call__(self, step: int) -> None:
    now = time.time()
    if self._last_step is None:
      self._last_step, self._last_time = step, now
      return
    if step % self._every and step != self._total:
      return
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._writer.write_scalars(step, {"steps_per_sec": rate})
    logging.info("step %d/%d, %.1f%% done, ETA %.0f s", step, self._total,
                 100.0 * step / self._total, (self._total - step) / max(rate, 1e-9))
    self._last_step, self._last_time = step, now


def create_writer(workdir: str, just_logging: bool):
  """clu's default writer where TensorFlow is installed, else an `EventWriter`."""
  if tensorflow_available():
    from clu import metric_writers
    return metric_writers.create_default_writer(workdir, just_logging=just_logging)
  return EventWriter(workdir, just_logging)


def progress_report(num_train_steps: int, writer, every_steps: int):
  """clu's `ReportProgress` where TensorFlow is installed, else a `ProgressReport`."""
  if tensorflow_available():
    from clu import periodic_actions
    return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_secs=None, every_steps=every_steps)
  return ProgressReport(num_train_steps, writer, every_steps)
