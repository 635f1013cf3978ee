"""A training mode and an evaluator added from outside the package (this file), end to end.

This module is itself the toy evaluator (its module-level fields / check / evaluate / describe),
registered as type "toy": adding an evaluator is one module plus a config entry. The toy training
mode trains one domain on each image and its mirror image, weighted 1/2 each, with its own loss
term (logit consistency between the two) and metric.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adv_soups import evaluators, parallel, training
from adv_soups.models import create_model
from adv_soups.training import modes
from conftest import tiny_digits_config

# ------------------------------------------------------------------------------------------------
# The toy evaluator: the parameters' global norm times `scale`, and the step it ran at.


def fields():
  return dict(scale=1.0)


def check(where, entry, config):
  if not entry.get("scale", 1.0) > 0:
    raise ValueError(f"{where}.scale={entry.get('scale')} must be > 0")


def evaluate(where, entry, config, model, params, step, workdir):
  yield "param_norm", entry["scale"] * float(optax.tree.norm(params))
  yield "step", step


def describe(entry, config):
  return f"the parameters' norm x {entry['scale']}"


# ------------------------------------------------------------------------------------------------
# The toy training mode.

def _mirrored_rows(inputs: modes.StepInputs) -> modes.Rows:
  images, labels = inputs.images, inputs.labels
  size = labels.shape[0]
  both = jnp.stack([images, images[:, :, ::-1]], axis=1).reshape((2 * size,) + images.shape[1:])
  return modes.Rows(inputs=both, domains=jnp.zeros((2 * size,), jnp.int32),
                    targets=jnp.repeat(labels, 2), weights=jnp.full((2 * size,), 0.5))


def _mirrored_loss(logits, rows, inputs):
  """The rows' weighted CE plus 0.1 x the squared logit difference between x and its mirror."""
  per_row = modes.cross_entropy(logits, rows, inputs)
  pairs = logits.reshape(-1, 2, logits.shape[-1])
  consistency = jnp.mean(jnp.sum((pairs[:, 0] - pairs[:, 1]) ** 2, -1))
  return jnp.sum(per_row * rows.weights) / inputs.labels.shape[0] + 0.1 * consistency, per_row


def _mirrored_metrics(per_row, correct, rows, inputs):
  return {"mirrored_loss": per_row[1::2].mean(), "train_accuracy": correct.mean()}


MIRRORED = modes.TrainingMode(rows=_mirrored_rows, loss=_mirrored_loss, metrics=_mirrored_metrics,
                              description="CE on x and on x mirrored, 1/2 each, + consistency")


@pytest.fixture
def plugins():
  """Registers the toy mode and evaluator for one test."""
  modes.register("mirrored", MIRRORED)
  evaluators.register("toy", sys.modules[__name__])
  yield
  del modes.MODES["mirrored"]
  evaluators.unregister("toy")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def toy_config(data_dir, **evals):
  config = tiny_digits_config(data_dir, mode="mirrored", steps=4, log_every=2)
  config.evals = {"toy": evaluators.entry("toy", every=2, **evals)}
  return config


def test_a_registered_mode_and_evaluator_pass_the_checks(plugins, data_dir):
  config = training.resolve_config(toy_config(data_dir, scale=2.0))
  assert config.model.num_domains == 1  # one domain name: a single-domain model
  assert config.evals.toy.to_dict() == dict(type="toy", every=2, scale=2.0)
  from adv_soups.evaluation import periodic
  assert periodic.describe(config) == ["toy: the parameters' norm x 2.0, every 2 steps"]
  with pytest.raises(ValueError, match=r"config\.evals\.toy\.scale=-1.5 must be > 0"):
    training.resolve_config(toy_config(data_dir, scale=-1.5))
  bad = toy_config(data_dir)
  bad.evals.toy.attack = "pgd"  # a field of the robust type, not of this one
  with pytest.raises(ValueError, match=r"config\.evals\.toy has unknown field\(s\) attack: "
                                       r"allowed type, every, scale"):
    training.resolve_config(bad)
  bad.evals.toy = dict(type="no_such_type")
  with pytest.raises(ValueError, match=r"config\.evals\.toy\.type: unknown evaluator type"):
    training.resolve_config(bad)


def test_unregistered_names_are_refused(data_dir):
  with pytest.raises(ValueError, match=r"unknown config\.train\.mode 'mirrored': allowed "
                                       r"\['cotrain', 'adversarial', 'clean'\]"):
    training.resolve_config(tiny_digits_config(data_dir, mode="mirrored"))
  with pytest.raises(ValueError, match="already registered"):
    modes.register("clean", MIRRORED)


@pytest.mark.slow
def test_the_toy_mode_step_loss_is_its_own_loss(plugins, data_dir):
  """One step of the toy mode from fresh parameters: the loss is the mean over images of
  (CE(f(x)) + CE(f(mirror x))) / 2 + 0.1 |f(x) - f(mirror x)|^2, computed here without the step
  (mutation: the step ignores the mode's loss and uses the default)."""
  config = training.resolve_config(toy_config(data_dir))
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, 4)
  state = training.init_state(config, model, optimizer)
  leaves, treedef = jax.tree.flatten(state.params)  # noise: the zero-initialised head would make
  keys = jax.random.split(jax.random.key(1), len(leaves))  # f(x) = f(mirror x) = 0
  state = state.replace(params=jax.tree.unflatten(treedef, [
      x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (64, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  zeros = jnp.zeros((64,), jnp.int32)
  expected, both = 0.0, []
  for x in (images, images[:, :, ::-1]):
    logits = model.apply({"params": state.params}, jnp.asarray(x), zeros, train=False)
    expected += 0.5 * float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    both.append(np.asarray(logits))
  consistency = float(np.mean(np.sum((both[0] - both[1]) ** 2, -1)))
  assert consistency > 1e-3  # the mode's own term matters here
  expected += 0.1 * consistency
  step = training.make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(state, parallel.replicated(mesh))
  _, metrics = step(state, parallel.shard_batch(mesh, {"image": images, "label": labels}))
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
  assert set(metrics) >= {"mirrored_loss", "train_accuracy"}


@pytest.mark.slow
def test_the_toy_mode_and_evaluator_train_end_to_end(plugins, data_dir, tmp_path):
  """train_and_evaluate with both: 4 steps, the toy evaluator at steps 2 and 4, its metrics
  (named '<entry>/<metric>') computed on the final parameters."""
  result = training.train_and_evaluate(toy_config(data_dir, scale=3.0), str(tmp_path))
  assert int(result.state.step) == 4
  assert result.eval_metrics["toy/step"] == 4
  norm = float(optax.tree.norm(jax.device_get(result.state.params)))
  assert result.eval_metrics["toy/param_norm"] == pytest.approx(3.0 * norm, rel=1e-6)
