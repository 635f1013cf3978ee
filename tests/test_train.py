"""The training program: modes, multi-device equivalence, resume, config.json, errors."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adv_soups import checkpoints, data as data_lib, parallel, train, workdir as workdir_lib
from adv_soups.models import create_model
from configs import digits as digits_config
from configs import imagenet_vit_b16

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def small_config(data_dir, mode="cotrain", **train_overrides):
  """The digits config shrunk for tests: a 1-block ViT, short runs, a small evaluation."""
  config = digits_config.get_config()
  config.data.data_dir = data_dir
  config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
  config.train.update(dict(dict(mode=mode, steps=6, batch_size=64, log_every=3, eval_every=0,
                                checkpoint_every=3), **train_overrides))
  config.attack.num_steps = 2
  config.eval.update(num_examples=64, batch_size=64, attack_steps=2)
  return config


def params_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("mode", train.MODES)
def test_a_few_steps_of_each_mode_lower_the_loss(mode, data_dir):
  config = small_config(data_dir, mode)
  config.attack.eps = 0.03  # a tiny ViT from scratch collapses under eps 0.1 in 30 steps
  config = train.resolve_config(config)
  config.optimizer.update(warmup_steps=0, schedule="constant", learning_rate=5e-3)
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = train.make_optimizer(config.optimizer, 30)
  step = train.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(train.init_state(config, model, optimizer), parallel.replicated(mesh))
  # One fixed batch of real digits: the step must fit it (fresh batches learn too slowly for a
  # fast test, adversarially above all).
  batch = parallel.shard_batch(mesh, next(data_lib.train_iterator(config.data,
                                                                  global_batch_size=64, seed=0)))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  if mode == "cotrain":
    assert {"clean_loss", "adv_loss"} <= set(metrics)
    # The adversarial half is attacked: its loss exceeds the clean half's.
    assert float(metrics["adv_loss"]) > float(metrics["clean_loss"])


def test_cotrain_step_on_8_devices_matches_1_device(data_dir):
  """SGD without clipping, so parameters differ by exactly lr * gradient differences (AdamW's
  scale invariance would hide a gradient that is N times too large)."""
  config = train.resolve_config(small_config(data_dir))
  config.optimizer.update(name="sgd", momentum=0.0, grad_clip_norm=0.0, weight_decay=0.0,
                          warmup_steps=0, schedule="constant", learning_rate=0.5)
  model = create_model(config.model)
  batch = next(data_lib.train_iterator(config.data, global_batch_size=64, seed=0))
  results = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:n])
    optimizer = train.make_optimizer(config.optimizer, 10)
    step = train.make_train_step(config, model, optimizer, mesh)
    state = jax.device_put(train.init_state(config, model, optimizer), parallel.replicated(mesh))
    for _ in range(2):
      state, metrics = step(state, parallel.shard_batch(mesh, batch))
    results[n] = (jax.device_get(state.params), float(metrics["grad_norm"]))
  assert results[8][1] == pytest.approx(results[1][1], rel=1e-4)
  params_close(results[8][0], results[1][0], atol=2e-5)


@pytest.mark.slow
def test_resume_after_a_crash_equals_an_uninterrupted_run(data_dir, tmp_path):
  config = small_config(data_dir)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  # Simulate a crash after the step-3 checkpoint: drop everything step 6 wrote.
  crashed = tmp_path / "crashed"
  train.train_and_evaluate(config, str(crashed))
  manager = checkpoints.Checkpoints(str(crashed))
  assert manager.all_steps() == [3, 6]
  manager._manager.delete(6)
  manager.close()
  shutil.rmtree(crashed / "data_state" / "6")
  resumed = train.train_and_evaluate(config, str(crashed))
  assert int(resumed.state.step) == 6
  params_close(resumed.state.params, full.state.params, atol=0)
  params_close(resumed.state.opt_state, full.state.opt_state, atol=0)


def test_config_json_round_trips(data_dir, tmp_path):
  config = train.resolve_config(small_config(data_dir))
  workdir_lib.save_config(str(tmp_path), config)
  loaded = workdir_lib.load_config(str(tmp_path))
  assert workdir_lib.config_to_dict(loaded) == workdir_lib.config_to_dict(config)
  # A loaded config is already resolved: resolving it again changes nothing.
  assert workdir_lib.config_to_dict(train.resolve_config(loaded)) == \
      workdir_lib.config_to_dict(config)
  create_model(loaded.model)


@pytest.mark.slow
def test_nonfinite_loss_stops_training_without_saving_it(data_dir, tmp_path, monkeypatch):
  real = data_lib.train_iterator

  class Poisoned:
    def __init__(self, *args, **kwargs):
      self.inner = real(*args, **kwargs)
      self.count = 0

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count == 5:
        batch["image"] = batch["image"] * np.nan
      return batch

    def __getattr__(self, name):
      return getattr(self.inner, name)

  monkeypatch.setattr(train.data_lib, "train_iterator", Poisoned)
  config = small_config(data_dir, checkpoint_every=2)
  with pytest.raises(FloatingPointError, match="at step 5"):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpoints.Checkpoints(str(tmp_path)).all_steps() == [2, 4]


@pytest.mark.parametrize("group, field, value", [
    ("train", "mode", "semi"), ("data", "name", "mnist3d"), ("optimizer", "name", "lamb"),
    ("attack", "norm", "l1"), ("train", "batch_size", 63), ("eval", "batch_size", 100),
    ("train", "keep_checkpoints", 0), ("optimizer", "ema_decay", 2.0),
    ("train", "label_smoothing", 1.5), ("model", "num_domains", 3)])
def test_bad_config_values_raise_one_clear_error(group, field, value, data_dir):
  config = small_config(data_dir)
  config[group][field] = value
  with pytest.raises(ValueError, match=str(value)):
    train.resolve_config(config)


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    # A fraction eps is accepted (the error is about the mode, parsed after it).
    (["--config=configs/digits.py", "--config.attack.eps=4/255", "--config.train.mode=semi"],
     ["semi", "cotrain"]),
    (["--config=configs/digits.py", "--config.train.stepz=3"], ["stepz"]),
    (["--config=configs/nope.py"], ["nope.py"]),
    (["--config=configs/cifar10_vit.py", "--config.data.data_dir={tmp}/empty"],
     ["cifar10", "{tmp}/empty", "tfds build"]),
])
def test_cli_bad_input_exits_2_and_writes_nothing(args, expected, tmp_path):
  workdir = tmp_path / "run"
  args = [a.format(tmp=tmp_path) for a in args]
  result = subprocess.run([sys.executable, "-m", "adv_soups.train", f"--workdir={workdir}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "Traceback" not in result.stderr
  for text in expected:
    assert text.format(tmp=tmp_path) in last
  assert not workdir.exists()


def test_fraction_overrides_become_numbers():
  assert train._fractions_to_numbers(["--config.attack.eps=4/255", "--workdir=a/b",
                                      "--config.data.data_dir=/x/y"]) == [
      f"--config.attack.eps={4 / 255!r}", "--workdir=a/b", "--config.data.data_dir=/x/y"]


def test_a_different_config_is_refused_unless_overwrite(data_dir, tmp_path):
  config = train.resolve_config(small_config(data_dir))
  workdir = str(tmp_path / "run")
  workdir_lib.save_config(workdir, config)
  train.prepare_workdir(config, workdir, overwrite=False)  # same config: resume
  other = config.copy_and_resolve_references()
  other.train.steps = 7
  with pytest.raises(ValueError, match="train.steps: 6 -> 7"):
    train.prepare_workdir(other, workdir, overwrite=False)
  train.prepare_workdir(other, workdir, overwrite=True)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  moved = os.listdir(os.path.join(workdir, "previous_runs"))
  assert len(moved) == 1
  assert os.path.exists(os.path.join(workdir, "previous_runs", moved[0], "config.json"))


@pytest.mark.slow
def test_imagenet_config_builds_vit_b16_and_its_step_lowers_on_mock_data(tmp_path):
  config = imagenet_vit_b16.get_config()
  config.train.batch_size = 8
  config = train.resolve_config(config)
  model = create_model(config.model)
  assert (model.width, model.depth, model.patch_size, model.adapter) == (768, 12, 16, "token")
  assert config.attack.eps == pytest.approx(4 / 255)
  with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path)):
    batch = next(data_lib.train_iterator(config.data, global_batch_size=8, seed=0))
  assert batch["image"].shape == (8, 224, 224, 3)
  mesh = parallel.make_mesh()
  optimizer = train.make_optimizer(config.optimizer, config.train.steps)
  step = train.make_train_step(config, model, optimizer, mesh)
  state = jax.eval_shape(lambda: train.init_state(config, model, optimizer))
  batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  lowered = step.lower(state, batch_shapes)  # traces PGD + the update for ViT-B/16
  out_state, metrics = jax.eval_shape(step, state, batch_shapes)
  assert "stablehlo.while" in lowered.as_text()  # the PGD loop is inside the step
  assert jax.tree.map(lambda x: x.shape, out_state.params) == \
      jax.tree.map(lambda x: x.shape, state.params)
  assert metrics["loss"].shape == ()


def test_weight_decay_only_on_kernels(data_dir):
  """With zero gradients AdamW's update is pure decoupled decay: non-zero exactly on kernels."""
  config = train.resolve_config(small_config(data_dir))
  config.optimizer.update(warmup_steps=0, schedule="constant", weight_decay=0.1)
  optimizer = train.make_optimizer(config.optimizer, 10)
  params = train.init_state(config, create_model(config.model), optimizer).params
  params = jax.tree.map(lambda x: x + 1.0, params)  # no zero leaves (the head starts at zero)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  decayed = {jax.tree_util.keystr(p) for p, u in jax.tree_util.tree_leaves_with_path(updates)
             if np.abs(np.asarray(u)).max() > 0}
  kernels = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
             if jax.tree_util.keystr(p).endswith("['kernel']")}
  assert decayed == kernels and kernels
  assert not any("pos_embedding" in n or "cls" in n or "bias" in n or "scale" in n
                 for n in decayed)


