"""What a user sees while a program runs: one progress bar, plain lines, the log in a file.

  quiet_libraries()            TFDS's bars and banners off, TF / orbax / etils only at warnings
  log_to_file(path, verbose)   absl's log goes to `path` (WORKDIR/train.log), to the screen only
                               with verbose; warnings still reach the screen as one plain line
  TrainProgress(...)           process 0's training progress: a tqdm bar on a terminal (steps,
                               steps/s, ETA, the latest loss and train accuracies), plain periodic
                               lines when the output is a pipe, a CI log or a SLURM file

Library code keeps logging through absl; only the programs (train, evaluate, sweep, the demo, the
experiments) call these.
"""
from __future__ import annotations

import logging as py_logging
import os
import sys
import time
from typing import Any, TextIO

NOISY_LOGGERS = ("orbax", "tensorflow_datasets", "tensorflow/", "etils", "absl/", "jax/_src")


def quiet_libraries() -> None:
  """Silences TFDS's own progress bars and banners and TensorFlow's C++ log (call before they
  print; safe to call twice)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "tensorflow_datasets" in sys.modules:  # never imported here: in-memory runs need no TF
    sys.modules["tensorflow_datasets"].disable_progress_bar()  # (digits.py's preparation too)
  for name in ("tensorflow_datasets", "tensorflow", "orbax", "etils"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)
  absl_logger = py_logging.getLogger("absl")  # what libraries log through absl lands here
  if not any(isinstance(f, _LibraryChatter) for f in absl_logger.filters):
    absl_logger.addFilter(_LibraryChatter())


class _LibraryChatter(py_logging.Filter):
  """Drops the libraries' (TFDS, orbax, etils, TF) absl records below ERROR."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.ERROR or not any(
        n in record.pathname for n in NOISY_LOGGERS[:4])


class _PlainWarnings(py_logging.Handler):
  """WARNING and above as `warning: message` (one line) on stderr, from our code only."""

  def __init__(self):
    super().__init__(py_logging.WARNING)

  def emit(self, record: py_logging.LogRecord) -> None:
    if any(n in record.pathname for n in NOISY_LOGGERS):
      return
    try:
      text = " ".join(record.getMessage().split())
    except Exception:  # pylint: disable=broad-except
      return
    level = "error" if record.levelno >= py_logging.ERROR else "warning"
    _write_line(sys.stderr, f"{level}: {text}")


_active_bars: list[Any] = []


def _write_line(stream: TextIO, line: str) -> None:
  """One line on `stream`, above a live tqdm bar if there is one."""
  if _active_bars:
    from tqdm import tqdm
    tqdm.write(line, file=stream)
  else:
    print(line, file=stream, flush=True)


_opened: list[TextIO] = []  # the log files log_to_file opened (only those are ever closed)


def _close_opened() -> None:
  while _opened:
    _opened.pop().close()


def log_to_file(path: str | None, verbose: bool = False) -> str | None:
  """Routes absl's log (INFO and above) to the file `path` (appended; None: nowhere) instead of
  the screen; `verbose` also shows it on stderr as today. Warnings and errors from our code still
  reach the screen as one plain line. Returns the log's path."""
  from absl import flags
  from absl import logging
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl's own flags keep their defaults
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  if path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stream: TextIO = open(path, "a", buffering=1)  # pylint: disable=consider-using-with
  else:
    stream = open(os.devnull, "w")  # pylint: disable=consider-using-with
  _close_opened()
  _opened.append(stream)
  handler.python_handler.stream = stream
  flags.FLAGS.alsologtostderr = bool(verbose)
  flags.FLAGS.stderrthreshold = "fatal"
  root = py_logging.getLogger()
  for h in list(root.handlers):
    if isinstance(h, _PlainWarnings):
      root.removeHandler(h)
  if not verbose:
    root.addHandler(_PlainWarnings())
  return path


def log_to_screen() -> None:
  """Undoes `log_to_file`: absl logs to stderr again (as before any program ran)."""
  from absl import logging
  logging.get_absl_handler().python_handler.stream = sys.stderr
  _close_opened()
  root = py_logging.getLogger()
  for h in list(root.handlers):
    if isinstance(h, _PlainWarnings):
      root.removeHandler(h)


def log_path(workdir: str, process_index: int = 0, name: str = "train") -> str | None:
  """WORKDIR/train.log for process 0, WORKDIR/train.process<i>.log for the others; None for an
  object-store workdir (appending is not possible there: the log then goes nowhere unless
  --verbose)."""
  if "://" in workdir:
    return None
  suffix = "" if process_index == 0 else f".process{process_index}"
  return os.path.join(workdir, f"{name}{suffix}.log")


