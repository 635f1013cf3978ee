"""Randomised models and AutoAttack's rand version: EOT for APGD, keys per example and per draw,
the same numbers after the runner regroups rows, and the refusals (draws < 1, l_1 for PGD, ...)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups.attacks import checks, eot, registry, runner

N_FEATURES, N_EXAMPLES = 64, 16
K_FREQ, RATIO = 1000.0, 10.0


def randomised_linear_model():
  """logit(1) - logit(0) = sum(x) + bias + (RATIO / K) sum_j s_j sin(K x_j), s_j = +-1 drawn per
  feature from the row's key: a high-frequency feature whose sign flips at random. Its value is
  small (the prediction is the linear part's), its input gradient RATIO times the linear part's,
  with a random sign: one draw's gradient says little, the mean over draws says sum(x).
  `domain` carries each example's bias."""
  def logits_fn(images, bias, keys):
    flat = images.reshape(images.shape[0], -1)
    s = jax.vmap(lambda k: jax.random.rademacher(k, (N_FEATURES,), jnp.float32))(keys)
    z = jnp.sum(flat, -1) + bias + RATIO / K_FREQ * jnp.sum(s * jnp.sin(K_FREQ * flat), -1)
    return jnp.stack([jnp.zeros_like(z), z], -1)
  return logits_fn


@pytest.fixture(scope="module")
def problem():
  x = np.random.default_rng(0).uniform(0.3, 0.7, size=(N_EXAMPLES, N_FEATURES))
  # The mean model is broken by +0.06 on every pixel (eps 0.1 leaves room): margin 3.84.
  bias = (-3.84 - x.sum(1)).astype(np.float32)
  batch = dict(image=x.reshape(N_EXAMPLES, 8, 8, 1).astype(np.float32),
               label=np.zeros(N_EXAMPLES, np.int32), domain=bias)
  return randomised_linear_model(), batch


def _run(problem, draws, batches=None, batch_size=None):
  logits_fn, batch = problem
  return runner.robust_accuracy(
      logits_fn, batches or [batch], eps=0.1, norm="linf", attacks="apgd-ce", num_steps=100,
      randomised=True, version="standard" if draws is None else "rand", eot_draws=draws,
      batch_size=batch_size,
      mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine
def test_eot_breaks_a_randomised_linear_model_that_single_draw_apgd_does_not(problem):
  single = _run(problem, None)
  with_eot = _run(problem, eot.DEFAULT_DRAWS)
  assert single.clean_accuracy == with_eot.clean_accuracy == 1.0
  assert single.robust_accuracy >= 0.9, single.robust_accuracy
  assert with_eot.robust_accuracy <= 0.1, with_eot.robust_accuracy
  assert with_eot.attacks[0]["eot_draws"] == 20 and with_eot.attacks[0]["randomised"]


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine
def test_same_seed_same_numbers_after_the_runner_regroups_rows(problem):
  _, batch = problem
  first = _run(problem, 3)
  again = _run(problem, 3)
  split = [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}]
  regrouped = _run(problem, 3, batches=split, batch_size=4)
  np.testing.assert_array_equal(first.broken_by, again.broken_by)
  np.testing.assert_array_equal(first.broken_by, regrouped.broken_by)
  np.testing.assert_array_equal(first.clean_correct, regrouped.clean_correct)


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine
def test_rescoring_draws_are_independent_of_the_attack_queries():
  """A coin-flip model (correct iff its draw says so): an attack that queries it 10 times sees a
  wrong prediction almost surely; only a re-scoring draw of its own keeps about half of the
  clean-correct points (re-using a draw the attack saw would count the best of its draws)."""
  def coin(images, keys):
    s = jax.vmap(lambda k: jax.random.rademacher(k, (), jnp.float32))(keys)
    s = s * (1.0 + 0.01 * jnp.sum(jnp.sin(50.0 * images), axis=(1, 2, 3)))  # iterates move
    return jnp.stack([s, -s], -1)
  n = 128
  batch = dict(image=np.full((n, 2, 2, 1), 0.5, np.float32), label=np.zeros(n, np.int32))
  r = runner.robust_accuracy(coin, [batch], eps=0.1, norm="linf", attacks="apgd-ce",
                             num_steps=10, randomised=True,
                             mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  kept = r.robust_accuracy / r.clean_accuracy
  assert 0.3 < r.clean_accuracy < 0.7 and 0.3 < kept < 0.7, (r.clean_accuracy, kept)


def test_model_randomness_is_per_example_and_per_key():
  """Under vmap each row gets its own dropout mask from its own key: two copies of one image
  differ with different keys, agree with equal keys, and do not depend on the batch."""
  from adv_soups.models import create_model, init_params
  model = create_model(dict(variant="tiny/2", image_size=8, num_classes=10, width=32, depth=1,
                            num_heads=2, mlp_dim=64, channels=1, num_domains=1, adapter="none"))
  params = init_params(model, jax.random.key(0), 1)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  rand = model.clone(dropout_rate=0.5)
  img = jnp.full((4, 8, 8, 1), 0.5)
  keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray([1, 2, 1, 3]))
  out = np.asarray(eot.per_example_apply(rand, params, img, None, keys))
  assert np.allclose(out[0], out[2]) and not np.allclose(out[0], out[1])
  alone = np.asarray(eot.per_example_apply(rand, params, img[1:2], None, keys[1:2]))
  np.testing.assert_allclose(alone[0], out[1], rtol=1e-5, atol=1e-6)


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="integer >= 1"):
    eot.check_draws(0)
  with pytest.raises(ValueError, match="apply to apgd-ce, apgd-dlr only"):
    registry.check_eot(("apgd-ce", "apgd-t"), 5)
  assert registry.parse_suite("autoattack-rand") == ("apgd-ce", "apgd-dlr")
  assert registry.version_of("autoattack-rand") == "rand"
  for name in registry.RAND_AUTOATTACK:
    assert registry.get(name).settings_for("linf", "rand")["eot_draws"] == 20
  budgets = {"apgd-ce": 100, "apgd-dlr": 100}
  text = registry.describe(registry.RAND_AUTOATTACK, budgets, "rand")
  assert text.startswith("AutoAttack, rand version") and "EOT 20 draws" in text
  fewer = registry.describe(registry.RAND_AUTOATTACK, budgets, "rand", eot_draws=5)
  assert not fewer.startswith("AutoAttack") and "not AutoAttack's rand version" in fewer
  assert "EOT 5 draws" in fewer


