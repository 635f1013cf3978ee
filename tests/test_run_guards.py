"""What protects a run and what its user sees, end to end through the training command line:
one writer per workdir (exit 75, nothing written), a full disk (exit 74, the previous checkpoint
kept, the relaunch equal to an uninterrupted run), and a quiet stdout under a pipe."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from adv_soups import checkpoints as ckpt_lib
from adv_soups import disk_space, training_cli, workdir_lock
from conftest import tiny_digits_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.M)


@pytest.fixture(autouse=True)
def absl_back_on_the_screen():
  """training_cli sends absl's log to the run's train.log: give later tests their stderr back."""
  yield
  from adv_soups import screen
  screen.log_to_screen()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from adv_soups.data import digits
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare_digits(path)
  return path


def _argv(workdir, data_dir, *extra):
  return ["train", f"--config={REPO}/configs/digits.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.model.depth=1",
          "--config.model.width=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
          "--config.train.batch_size=32", "--config.attack.num_steps=1",
          "--config.evals.val.every=0", "--config.eval.num_examples=32",
          "--config.eval.batch_size=32", "--config.eval.attack_steps=1",
          "--config.evals.val.attack=none", *extra]


def _live_lock(workdir, pid):
  info = {"host": workdir_lock.socket.gethostname(), "boot_id": workdir_lock.boot_id(),
          "pid": pid, "start_ticks": workdir_lock.process_start_ticks(pid), "token": "x",
          "since": time.time(), "heartbeat": time.time()}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".lock"), "w") as f:
    json.dump(info, f)


def _refused_while_locked(workdir, capsys, launch):
  """`launch()` on `workdir`, locked by a live process, exits 75 with one line naming the
  holder and writes nothing (the lock file untouched)."""
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    _live_lock(workdir, holder.pid)
    before = open(os.path.join(workdir, ".lock")).read()
    with pytest.raises(SystemExit) as info:
      launch()
    assert info.value.code == workdir_lock.EXIT_BUSY == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {holder.pid} on host" in err[0], err
    assert os.listdir(workdir) == [".lock"] and open(os.path.join(workdir, ".lock")).read() == before
  finally:
    holder.kill()
    holder.wait()


def test_second_launch_on_a_locked_workdir_exits_75_and_writes_nothing(tmp_path, data_dir,
                                                                      capsys):
  workdir = str(tmp_path / "run")
  _refused_while_locked(workdir, capsys, lambda: training_cli.main(
      _argv(workdir, data_dir, "--config.train.steps=2")))


def _params(workdir):
  manager = ckpt_lib.Checkpoints(workdir, create=False)
  restored = manager.restore(items=("params", "opt_state"))
  manager.close()
  return jax.tree.leaves((restored["params"], restored["opt_state"]))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  training_cli.main(_argv(workdir, data_dir, "--config.train.steps=6",
                          "--config.train.checkpoint_every=2"))
  return _params(workdir)


def _fail_save_at(monkeypatch, step, fail):
  """Makes the checkpoint save of `step` call `fail(checkpoint_dir)` first (it raises)."""
  real = ckpt_lib.Checkpoints.save

  def save(self, at, meta, **arrays):
    if at == step:
      fail(str(self._manager.directory))
    return real(self, at, meta, **arrays)

  monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save)


@pytest.mark.slow
def test_a_save_failing_for_lack_of_space_exits_74_and_the_relaunch_equals_an_uninterrupted_run(
    tmp_path, data_dir, uninterrupted, monkeypatch, capsys):
  workdir = str(tmp_path / "run")

  def no_space(directory):  # what a full disk leaves: a partial save, then ENOSPC
    os.makedirs(os.path.join(directory, "4.orbax-checkpoint-tmp-123", "params"))
    raise OSError(errno.ENOSPC, "No space left on device")

  _fail_save_at(monkeypatch, 4, no_space)
  argv = _argv(workdir, data_dir, "--config.train.steps=6", "--config.train.checkpoint_every=2")
  with pytest.raises(SystemExit) as info:
    training_cli.main(argv)
  assert info.value.code == disk_space.EXIT_DISK_FULL == 74
  err = capsys.readouterr().err.strip().splitlines()
  assert "Traceback" not in "\n".join(err)
  assert "no space left to save step 4" in err[-1] and "step 2 (kept)" in err[-1], err
  assert "MiB free" in err[-1]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # partial removed
  assert not os.path.exists(os.path.join(workdir, ".lock"))
  monkeypatch.undo()
  training_cli.main(argv)
  for got, want in zip(_params(workdir), uninterrupted):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_a_programming_error_at_a_save_keeps_its_traceback(tmp_path, data_dir, monkeypatch):
  def bug(directory):
    raise TypeError("a bug, not a full disk")

  _fail_save_at(monkeypatch, 2, bug)
  with pytest.raises(TypeError, match="a bug"):
    training_cli.main(_argv(str(tmp_path / "run"), data_dir, "--config.train.steps=2"))


def _mount_tmpfs(path, size):
  os.makedirs(path)
  if os.geteuid() != 0 or not shutil.which("mount"):
    pytest.skip("mounting a small tmpfs needs root and mount(8)")
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.mark.slow
def test_a_real_full_tmpfs_exits_74_and_resumes_once_space_is_freed(tmp_path, data_dir,
                                                                   uninterrupted, monkeypatch,
                                                                   capsys):
  mount = str(tmp_path / "small")
  _mount_tmpfs(mount, "16m")
  try:
    workdir = os.path.join(mount, "run")
    ballast = os.path.join(mount, "ballast")

    def fill(directory):  # leave 16 KiB: less than a checkpoint; then the real save runs
      with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, disk_space.free_bytes(mount) - (16 << 10)))

    real = ckpt_lib.Checkpoints.save

    def save(self, at, meta, **arrays):
      if at == 4:
        fill(None)
      return real(self, at, meta, **arrays)

    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save)
    argv = _argv(workdir, data_dir, "--config.train.steps=6",
                 "--config.train.checkpoint_every=2")
    with pytest.raises(SystemExit) as info:
      training_cli.main(argv)
    assert info.value.code == 74
    err = capsys.readouterr().err.strip().splitlines()
    assert "no space left to save step 4" in err[-1], err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    monkeypatch.undo()
    os.remove(ballast)
    training_cli.main(argv)
    for got, want in zip(_params(workdir), uninterrupted):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  finally:
    subprocess.run(["umount", "-l", mount], check=False)


def test_a_workdir_with_less_room_than_one_checkpoint_is_refused(tmp_path, data_dir,
                                                                  monkeypatch, capsys):
  monkeypatch.setattr(disk_space, "free_bytes", lambda path: 1000)
  workdir = str(tmp_path / "run")
  with pytest.raises(SystemExit) as info:
    training_cli.main(_argv(workdir, data_dir, "--config.train.steps=2"))
  assert info.value.code == 74
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "free but one checkpoint needs" in err[0], err
  assert not os.path.exists(os.path.join(workdir, "config.json"))


@pytest.mark.slow
def test_training_stdout_under_a_pipe_is_plain_and_ends_with_the_final_metrics(tmp_path,
                                                                             data_dir):
  workdir = tmp_path / "run"
  argv = _argv(workdir, data_dir, "--config.train.steps=4", "--config.train.log_every=2")
  result = subprocess.run([sys.executable, "-m", "adv_soups.train", *argv[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not ABSL_LINE.search(result.stdout) and not ABSL_LINE.search(result.stderr)
  assert "\r" not in result.stdout
  lines = result.stdout.strip().splitlines()
  assert lines[-1].startswith("val/adversarial/clean_accuracy=")
  assert any(l.startswith("step 4/4 (100%)") for l in lines), lines
  assert any(l.startswith("eval @ step 4: ") for l in lines), lines
  log = (workdir / "train.log").read_text()
  assert ABSL_LINE.search(log) and "Setting work unit notes" in log


@pytest.mark.parametrize("module", ["adapters", "threats"])
def test_an_experiment_on_a_locked_directory_exits_75_and_writes_nothing(tmp_path, data_dir,
                                                                        capsys, module):
  """Both experiment commands hold their directory's lock through `run_experiment_locked`."""
  import importlib
  experiment = importlib.import_module(f"adv_soups.experiments.{module}")
  workdir = str(tmp_path / module)
  config = {"adapters": "digits.py", "threats": "digits_threats.py"}[module]
  argv = [module, f"--config={REPO}/configs/{config}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--seeds=1"]
  _refused_while_locked(workdir, capsys, lambda: experiment.main(argv))


@pytest.mark.parametrize("module", ["adapters", "threats"])
def test_an_experiment_refuses_overwrite_in_one_line(tmp_path, capsys, module):
  """`training_cli.parse_experiment_command`: an experiment resumes in place, so --overwrite is
  one line and exit 2, nothing written."""
  import importlib
  experiment = importlib.import_module(f"adv_soups.experiments.{module}")
  workdir = str(tmp_path / module)
  config = {"adapters": "digits.py", "threats": "digits_threats.py"}[module]
  with pytest.raises(SystemExit) as info:
    experiment.main([module, f"--config={REPO}/configs/{config}", f"--workdir={workdir}",
                     "--overwrite"])
  assert info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--overwrite" in err[0], err
  assert not os.path.exists(workdir)
