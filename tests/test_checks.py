"""Tests of adv_soups.attacks.checks: each check fires on a model (or numbers) made to trigger it
and stays silent on a normal model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups.attacks import checks

KEY = jax.random.PRNGKey(0)
X = jax.random.uniform(KEY, (32, 4, 4, 3))
W = jax.random.normal(jax.random.PRNGKey(1), (48, 10))
B = jax.random.normal(jax.random.PRNGKey(2), (10,))


def linear(x):
  """A normal model: random linear logits [B, 10]."""
  return x.reshape(x.shape[0], -1) @ W + B


W2 = jax.random.normal(jax.random.PRNGKey(3), (10, 5))


def mlp(x):
  """A normal model: a random 2-layer GELU MLP, 5 classes."""
  return jax.nn.gelu(x.reshape(x.shape[0], -1) @ W) @ W2


LABELS = np.asarray(jnp.argmax(linear(X), -1))


def test_randomized():
  calls = {"n": 0}

  def dropout_at_eval(x):  # a fresh dropout mask on every call
    calls["n"] += 1
    keep = jax.random.bernoulli(jax.random.PRNGKey(calls["n"]), 0.9, x.shape)
    return linear(jnp.where(keep, x / 0.9, 0.0))
  msg = checks.check_randomized(dropout_at_eval, X, LABELS)
  assert msg and "randomised" in msg and "\n" not in msg
  assert calls["n"] == checks.RANDOMIZED_REPEATS
  assert checks.check_randomized(linear, X, LABELS) is None
  assert checks.check_randomized(jax.jit(mlp), X, n=3) is None
  # Logits that vary only below the tolerance (1e-4 after normalisation) stay silent; above
  # it they fire, also without labels.
  for scale, fires in ((1e-7, False), (1e-2, True)):
    noise = iter(np.random.RandomState(0).randn(5, 32, 10) * scale)
    msg = checks.check_randomized(lambda x: linear(x) + next(noise), X)
    assert (msg is not None) == fires, (scale, msg)
  with pytest.raises(ValueError, match="n must be an integer >= 2, got n=1"):
    checks.check_randomized(linear, X, n=1)


def test_probabilities():
  msg = checks.check_probabilities(jax.nn.softmax(linear(X)))
  assert msg and "probabilities" in msg
  assert checks.check_probabilities(linear(X)) is None
  assert checks.check_probabilities(jax.nn.log_softmax(linear(X))) is None
  # In [0, 1] but not summing to 1 (e.g. sigmoids), or summing to 1 with negative entries: not
  # a distribution, silent.
  assert checks.check_probabilities(jax.nn.sigmoid(linear(X))) is None
  assert checks.check_probabilities(jnp.array([[0.9, 0.6, -0.5], [0.2, 0.3, 0.5]])) is None


def quantised(x):
  """Inputs rounded to 1/16 before a linear layer: zero input gradient almost everywhere."""
  return linear(jnp.round(x * 16) / 16)


def test_zero_gradients():
  msg = checks.check_zero_gradients(quantised, X, LABELS, KEY, eps=8 / 255)
  assert msg and msg.startswith("32 of 32 points") and "zero" in msg
  assert checks.check_zero_gradients(linear, X, LABELS, KEY, eps=8 / 255) is None
  mlp_labels = jnp.argmax(mlp(X), -1)
  assert checks.check_zero_gradients(mlp, X, mlp_labels, KEY, eps=0.5, norm="l2") is None
  # A model that is flat on part of the input space only: the count says how many points.
  half = lambda x: jnp.where(jnp.arange(x.shape[0])[:, None] < 12, quantised(x), linear(x))
  mask = checks.zero_gradient_mask(half, X, LABELS)
  np.testing.assert_array_equal(mask, np.arange(32) < 12)
  assert checks.check_zero_gradients(half, X, LABELS).startswith("12 of 32 points")
  # Tiny but non-zero gradients are not zero.
  flat = lambda x: linear(1e-6 * x)
  assert checks.check_zero_gradients(flat, X, jnp.argmax(flat(X), -1)) is None
  # It is the DLR loss's gradient: where the label is the third-highest class DLR is the
  # constant 1 (a zero gradient, up to float rounding on some points), though the
  # cross-entropy's gradient is not zero there.
  third = jnp.argsort(linear(X), axis=-1)[:, -3]
  assert checks.check_zero_gradients(linear, X, third)
  # Two classes: the margin loss stands in for DLR.
  two = lambda x: linear(x)[:, :2]
  two_labels = jnp.argmax(two(X), -1)
  assert checks.check_zero_gradients(two, X, two_labels) is None
  assert checks.check_zero_gradients(lambda x: quantised(x)[:, :2], X, two_labels)


def test_square_sr():
  msg = checks.check_square_sr(0.50, 0.49)
  assert msg and "1.00 points" in msg and "50.00% -> 49.00%" in msg
  assert checks.check_square_sr(0.50, 0.499) is None  # within AutoAttack's 0.002
  assert checks.check_square_sr(0.50, 0.50) is None
  assert checks.check_square_sr(0.50, 0.499, tolerance=0.0)
  with pytest.raises(ValueError, match="acc_after_square must be a fraction in"):
    checks.check_square_sr(0.5, 49.0)


def test_n_classes():
  msg = checks.check_n_classes(3, ("apgd-ce", "apgd-t", "fab-t", "square"), 9)
  assert msg and "APGD-T (dlr-targeted loss) needs >= 4 classes" in msg
  assert "FAB-T asks for 9 target classes but only 2" in msg
  msg = checks.check_n_classes(5, ("apgd-ce", "apgd-t"), 9)
  assert msg == ("APGD-T asks for 9 target classes but only 4 exist, "
                 "see AutoAttack's flags_doc.md")
  assert "(dlr loss) needs >= 3" in checks.check_n_classes(2, ("apgd-dlr",), 1)
  assert checks.check_n_classes(3, ("apgd-dlr",), 9) is None  # untargeted DLR works with 3
  assert checks.check_n_classes(10, ("apgd-ce", "apgd-t", "fab-t", "square"), 9) is None
  assert checks.check_n_classes(2, ("apgd-ce", "square"), 9) is None
  assert "FAB-T" in checks.check_n_classes(10, ("fab-t",), 9, targets={"fab-t": 10})
  assert checks.check_n_classes(10, ("apgd-t", "fab-t")) is None  # the entries' own 9 targets
  with pytest.raises(ValueError, match="unknown attack"):
    checks.check_n_classes(10, ("nope",))


def test_dynamic():
  def purifier(x):  # a few gradient steps on the input before classifying: a dynamic defence
    energy = lambda z: jnp.sum(linear(z) ** 2)
    for _ in range(2):
      x = x - 0.01 * jax.grad(energy)(x)
    return linear(x)
  msg = checks.check_dynamic(purifier, X)
  assert msg and "grad" in msg
  assert checks.check_dynamic(lambda x: jax.vjp(linear, x)[0], X)
  assert checks.check_dynamic(linear, X) is None

  def grad(x):  # a function that is merely named like JAX's entry point
    return 2 * x
  assert checks.check_dynamic(lambda x: linear(grad(x)), X) is None
  assert checks.check_dynamic(mlp, X) is None  # gelu, relu-like custom_jvp functions are fine
  # Every differentiation entry point is caught: the check hooks JAX's autodiff interpreter,
  # not a list of public names (jacfwd and linear_transpose escaped the old list).
  energy = lambda z: jnp.sum(jnp.tanh(linear(z)) ** 2)
  for name, fn in (
      ("jacfwd", lambda x: linear(x + 1e-3 * jax.jacfwd(energy)(x))),
      ("linear_transpose", lambda x: linear(jax.linear_transpose(lambda z: 2 * z, x)(x)[0])),
      ("jacrev", lambda x: linear(x + 1e-3 * jax.jacrev(energy)(x))),
      ("hessian", lambda x: linear(x) + jnp.sum(jax.hessian(lambda z: energy(z[None]))(x[0]))),
      ("linearize", lambda x: jax.linearize(linear, x)[1](x)),
      ("jvp", lambda x: jax.jvp(linear, (x,), (x,))[1])):
    msg = checks.check_dynamic(fn, X)
    assert msg and "differentiates" in msg, (name, msg)
    if name in ("linearize", "jvp"):  # public names it knows are named
      assert f"({name})" in msg, msg


def _flat_target_model(x):
  """Class 0 on top (10), class 1 (5 + tiny slope) runner-up, classes 2..9 constant: the DLR
  loss has a non-zero gradient (class 1 moves) but APGD-T's targeted DLR towards the second
  runner-up (class 2) and beyond involves only constant logits: an all-zero gradient."""
  flat = x.reshape(x.shape[0], -1)
  moving = 5.0 + 0.01 * flat @ W[:, 0]
  const = jnp.broadcast_to(jnp.array([10.0, 3.0, 2.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]),
                           (x.shape[0], 9))
  return jnp.concatenate([const[:, :1], moving[:, None], const[:, 1:]], axis=1)


def test_zero_gradients_of_the_targeted_dlr_at_apgd_t_start():
  y = np.zeros(32, np.int32)
  assert checks.check_zero_gradients(_flat_target_model, X, y, KEY, eps=8 / 255) is None
  msg = checks.check_zero_gradients(_flat_target_model, X, y, KEY, eps=8 / 255, num_targets=9)
  assert msg and msg.startswith("32 of 32 points")
  masks = checks.zero_gradient_masks(_flat_target_model, num_targets=9)(
      X, y, KEY, np.float32(8 / 255), jnp.arange(32), KEY)
  assert masks.shape == (10, 32)
  # Row 0: untargeted DLR; row 1: the runner-up (class 1) moves; ranks >= 1 target constant
  # classes and every logit their loss reads (the top, the target, the 3rd and 4th) is constant.
  np.testing.assert_array_equal(np.asarray(masks).all(1), [False, False] + [True] * 8)


def test_zero_gradients_on_every_batch_of_an_evaluation():
  """The evaluation's check reads every batch: a model flat only on the second batch's images
  (bright ones) is caught, with the count of such points."""
  import types
  from adv_soups.evaluation import run
  dark = np.asarray(X) * 0.4
  bright = 0.6 + np.asarray(X) * 0.4
  logits_fn = lambda params, x, domain: jnp.where(
      (x.reshape(x.shape[0], -1).mean(1) > 0.5)[:, None], quantised(x), linear(x))
  first = dict(image=dark, label=np.asarray(jnp.argmax(linear(dark), -1)),
               mask=np.ones(32, bool))
  second = dict(image=bright, label=np.asarray(jnp.argmax(quantised(bright), -1)),
                mask=np.arange(32) < 20)
  request = types.SimpleNamespace(
      attacks=("apgd-ce", "apgd-t"), norm="linf", eps=8 / 255, seed=0, dataset="d", split="s",
      num_examples=None, loaded=types.SimpleNamespace(params={}),
      batches=lambda *a, **k: iter([first, second]), offset=lambda *a, **k: 0)
  spec = types.SimpleNamespace(class_subset=None)
  msg = run._zero_gradients(request, spec, logits_fn, 0)
  assert msg and " of 52 points" in msg, msg  # 32 + 20 unmasked, all correctly classified
  # The first batch alone, keyed the same: the second batch adds exactly its 20 unmasked points
  # (a point of the linear part may also have a zero gradient in float32: jax 0.12.1 finds one).
  alone = types.SimpleNamespace(**dict(vars(request), batches=lambda *a, **k: iter([first])))
  first_msg = run._zero_gradients(alone, spec, logits_fn, 0)
  count = lambda m: int(m.split(" of ")[0]) if m else 0
  assert count(msg) - count(first_msg) == 20, (msg, first_msg)


def test_dynamic_silent_on_the_project_vit():
  from adv_soups.models import create_model, init_params
  from configs import digits
  config = digits.get_config().model
  config.update(depth=1, width=16, num_heads=2, mlp_dim=32)
  model = create_model(config)
  channels = 1  # the digits are grey
  # Only traced, so zero parameters of the right shapes do.
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                        jax.eval_shape(lambda: init_params(model, KEY, channels)))
  x = jnp.zeros((2, 8, 8, channels))
  fn = lambda z: model.apply({"params": params}, z, jnp.zeros((z.shape[0],), jnp.int32))
  assert checks.check_dynamic(fn, x) is None


def test_eps_grid():
  msg = checks.check_eps_grid([0.0, 0.1, 0.2], [0.9, 0.5, 0.6], tolerance=0.05)
  assert msg and "50.00% at eps=0.1 but 60.00% at eps=0.2" in msg
  # Unsorted grids are compared by eps, not by position.
  assert checks.check_eps_grid([0.2, 0.0, 0.1], [0.6, 0.9, 0.5], tolerance=0.05) == msg
  assert checks.check_eps_grid([0.0, 0.1, 0.2], [0.9, 0.5, 0.54], tolerance=0.05) is None
  assert checks.check_eps_grid([0.0, 0.1, 0.2], [0.9, 0.5, 0.4]) is None
  assert checks.check_eps_grid([0.1, 0.1], [0.5, 0.6]) is None  # same eps: not a rise
  with pytest.raises(ValueError, match="same length"):
    checks.check_eps_grid([0.1, 0.2], [0.5])
