"""The full recipe in the train step: eps warm-up, mixup / CutMix and RandAugment through training
(exact resume), the ImageNet config with everything on, config validation."""
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adv_soups import checkpoints, data as data_lib, parallel, training
from adv_soups.models import create_model
from configs import imagenet_vit_b16
from conftest import tiny_digits_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_attack_schedule_ramps_eps_and_step_size():
  attack = ml_collections.ConfigDict(dict(eps=0.08, step_size=0.02, eps_warmup_steps=4))
  for step, scale in ((0, 0.0), (1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
    eps, step_size = training.attack_schedule(attack, jnp.asarray(step, jnp.int32))
    assert float(eps) == pytest.approx(0.08 * scale) and \
        float(step_size) == pytest.approx(0.02 * scale)
  attack.eps_warmup_steps = 0
  assert training.attack_schedule(attack, jnp.asarray(3)) == (0.08, 0.02)  # off: the floats


def _step_and_state(config):
  config = training.resolve_config(config)
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, config.train.steps)
  step = training.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  batch = parallel.shard_batch(mesh, next(data_lib.train_iterator(
      config.data, global_batch_size=config.train.batch_size, seed=0)))
  return step, state, batch


def test_eps_warmup_ramps_the_steps_perturbation(data_dir):
  config = tiny_digits_config(data_dir, batch_size=32)
  config.attack.update(eps=0.08, eps_warmup_steps=4)
  step, state, batch = _step_and_state(config)
  for t in range(6):
    state, metrics = step(state, batch)
    eps_t = 0.08 * min(1.0, t / 4)
    assert float(metrics["attack_eps"]) == pytest.approx(eps_t, abs=1e-7)
    # PGD's largest l_inf perturbation in the batch is (within 1%) the ramped eps.
    assert eps_t * 0.99 - 1e-7 <= float(metrics["adv_perturbation"]) <= eps_t + 1e-6


@pytest.mark.slow
def test_mixup_step_moves_no_data_between_devices(data_dir):
  config = tiny_digits_config(data_dir)
  config.data.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  step, state, batch = _step_and_state(config)
  hlo = step.lower(state, batch).compile().as_text()
  for collective in ("collective-permute", "all-to-all", "all-gather"):
    assert collective not in hlo
  _, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("field,value,match", [
    ("data.randaugment.magnitude", 12.0, "magnitude"),
    ("data.mixup.cutmix_alpha", -1.0, "cutmix_alpha"),
    ("attack.eps_warmup_steps", -5, "eps_warmup_steps"),
    ("train.batch_size", 24, "even"),  # 3 per device with mixup on
])
def test_bad_recipe_values_raise_one_clear_error(data_dir, field, value, match):
  config = tiny_digits_config(data_dir)
  config.data.mixup.mixup_alpha = 0.8
  group, name = field.rsplit(".", 1)
  target = config
  for part in group.split("."):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=match):
    training.resolve_config(config)


@pytest.mark.slow
def test_resume_with_randaugment_and_mixup_equals_an_uninterrupted_run(data_dir, tmp_path):
  config = tiny_digits_config(data_dir, steps=6, checkpoint_every=3, log_every=3)
  config.data.randaugment.num_ops = 2
  config.data.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  config.attack.eps_warmup_steps = 4
  config.eval.update(num_examples=8, batch_size=8, attack_steps=1)
  full = training.train_and_evaluate(config, str(tmp_path / "full"))
  crashed = tmp_path / "crashed"
  shutil.copytree(tmp_path / "full", crashed)  # the same run, then a crash after step 3
  manager = checkpoints.Checkpoints(str(crashed))
  assert manager.all_steps() == [3, 6]
  manager._manager.delete(6)
  manager.close()
  shutil.rmtree(crashed / "data_state" / "6")
  resumed = training.train_and_evaluate(config, str(crashed))
  assert int(resumed.state.step) == 6
  for a, b in zip(jax.tree.leaves((resumed.state.params, resumed.state.opt_state)),
                  jax.tree.leaves((full.state.params, full.state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_imagenet_recipe_step_lowers_on_mock_data_with_everything_on(tmp_path):
  config = imagenet_vit_b16.get_config()
  assert config.data.randaugment.num_ops == 2 and config.attack.eps_warmup_steps > 0
  assert config.data.mixup.mixup_alpha == 0.0  # present but off by default
  config.data.mixup.update(mixup_alpha=0.8, cutmix_alpha=1.0)
  config.train.batch_size = 16
  config = training.resolve_config(config)
  model = create_model(config.model)
  with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path)):
    batch = next(data_lib.train_iterator(config.data, global_batch_size=16, seed=0))
  assert batch["image"].shape == (16, 224, 224, 3) and batch["image"].dtype == np.float32
  mesh = parallel.make_mesh()
  optimizer = training.make_optimizer(config.optimizer, config.train.steps)
  step = training.make_train_step(config, model, optimizer, mesh)
  state = jax.eval_shape(lambda: training.init_state(config, model, optimizer))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  text = step.lower(state, shapes).as_text()
  assert "stablehlo.while" in text
  _, metrics = jax.eval_shape(step, state, shapes)
  assert metrics["loss"].shape == () and metrics["attack_eps"].shape == ()
