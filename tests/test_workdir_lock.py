"""The workdir lock: one writer, stale locks taken over, the heartbeat refreshed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from adv_soups import workdir_lock


def test_second_lock_is_refused_naming_the_holder(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path))
  assert first.acquire() is None
  try:
    with pytest.raises(workdir_lock.WorkdirBusy, match=f"pid {os.getpid()} on host"):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    info = json.loads((tmp_path / ".lock").read_text())
    assert {"host", "boot_id", "pid", "start_ticks", "token", "heartbeat"} <= set(info)
  finally:
    first.release()
  assert not (tmp_path / ".lock").exists()
  assert workdir_lock.WorkdirLock(str(tmp_path)).acquire() is None  # free again


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  holder = workdir_lock.WorkdirLock(str(tmp_path))
  holder.acquire()
  holder._stop.set()
  holder._thread.join()
  info = json.loads((tmp_path / ".lock").read_text())
  info["pid"] = _dead_pid()
  (tmp_path / ".lock").write_text(json.dumps(info))
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  note = lock.acquire()
  try:
    assert note is not None and "is not running" in note and str(info["pid"]) in note
    assert json.loads((tmp_path / ".lock").read_text())["token"] == lock.info["token"]
  finally:
    lock.release()


def test_lock_without_heartbeat_is_taken_over_even_from_another_host(tmp_path):
  stale = {"host": "elsewhere", "boot_id": "x", "pid": 1, "start_ticks": 1, "token": "t",
           "since": 0, "heartbeat": time.time() - workdir_lock.STALE_AFTER_S - 5}
  (tmp_path / ".lock").write_text(json.dumps(stale))
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  try:
    assert "no heartbeat for 10 min" in lock.acquire()
  finally:
    lock.release()
  stale["heartbeat"] = time.time() - 60  # another host, alive a minute ago: busy
  (tmp_path / ".lock").write_text(json.dumps(stale))
  with pytest.raises(workdir_lock.WorkdirBusy, match="host elsewhere"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()


def test_recycled_pid_counts_as_gone():
  me = workdir_lock.holder_is_gone({
      "host": workdir_lock.socket.gethostname(), "boot_id": workdir_lock.boot_id(),
      "pid": os.getpid(), "start_ticks": workdir_lock.process_start_ticks(os.getpid()),
      "heartbeat": time.time()})
  assert me is None
  other = workdir_lock.holder_is_gone({
      "host": workdir_lock.socket.gethostname(), "boot_id": workdir_lock.boot_id(),
      "pid": os.getpid(), "start_ticks": -1, "heartbeat": time.time()})
  assert "another process" in other


def test_heartbeat_is_refreshed_and_never_overwrites_a_new_holder(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05)
  lock.acquire()
  first = lock.info["since"]
  deadline = time.time() + 5
  while json.loads((tmp_path / ".lock").read_text())["heartbeat"] <= first:
    assert time.time() < deadline, "the heartbeat never moved"
    time.sleep(0.02)
  other = dict(lock.info, token="someone-else", pid=12345)
  (tmp_path / ".lock").write_text(json.dumps(other))
  time.sleep(0.3)
  assert json.loads((tmp_path / ".lock").read_text())["token"] == "someone-else"
  lock.release()  # not ours any more: left in place
  assert json.loads((tmp_path / ".lock").read_text())["token"] == "someone-else"


def test_overwrite_moves_the_run_aside_but_not_the_lock(tmp_path):
  from adv_soups import workdir as workdir_lib
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    assert workdir_lib.move_aside(str(tmp_path)) is None  # only the lock: nothing to move
    (tmp_path / "config.json").write_text("{}")
    moved = workdir_lib.move_aside(str(tmp_path))
    assert os.listdir(moved) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == [".lock", "previous_runs"]
  finally:
    lock.release()


def test_a_workdir_the_lock_created_is_removed_on_release_if_still_empty(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path / "new"))
  lock.acquire()
  lock.release()
  assert not (tmp_path / "new").exists()  # a run refused after the lock writes nothing
  lock = workdir_lock.WorkdirLock(str(tmp_path / "new"))
  lock.acquire()
  (tmp_path / "new" / "config.json").write_text("{}")
  lock.release()
  assert os.listdir(tmp_path / "new") == ["config.json"]