def test_randomness_warning_names_the_rand_version():
  calls = iter(range(100))
  f = lambda x: x.reshape(len(x), -1)[:, :3] + 0.1 * next(calls)
  warning = checks.check_randomized(f, np.zeros((2, 2, 2, 1), np.float32))
  assert "--attack=autoattack-rand" in warning


# ---------------------------------------------------------------------------------------------
# Command line: one line, exit 2, nothing written, nothing compiled
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_workdir(tmp_path_factory):
  from conftest import tiny_digits_config, write_untrained_workdir
  root = tmp_path_factory.mktemp("l1eot")
  write_untrained_workdir(root / "workdir", tiny_digits_config(root / "tfds"))
  return str(root / "workdir")


@pytest.mark.parametrize("args,message", [
    (["--norm=l1", "--eps=1", "--attack=pgd"], "'pgd' has no l1 form"),
    (["--norm=l1", "--attack=apgd-ce"], "--norm=l1 needs its own --eps"),
    (["--attack=autoattack-rand", "--eot_draws=0"], "EOT draws must be an integer >= 1"),
    (["--attack=apgd-t", "--eot_draws=3"], "apply to apgd-ce, apgd-dlr only"),
    (["--eval_dropout=1.5"], "--eval_dropout=1.5 must be in [0, 1)"),
    (["--norm=l1", "--eps=1", "--attack=autoattack", "--steps=2"], "num_steps >= 3"),
])
def test_evaluate_bad_input(args, message, untrained_workdir, capsys):
  from adv_soups import evaluate
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, **k: compiles.append(event) if "backend_compile" in event else None)
  before = sorted(os.walk(untrained_workdir))
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["evaluate", f"--workdir={untrained_workdir}", "--alpha=0"] + args)
  err = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
  assert sorted(os.walk(untrained_workdir)) == before
  assert not compiles


def test_training_refuses_l1_in_one_line(tmp_path):
  from conftest import tiny_digits_config
  from adv_soups import train
  config = tiny_digits_config(tmp_path)
  config.attack.norm = "l1"
  with pytest.raises(ValueError, match="training attacks are linf / l2 only") as info:
    train.resolve_config(config)
  assert "\n" not in str(info.value)
