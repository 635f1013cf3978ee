"""One writer per workdir: `WORKDIR/.lock`, held by the training run that writes there.

The lock file is JSON: host, boot id (/proc/sys/kernel/random/boot_id), pid, the process's start
time (clock ticks after boot, /proc/PID/stat), a random token and a heartbeat (Unix seconds) that a
background thread refreshes every `heartbeat_s`, so a long compilation or evaluation cannot let it
lapse. A second launch finds it and stops (`WorkdirBusy`; the programs exit `EXIT_BUSY` = 75,
"busy, retry later") before writing anything. A lock whose holder is gone is taken over with one
line: a dead process (or a recycled pid) on the same host and boot, or a heartbeat older than
`STALE_AFTER_S` (10 minutes) from anywhere.

Local paths are created with O_EXCL, so two launches racing cannot both win. Object stores
(gs://) have no exclusive create through etils.epath: there the lock is best effort (a check, then
a write). Multi-host: process 0 decides and broadcasts the outcome (`acquire_all`) before any
process writes. Readers (evaluate, sweep, `adv_soups.load`) never take the lock.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Any

import numpy as np
from etils import epath

LOCK_FILE = ".lock"
EXIT_BUSY = 75
STALE_AFTER_S = 600.0
HEARTBEAT_S = 30.0


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir; the message names it (one line)."""


def boot_id() -> str:
  """This machine's boot id ('' where /proc does not have it)."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def process_start_ticks(pid: int) -> int | None:
  """Start time of process `pid` in clock ticks after boot (/proc/PID/stat field 22), or None
  when the process does not exist (or /proc is not there)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  return int(stat.rpartition(")")[2].split()[19])  # fields after "(comm)" start at field 3


def holder_is_gone(info: dict[str, Any], now: float | None = None,
                   stale_after_s: float = STALE_AFTER_S) -> str | None:
  """Why the holder described by `info` (the lock's JSON) is gone, or None while it may live:
  no heartbeat for `stale_after_s` seconds, or (same host and boot) its pid is dead or now
  belongs to a process started at another time."""
  now = time.time() if now is None else now
  age = now - float(info.get("heartbeat", 0))
  if age > stale_after_s:
    return f"no heartbeat for {age / 60:.0f} min"
  if info.get("host") == socket.gethostname() and info.get("boot_id") == boot_id():
    pid = int(info.get("pid", -1))
    ticks = process_start_ticks(pid)
    if ticks is None:
      return f"process {pid} is not running"
    if info.get("start_ticks") is not None and ticks != info["start_ticks"]:
      return f"pid {pid} now belongs to another process"
  return None


def describe(info: dict[str, Any], now: float | None = None) -> str:
  """'pid 123 on host h (started 2026-12-06 04:40, heartbeat 12 s ago)'."""
  now = time.time() if now is None else now
  started = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.get("since", 0)))
  return (f"pid {info.get('pid')} on host {info.get('host')} (started {started}, heartbeat "
          f"{max(0.0, now - float(info.get('heartbeat', 0))):.0f} s ago)")


class _Remote:
  """The few file calls the lock makes on an object store (gs://), through etils.epath."""
  exists = staticmethod(lambda path: epath.Path(path).exists())
  GFile = staticmethod(lambda path, mode="r": epath.Path(path).open(mode))
  remove = staticmethod(lambda path: epath.Path(path).unlink())
  makedirs = staticmethod(lambda path: epath.Path(path).mkdir(parents=True, exist_ok=True))


def _gfile():
  return _Remote


