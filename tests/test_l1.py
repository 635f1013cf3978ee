"""The l_1 threat model: exact projection, l_1-APGD, FAB-T's and Square's l_1 forms, the l_1
suite in the runner, and the refusals (PGD has no l_1 form; training stays l_inf / l_2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups.attacks import apgd, fab, l1, registry, runner, square


# ---------------------------------------------------------------------------------------------
# Reference solvers (slow and simple, float64)
# ---------------------------------------------------------------------------------------------
def exact_projection(u, x, eps):
  """argmin_d |d - u|_2 s.t. |d|_1 <= eps, 0 <= x + d <= 1, by bisection on the KKT threshold
  lam (d_i = sign(u_i) min(max(|u_i| - lam, 0), room_i); sum |d_i| is monotone in lam)."""
  a, room = np.abs(u), np.where(u >= 0, 1 - x, x)
  total = lambda lam: np.minimum(np.maximum(a - lam, 0), room).sum()
  lam = 0.0
  if total(0.0) > eps:
    lo, hi = 0.0, float(a.max())
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if total(mid) > eps else (lo, mid)
    lam = hi
  return np.sign(u) * np.minimum(np.maximum(a - lam, 0), room)


def min_l1_distance(x, w, need):
  """The smallest l_1 perturbation of x in [0, 1]^n that raises w . x by `need` (> 0): a
  fractional knapsack, cheapest (largest |w_i|) coordinates first, each up to its box room."""
  total = 0.0
  for i in np.argsort(-np.abs(w)):
    gain = abs(w[i]) * ((1 - x[i]) if w[i] > 0 else x[i])
    if gain >= need:
      return total + need / abs(w[i])
    total += gain / abs(w[i])
    need -= gain
  return np.inf


def linear_model(w, b):
  """Two classes; logit of class 1 minus class 0 = w . x + b per example (label 0). Also
  `.rows(images, b)` with the per-example bias as a row argument, for the attacks that compact
  their rows inside a stage (FAB-T, Square: per-row inputs never sit in the closure)."""
  w, b = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)

  def rows(images, bias):
    z = images.reshape(images.shape[0], -1) @ w + bias
    return jnp.stack([jnp.zeros_like(z), z], axis=-1)

  def logits_fn(images):
    return rows(images, b)
  logits_fn.rows, logits_fn.bias = rows, b
  return logits_fn


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------
def test_projection_equals_an_exact_solver():
  rng = np.random.default_rng(0)
  b, n = 48, 30
  x = rng.uniform(size=(b, n))
  x[:12] = rng.integers(0, 2, size=(12, n))  # at the box's corners
  u = rng.normal(size=(b, n)) * rng.choice([1e-3, 0.1, 1.0], size=(b, 1))
  u[:6] = np.where(x[:6] > 0.5, 1.0, -1.0) * np.abs(u[:6])  # corners, pushed outwards
  eps = rng.uniform(0.0, 4.0, size=b)
  eps[12:18] = 0.0
  eps[18:24] = 100.0  # points already inside the ball (only the box acts)
  d = np.asarray(l1.project_delta(jnp.asarray(u, jnp.float32), jnp.asarray(x, jnp.float32),
                                  jnp.asarray(eps, jnp.float32)))
  want = np.stack([exact_projection(u[i], x[i], eps[i]) for i in range(b)])
  np.testing.assert_allclose(d, want, atol=2e-5)
  assert np.all(np.abs(d).sum(1) <= eps * (1 + 1e-6) + 1e-7)
  assert np.all((x + d >= -1e-7) & (x + d <= 1 + 1e-7))
  inside = rng.uniform(size=(4, n)) * 1e-3  # small and inside the box: unchanged
  kept = l1.project_delta(jnp.asarray(inside, jnp.float32), jnp.full((4, n), 0.5), 1.0)
  np.testing.assert_allclose(np.asarray(kept), inside, rtol=1e-6)


def test_fab_l1_boundary_projection_equals_a_linear_program():
  linprog = pytest.importorskip("scipy.optimize").linprog
  rng = np.random.default_rng(1)
  n = 12
  for _ in range(5):
    t, w = rng.uniform(size=n), rng.normal(size=n)
    b = w @ t + rng.choice([-1, 1]) * rng.uniform(0.2, 1.0)
    d = np.asarray(l1.boundary_projection(jnp.asarray(t[None], jnp.float32),
                                          jnp.asarray(w[None], jnp.float32),
                                          jnp.asarray([b], jnp.float32)))[0]
    # min sum(p + m) s.t. w . (t + p - m) = b, 0 <= p <= 1 - t, 0 <= m <= t
    res = linprog(np.ones(2 * n), A_eq=np.concatenate([w, -w])[None], b_eq=[b - w @ t],
                  bounds=[(0, 1 - ti) for ti in t] + [(0, ti) for ti in t])
    assert res.status == 0
    assert abs(np.abs(d).sum() - res.fun) < 1e-4
    assert abs(w @ (t + d) - b) < 1e-4


# ---------------------------------------------------------------------------------------------
# Attacks on a linear model with a known optimum
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear_problem():
  """16 examples of a 4x4 one-channel linear model whose minimal l_1 adversarial distance needs
  ~1.5 units of its strongest coordinate: the box binds (no coordinate alone suffices)."""
  rng = np.random.default_rng(0)
  n, m = 16, 16
  w = rng.normal(size=n).astype(np.float32)
  x = rng.uniform(0.2, 0.8, size=(m, n)).astype(np.float32)
  need = 1.5 * np.abs(w).max()
  b = (-(x @ w) - need).astype(np.float32)
  dist = np.array([min_l1_distance(x[i], w, need) for i in range(m)])
  assert np.all(dist > 1.0)  # more than one coordinate's whole room: the box matters
  return linear_model(w, b), x.reshape(m, 4, 4, 1), np.zeros(m, np.int32), dist


def _broken(logits_fn, x_adv):
  return np.asarray(jnp.argmax(logits_fn(x_adv), -1) != 0)


def _l1_dist(x_adv, x):
  return np.abs(np.asarray(x_adv).reshape(len(x), -1) - np.reshape(x, (len(x), -1))).sum(1)


APGD_TOLERANCE = 1.10  # l_1-APGD breaks every example at 1.10 x the minimal distance


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine
def test_apgd_l1_reaches_the_minimal_l1_distance_of_a_linear_model(linear_problem):
  logits_fn, x, y, dist = linear_problem
  run = jax.jit(lambda eps: apgd.apgd(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps,
                                      num_steps=60, norm="l1", largereps=True))
  above = run(jnp.asarray(dist * APGD_TOLERANCE, jnp.float32))
  assert _broken(logits_fn, above).all()
  assert np.all(_l1_dist(above, x) <= dist * APGD_TOLERANCE * (1 + 1e-5))
  below = run(jnp.asarray(dist * 0.98, jnp.float32))  # impossible: nothing may break
  assert not _broken(logits_fn, below).any()


def test_fab_t_l1_reaches_the_minimal_l1_distance(linear_problem):
  logits_fn, x, y, dist = linear_problem
  _, found, got = fab.fab_t_single(logits_fn.rows, x, y, jax.random.PRNGKey(0), 0, eps=1.0,
                                   num_steps=30, norm="l1", row_args=(logits_fn.bias,))
  assert np.asarray(found).all()
  ratio = np.asarray(got) / dist
  assert np.all(ratio >= 1 - 1e-4) and np.all(ratio <= 1.01), ratio


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine
def test_square_l1_reaches_the_optimum_of_a_uniform_linear_model():
  """w = 1 everywhere: any perturbation that adds mass is optimal, the minimal l_1 distance is the
  margin (1 here). Square's l_1 form breaks every example at 1.5 x that, none below it."""
  rng = np.random.default_rng(2)
  m, n = 8, 64
  x = rng.uniform(0.3, 0.7, size=(m, n)).astype(np.float32)
  w = np.ones(n, np.float32)
  logits_fn = linear_model(w, -(x @ w) - 1.0)
  images, y = x.reshape(m, 8, 8, 1), np.zeros(m, np.int32)
  run = jax.jit(lambda eps: square.square(logits_fn.rows, images, y, jax.random.PRNGKey(0),
                                          eps=eps, num_queries=1000, norm="l1",
                                          row_args=(logits_fn.bias,)))
  above = run(jnp.float32(1.5))
  assert _broken(logits_fn, above).all()
  assert np.all(_l1_dist(above, x) <= 1.5 * (1 + 1e-5))
  assert not _broken(logits_fn, run(jnp.float32(0.95))).any()