def interactive(stream: TextIO) -> bool:
  """Whether `stream` is a terminal (else: a pipe, a file, CI, a SLURM log)."""
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def format_duration(seconds: float) -> str:
  """12 -> '12s', 75 -> '1m15s', 3725 -> '1h02m'."""
  seconds = int(round(max(0.0, seconds)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class PlainTicker:
  """tqdm's `update` / `set_postfix_str` / `write` / `close` as plain lines for a pipe, a CI log
  or a SLURM file: 'sweep: 4/11 batch (36%), 21s elapsed, ETA 29s, digits' at most every
  `every_s` seconds and at the end; never a carriage return."""

  def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO,
               every_s: float = 30.0):
    self.total, self.desc, self.unit, self.stream, self.every_s = total, desc, unit, stream, every_s
    self.n, self.postfix = 0, ""
    self._t0 = self._last = time.time()
    self._printed_at = -1

  def set_postfix_str(self, text: str, refresh: bool = False) -> None:
    del refresh
    self.postfix = text

  def update(self, n: int = 1) -> None:
    self.n += n
    if time.time() - self._last >= self.every_s or (self.total and self.n >= self.total):
      self._line()

  def _line(self) -> None:
    if self._printed_at == self.n:
      return
    self._printed_at, self._last = self.n, time.time()
    elapsed = time.time() - self._t0
    done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
    if self.total:
      done += f" ({100 * self.n // self.total}%)"
    eta = ""
    if self.total and 0 < self.n < self.total:
      eta = f", ETA {format_duration(elapsed * (self.total - self.n) / self.n)}"
    tail = f", {self.postfix}" if self.postfix else ""
    print(f"{self.desc}: {done}, {format_duration(elapsed)} elapsed{eta}{tail}",
          file=self.stream, flush=True)

  def write(self, line: str, file: TextIO | None = None) -> None:
    print(line, file=file or self.stream, flush=True)

  def close(self) -> None:
    if self.n:
      self._line()


def progress_bar(total: int | None, desc: str, unit: str, *, enabled: bool = True,
                 stream: TextIO | None = None):
  """A tqdm bar on a terminal, a `PlainTicker` elsewhere, a silent tqdm when not `enabled`."""
  from tqdm import tqdm
  stream = sys.stderr if stream is None else stream
  if enabled and not interactive(stream):
    return PlainTicker(total, desc, unit, stream)
  return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not enabled,
              dynamic_ncols=True)


# Train metrics shown on the bar / line, and their short names.
SHOWN = (("loss", "loss"), ("clean_train_accuracy", "clean_acc"),
         ("adv_train_accuracy", "adv_acc"), ("train_accuracy", "acc"))


def format_metrics(metrics: dict[str, float]) -> str:
  """'loss 0.512 clean_acc 0.93 adv_acc 0.61' from the step metrics present in `metrics`."""
  parts = []
  for key, short in SHOWN:
    if key in metrics:
      parts.append(f"{short} {metrics[key]:.3f}" if key == "loss" else
                   f"{short} {metrics[key]:.2f}")
  return " ".join(parts)


def format_eval(step: int, metrics: dict[str, float]) -> str:
  """One plain line per periodic evaluation: 'eval @ step 400: val/clean clean 98.3% ...'."""
  parts = []
  for key in sorted(metrics):
    value = metrics[key]
    prefix, _, kind = key.rpartition("/")
    short = {"clean_accuracy": "clean", "robust_accuracy": "robust"}.get(kind, kind)
    parts.append(f"{prefix} {short} {100 * value:.1f}%" if kind.endswith("accuracy")
                 else f"{key} {value:.4g}")
  return f"eval @ step {step}: " + ", ".join(parts)


class TrainProgress:
  """Training progress of process 0 (`enabled=False` elsewhere: silent).

  On a terminal: one tqdm bar (steps, steps/s, ETA) whose postfix shows the latest metrics.
  Otherwise: one plain line at a logging step when `min_interval_s` has passed since the last
  one, and always at the last step: 'step 400/1200 (33%) 10.2 steps/s ETA 1m18s loss 0.51 ...'.
  """

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True,
               stream: TextIO | None = None, bar: bool | None = None,
               min_interval_s: float = 5.0):
    self.total, self.step, self.enabled = total, start, enabled
    self.stream = sys.stdout if stream is None else stream
    self.use_bar = enabled and (interactive(self.stream) if bar is None else bar)
    self.min_interval_s = min_interval_s
    self._start_step, self._t0 = start, time.time()
    self._last_line = -float("inf")
    self._started = False
    self._bar = None
    if self.use_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, desc="training", unit="step",
                       file=self.stream, dynamic_ncols=True, smoothing=0.1)
      _active_bars.append(self._bar)

  def update(self, step: int) -> None:
    """Step `step` was dispatched (the rate counts from the first one: compilation excluded)."""
    if not self._started:
      self._started = True
      self._start_step, self._t0 = step, time.time()
    if self._bar is not None:
      self._bar.update(step - self.step)
    self.step = step

  def steps_per_sec(self) -> float:
    elapsed = time.time() - self._t0
    return (self.step - self._start_step) / elapsed if elapsed > 0 else 0.0

  def metrics(self, step: int, metrics: dict[str, float]) -> None:
    """The latest train metrics (at a logging step)."""
    if not self.enabled:
      return
    text = format_metrics(metrics)
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=True)
      return
    now = time.time()
    if now - self._last_line < self.min_interval_s and step != self.total:
      return
    self._last_line = now
    rate = self.steps_per_sec()
    eta = format_duration((self.total - step) / rate) if rate > 0 else "?"
    self.write(f"step {step}/{self.total} ({100 * step // self.total}%) {rate:.1f} steps/s "
               f"ETA {eta} {text}".rstrip())

  def write(self, line: str) -> None:
    """A plain line (e.g. an evaluation's), above the bar when there is one."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line, file=self.stream)
    else:
      print(line, file=self.stream, flush=True)

  def pause(self) -> None:
    """Excludes the time until `resume()` from steps/s (evaluations, checkpoints)."""
    self._paused_at = time.time()

  def resume(self) -> None:
    paused = getattr(self, "_paused_at", None)
    if paused is not None:
      self._t0 += time.time() - paused
      self._paused_at = None

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      _active_bars.remove(self._bar)
      self._bar = None