class WorkdirLock:
  """The lock of one workdir. `acquire()` takes it (or raises WorkdirBusy) and starts the
  heartbeat; `release()` stops it and removes the file if it is still ours."""

  def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self.remote = "://" in workdir
    self.info: dict[str, Any] = {}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.held = False

  # -- file access (local: O_EXCL create, atomic replace; remote: etils.epath, best effort)
  def read(self) -> dict[str, Any] | None:
    """The lock's JSON, None when there is no lock ({} when it is unreadable: half written)."""
    try:
      if self.remote:
        if not _gfile().exists(self.path):
          return None
        with _gfile().GFile(self.path) as f:
          text = f.read()
      else:
        with open(self.path) as f:
          text = f.read()
    except FileNotFoundError:
      return None
    try:
      return json.loads(text)
    except ValueError:
      return {}

  def _create(self, info: dict[str, Any]) -> bool:
    text = json.dumps(info)
    if self.remote:
      if _gfile().exists(self.path):
        return False
      with _gfile().GFile(self.path, "w") as f:
        f.write(text)
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True

  def _replace(self, info: dict[str, Any]) -> None:
    text = json.dumps(info)
    if self.remote:
      with _gfile().GFile(self.path, "w") as f:
        f.write(text)
      return
    tmp = f"{self.path}.{info['token']}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, self.path)

  def _remove(self) -> None:
    try:
      if self.remote:
        _gfile().remove(self.path)
      else:
        os.remove(self.path)
    except (FileNotFoundError, OSError):
      pass

  # -- the protocol
  def acquire(self) -> str | None:
    """Takes the lock; returns a line to print when a stale lock was taken over (else None).
    Raises WorkdirBusy (one line naming the holder) when a live run holds it. Creates the
    workdir if needed (nothing else); `release` removes it again if it is still empty."""
    if self.remote:
      _gfile().makedirs(self.workdir)
    else:
      self._created_dir = not os.path.isdir(self.workdir)
      os.makedirs(self.workdir, exist_ok=True)
    now = time.time()
    self.info = {"host": socket.gethostname(), "boot_id": boot_id(), "pid": os.getpid(),
                 "start_ticks": process_start_ticks(os.getpid()),
                 "token": secrets.token_hex(8), "since": now, "heartbeat": now}
    note = None
    for _ in range(3):  # a race with another taker: look again
      if self._create(self.info):
        break
      held = self.read()
      if held is None:
        continue
      if held == {}:  # half written by a launch starting right now, or garbage
        time.sleep(0.2)
        held = self.read()
        if held == {}:
          held = {"heartbeat": 0, "pid": "?", "host": "?"}
        elif held is None:
          continue
      reason = holder_is_gone(held, stale_after_s=self.stale_after_s)
      if reason is None:
        raise WorkdirBusy(f"{self.workdir} is in use by {describe(held)}; retry when it has "
                          f"finished, or use another --workdir")
      note = (f"taking over the lock of {self.workdir} from {describe(held)}: {reason}")
      self._remove()
    else:
      raise WorkdirBusy(f"{self.workdir}: could not take its lock {self.path} (another launch "
                        "keeps taking it); retry later")
    self.held = True
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                    daemon=True)
    self._thread.start()
    return note

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        held = self.read()
        if held and held.get("token") != self.info["token"]:
          return  # taken over (we were judged gone): never overwrite the new holder
        self.info["heartbeat"] = time.time()
        self._replace(self.info)
      except OSError:
        pass  # a full disk or a flaky store: try again at the next beat

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    held = self.read()
    if held and held.get("token") == self.info["token"]:
      self._remove()
      if getattr(self, "_created_dir", False):  # a run refused before writing: leave no trace
        try:
          os.rmdir(self.workdir)  # only if empty
        except OSError:
          pass
    self.held = False

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire_all(workdir: str, **kwargs: Any) -> tuple[WorkdirLock | None, str | None]:
  """Every process calls this together: process 0 takes the lock of `workdir` and broadcasts
  the outcome. Returns (the lock on process 0 / None elsewhere, a takeover line or None);
  raises WorkdirBusy on every process when it is held by a live run."""
  import jax
  message, lock, ok = None, None, True
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, **kwargs)
    try:
      message = lock.acquire()
    except WorkdirBusy as e:
      message, ok = str(e), False
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    ok = bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))
  if not ok:
    raise WorkdirBusy(message or f"{workdir} is in use by another run (process 0 found its "
                      "lock); retry when it has finished")
  return lock, message