# ---------------------------------------------------------------------------------------------
# The suite through the runner
# ---------------------------------------------------------------------------------------------
def test_l1_suite_settings_and_name():
  ce, t = registry.get("apgd-ce"), registry.get("apgd-t")
  assert ce.settings_for("l1") == dict(restarts=5, loss="ce", largereps=True)
  assert t.settings_for("l1") == dict(restarts=1, loss="dlr-targeted", targets=5, largereps=True)
  assert not ce.settings_for("linf").get("largereps") and t.settings_for("linf")["targets"] == 9
  assert registry.get("fab-t").settings_for("l1")["targets"] == 9
  budgets = registry.resolve_steps(registry.STANDARD_AUTOATTACK, None, 10)
  text = registry.describe(registry.STANDARD_AUTOATTACK, budgets, "standard", "l1")
  assert text.startswith("AutoAttack, standard version (l1)")
  assert "APGD-CE: 5 restarts, eps schedule 3/2/1 eps" in text and "5 targets" in text
  budgets["apgd-ce"] = 50  # other budgets: not AutoAttack
  assert "AutoAttack, standard" not in registry.describe(registry.STANDARD_AUTOATTACK, budgets,
                                                         "standard", "l1")
  with pytest.raises(ValueError, match="'pgd' has no l1 form"):
    registry.check_norm(("pgd",), "l1")
  from adv_soups.attacks import pgd
  with pytest.raises(ValueError, match="unknown norm 'l1'"):  # no l_1 step in PGD
    pgd.pgd(lambda z: z.reshape(len(z), -1)[:, :2], jnp.zeros((2, 2, 2, 1)), jnp.zeros(2, int),
            jax.random.PRNGKey(0), eps=1.0, num_steps=1, norm="l1")
  with pytest.raises(ValueError, match="num_steps >= 3"):
    apgd.check_largereps("l1", 2, True)
  with pytest.raises(ValueError, match="l_1-APGD's"):
    apgd.check_largereps("linf", 100, True)