def test_ema_tracks_the_parameters(data_dir):
  config = small_config(data_dir)
  config.optimizer.ema_decay = 0.9
  config = train.resolve_config(config)
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = train.make_optimizer(config.optimizer, 10)
  step = train.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(train.init_state(config, model, optimizer), parallel.replicated(mesh))
  start = jax.device_get(state.params)
  batch = parallel.shard_batch(mesh, next(data_lib.train_iterator(config.data,
                                                                  global_batch_size=64, seed=0)))
  state, _ = step(state, batch)
  expected = jax.tree.map(lambda p0, p1: 0.9 * p0 + 0.1 * p1, start, jax.device_get(state.params))
  params_close(state.ema_params, expected, atol=1e-6)
  assert train._eval_params(state) is state.ema_params


def test_checkpoints_accept_a_relative_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  manager = checkpoints.Checkpoints("relative/run")
  manager.save(1, {"note": "x"}, params={"w": jnp.ones(3)})
  restored = manager.restore()
  assert restored["meta"]["step"] == 1 and restored["meta"]["note"] == "x"
  np.testing.assert_array_equal(restored["params"]["w"], np.ones(3))
  assert (tmp_path / "relative" / "run" / "checkpoints" / "1").is_dir()


def _while_bodies_have_collectives(hlo: str) -> tuple[int, bool]:
  """(number of while loops, whether any loop body, or what it calls, has a collective)."""
  import re
  computations, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name is not None:
      computations[name].append(line)
  bodies = re.findall(r"body=%?([\w.\-]+)", hlo)
  seen, todo = set(), list(bodies)
  while todo:
    current = todo.pop()
    if current in seen or current not in computations:
      continue
    seen.add(current)
    text = "\n".join(computations[current])
    todo += re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", text)
  collective = any(op in "\n".join(computations[c]) for c in seen
                   for op in ("all-reduce", "all-gather", "collective-permute", "all-to-all"))
  return len(bodies), collective


def test_train_step_pgd_loop_has_no_collective(data_dir):
  """On 8 devices the only collective is the gradient all-reduce; each device attacks its shard."""
  config = train.resolve_config(small_config(data_dir))
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  model = create_model(config.model)
  optimizer = train.make_optimizer(config.optimizer, 10)
  step = train.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(train.init_state(config, model, optimizer), parallel.replicated(mesh))
  batch = parallel.shard_batch(mesh, next(data_lib.train_iterator(config.data,
                                                                  global_batch_size=64, seed=0)))
  hlo = step.lower(state, batch).compile().as_text()
  assert "all-reduce" in hlo  # the detector sees the gradient all-reduce outside the loop
  loops, collective_in_loop = _while_bodies_have_collectives(hlo)
  assert loops >= 1 and not collective_in_loop
