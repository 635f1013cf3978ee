"""Multi-process runs on one machine: 2 local processes x 2 simulated CPU devices with
jax.distributed against 1 process x 4 devices; disjoint per-process data; one writer; preemption.

This file is also the worker: `python tests/test_multihost.py OUT NUM_PROCESSES PROCESS_ID PORT
DATA_DIR` trains 3 steps on fixed global batches and writes what it saw to OUT (npz).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
GLOBAL_BATCH, STEPS, LR = 16, 3, 0.1
# 2 x 2 devices against 1 x 4: the same mesh shape and computation; only the gradient all-reduce
# crosses processes (gloo), which may sum in another order: float32 round-off, nothing more.
RTOL, ATOL = 1e-5, 1e-5  # measured: max |difference| ~1e-6


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def subprocess_env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"  # not conftest's 8
  for name in ("ADV_SOUPS_COORDINATOR_ADDRESS", "ADV_SOUPS_NUM_PROCESSES", "ADV_SOUPS_PROCESS_ID"):
    env.pop(name, None)
  return env


# ------------------------------------------------------------------------------------------------
# The worker (runs in a subprocess).

def _host(tree):
  """numpy copy of a replicated (possibly multi-process) pytree, from this process's first shard."""
  import jax
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _flat(tree) -> dict:
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def worker(out: str, num_processes: int, process_id: int, port: int, data_dir: str) -> None:
  sys.path[:0] = [REPO, TESTS]
  from adv_soups import parallel
  if num_processes > 1:
    parallel.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  import jax
  assert jax.process_count() == num_processes and jax.device_count() == 4  # before conftest's 8
  from adv_soups import data as data_lib, training
  from adv_soups.data import pipeline
  from adv_soups.models import create_model
  from conftest import tiny_digits_config
  config = tiny_digits_config(data_dir, batch_size=GLOBAL_BATCH)
  # SGD without clipping or decay: the update is linear in the gradient, so an N-times gradient
  # bug cannot hide (AdamW would), and the first update gives the gradient itself.
  config.optimizer.update(name="sgd", momentum=0.9, learning_rate=LR, schedule="constant",
                          warmup_steps=0, weight_decay=0.0, grad_clip_norm=0.0)
  config = training.resolve_config(config)
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, config.train.steps)
  step_fn = training.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  rng = np.random.default_rng(0)
  batches = [{"image": rng.uniform(size=(GLOBAL_BATCH, 8, 8, 1)).astype(np.float32),
              "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)} for _ in range(STEPS)]
  local = slice(process_id * GLOBAL_BATCH // num_processes,
                (process_id + 1) * GLOBAL_BATCH // num_processes)
  start = _host(state.params)
  losses, grad_norms = [], []
  for i, batch in enumerate(batches):
    state, metrics = step_fn(state, parallel.shard_batch(
        mesh, {k: v[local] for k, v in batch.items()}))
    losses.append(float(np.asarray(metrics["loss"].addressable_data(0))))
    grad_norms.append(float(np.asarray(metrics["grad_norm"].addressable_data(0))))
    if i == 0:  # SGD, empty momentum: p1 = p0 - lr * g
      gradient = jax.tree.map(lambda a, b: (a - b) / LR, start, _host(state.params))
  result = {"loss": np.asarray(losses), "grad_norm": np.asarray(grad_norms)}
  result.update({"param" + k: v for k, v in _flat(_host(state.params)).items()})
  result.update({"grad" + k: v for k, v in _flat(gradient).items()})
  if num_processes > 1:  # which training examples this process reads: one epoch of its shard
    pipeline._train_preprocess = lambda *args, **kwargs: (
        lambda seed, example: {"image": example["image"], "label": example["index"]})
    data = dict(config.data.to_dict(), shuffle_buffer=1)
    it = data_lib.train_iterator(data, global_batch_size=2 * num_processes, seed=0)
    per_process = 1437 // num_processes
    result["indices"] = np.concatenate([next(it)["label"] for _ in range(per_process // 2)])
  np.savez(out, **result)


# ------------------------------------------------------------------------------------------------
# The tests.

@pytest.mark.slow
def test_two_processes_train_like_one_and_read_disjoint_shards(tmp_path):
  """2 processes x 2 devices == 1 process x 4 devices on the same global batches (parameters after
  3 co-training steps, the first step's gradient, per-step loss and gradient norm), and the two
  processes' training examples are disjoint and cover the split less the one that drop_remainder
  leaves. The 3 processes prepare the digits in one data_dir together (file lock)."""
  data_dir, port = str(tmp_path / "tfds"), free_port()
  runs = [(2, 0, 2), (2, 1, 2), (1, 0, 4)]  # (processes, id, devices per process)
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(tmp_path / f"{n}_{i}.npz"), str(n), str(i), str(port),
       data_dir], cwd=REPO, env=subprocess_env(d), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for n, i, d in runs]
  for proc in procs:
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
  two = [np.load(tmp_path / f"2_{i}.npz") for i in range(2)]
  one = np.load(tmp_path / "1_0.npz")
  for name in one.files:
    np.testing.assert_array_equal(two[0][name], two[1][name])  # the processes agree
    np.testing.assert_allclose(two[0][name], one[name], rtol=RTOL, atol=ATOL, err_msg=name)
  assert max(np.abs(one[k]).max() for k in one.files if k.startswith("grad")) > 0  # not zeros
  mine, theirs = (set(t["indices"].tolist()) for t in two)
  assert len(mine) == len(two[0]["indices"]) == 718 and len(theirs) == 718
  assert not mine & theirs
  from adv_soups.data import digits
  train_indices = set(digits.split_indices(digits.scaled_images()[1])[0].tolist())
  assert (mine | theirs) <= train_indices and len(train_indices - (mine | theirs)) == 1


def test_digits_preparation_once_per_data_dir(tmp_path, monkeypatch):
  """A gs:// data_dir is prepared by process 0 only; a local one by whichever process of the host
  takes the lock first (here process 1 of 2, whose host does not share process 0's disk); every
  process then meets the others at the barrier."""
  import jax
  from jax.experimental import multihost_utils
  from adv_soups.data import digits
  prepared, events = set(), []
  monkeypatch.setattr(digits.Digits, "is_prepared", lambda self: self._data_dir_root in prepared)
  monkeypatch.setattr(digits.Digits, "download_and_prepare", lambda self: (
      prepared.add(self._data_dir_root), events.append(("prepare", jax.process_index()))))
  monkeypatch.setattr(multihost_utils, "sync_global_devices",
                      lambda name: events.append(("barrier", jax.process_index())))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(digits.Digits, "__init__", lambda self, data_dir=None: setattr(
      self, "_data_dir_root", str(data_dir)))
  for index in (1, 0):  # process 1 first: it must not write a remote data_dir
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(digits, "_PREPARED", set())  # each simulated process has its own memory
    digits.prepare_digits("gs://bucket/tfds")
  assert events == [("barrier", 1), ("prepare", 0), ("barrier", 0)]
  events.clear()
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(digits, "_PREPARED", set())
  digits.prepare_digits(str(tmp_path / "local"))
  assert events == [("prepare", 1), ("barrier", 1)]  # under the lock, before the barrier
  assert (tmp_path / "local" / ".digits.lock").exists()


TRAIN_FLAGS = ["--config=configs/digits.py", "--config.model.depth=1", "--config.model.width=32",
               "--config.model.num_heads=2", "--config.model.mlp_dim=64",
               "--config.attack.num_steps=1", "--config.train.batch_size=32",
               "--config.train.log_every=5", "--config.evals.val.every=0",
               "--config.train.checkpoint_every=0", "--config.eval.num_examples=32",
               "--config.eval.batch_size=32", "--config.eval.attack_steps=1"]


def local_launch(workdir, data_dir, *extra):
  env = dict(subprocess_env(2), PYTHON=sys.executable)
  return subprocess.Popen(
      ["bash", os.path.join(REPO, "launch", "local.sh"), "2", "--", *TRAIN_FLAGS,
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)


@pytest.mark.slow
def test_preempted_two_process_run_saves_one_step_exits_75_and_the_relaunch_finishes(tmp_path):
  """launch/local.sh 2: SIGTERM (forwarded to both processes) -> both save the same step below
  the last, exit 75 with one line each; the same command (with another data_dir and log_every,
  which a resume may change) finishes; config.json, metrics and events are written once."""
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"
  # Enough steps that the run is still stepping when the signal lands: the events file appears at
  # the first log, and 40 steps of this tiny model could all finish before the next poll.
  total = 400
  steps = f"--config.train.steps={total}"
  proc = local_launch(workdir, data_dir, steps)
  deadline = time.time() + 300
  while not (workdir / "config.json").exists() or not list(workdir.glob("events.out.*")):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
    time.sleep(0.1)
  # config.json is written after jax.distributed.initialize (which starts the preemption
  # notifier on every process) and the events file at the first log, so the signal lands during
  # the run; with 40 steps it sometimes landed after the last one (3 of 5 runs, CI under jax 0.12.1).
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  lines = [l for l in err.splitlines() if "preempted:" in l]
  assert len(lines) == 2 and {l[:3] for l in lines} == {"[0]", "[1]"}, err[-3000:]
  stopped = int(lines[0].split("saved step ")[1].split()[0])
  assert all(f"saved step {stopped} of {total}" in l for l in lines)  # the same step on both
  assert 0 < stopped < total
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(stopped)]
  assert sorted(os.listdir(workdir / "data_state" / str(stopped))) == ["process_0", "process_1"]
  assert not (workdir / "FINISHED").exists()

  copy = tmp_path / "tfds_copy"
  subprocess.run(["cp", "-r", str(data_dir), str(copy)], check=True)
  proc = local_launch(workdir, copy, steps, "--config.train.log_every=7",
                      "--config.eval.attack_steps=2")
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  changed = [l for l in err.splitlines() if "changed fields that leave its trajectory" in l]
  assert len(changed) == 1 and changed[0].startswith("[0]"), err[-3000:]
  assert all(f in changed[0] for f in ("data.data_dir", "train.log_every: 5 -> 7",
                                        "eval.attack_steps: 1 -> 2"))
  assert f"Resumed from step {stopped}" in (workdir / "train.log").read_text()  # absl's log
  assert f"Resumed from step {stopped}" in (workdir / "train.process1.log").read_text()
  assert json.loads((workdir / "FINISHED").read_text())["step"] == total
  assert str(total) in os.listdir(workdir / "checkpoints")
  # One writer: one config.json (the resumed run's), one events file per launch (process 0's).
  assert json.loads((workdir / "config.json").read_text())["train"]["log_every"] == 7
  assert len(list(workdir.rglob("config.json"))) == 1
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 2
  assert not list(workdir.glob("*/events.out.tfevents.*"))


if __name__ == "__main__":
  worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