@pytest.mark.slow  # tens of seconds on a loaded 2-core machine
def test_runner_l1_suite_same_seed_same_numbers_when_rows_regroup(linear_problem):
  _, x, y, _ = linear_problem
  w = np.random.default_rng(0).normal(size=16).astype(np.float32)
  flat = x.reshape(len(x), -1)
  b = float(-np.mean(flat @ w) - 1.5 * np.abs(w).max())  # one offset: rows may regroup
  logits2 = linear_model(w, b)
  logits4 = lambda images: jnp.concatenate([logits2(images), jnp.full(
      (images.shape[0], 2), -5.0)], -1)  # 4 classes, for APGD-T's targeted DLR
  need = -(flat @ w + b)
  dist = np.array([min_l1_distance(flat[i], w, need[i]) if need[i] > 0 else 0.0
                   for i in range(len(x))])
  eps = float(np.median(dist))
  kwargs = dict(eps=eps, norm="l1", attacks="apgd-ce,apgd-t", num_steps=6,
                mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  one = runner.robust_accuracy(logits4, [dict(image=x, label=y)], batch_size=16, **kwargs)
  other = runner.robust_accuracy(logits4, [dict(image=x[:5], label=y[:5]),
                                           dict(image=x[5:], label=y[5:])], batch_size=8,
                                 **kwargs)
  assert one.attacks[0]["restarts"] == 5 and one.attacks[0]["largereps"]
  assert one.attacks[1]["targets"] == 3  # min(5, K - 1)
  np.testing.assert_array_equal(one.broken_by, other.broken_by)
  assert 0 < one.robust_accuracy < 1  # the median eps breaks some examples, not all
  with pytest.raises(ValueError, match="does not support norm 'l1'"):
    runner.robust_accuracy(logits4, [dict(image=x, label=y)], eps=1.0, norm="l1",
                           attacks="pgd", num_steps=2)
