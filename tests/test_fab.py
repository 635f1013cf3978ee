"""Tests of FAB-T (adv_soups.attacks.fab): the projection, closed-form distances on linear models,
within_eps, box, compilation, batch / sharding independence, strength on a trained MLP, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from adv_soups import parallel
from adv_soups.attacks import apgd as apgd_lib
from adv_soups.attacks import compaction
from adv_soups.attacks import fab
from adv_soups.attacks import losses
from conftest import jaxpr_eqns

KEY = jax.random.PRNGKey(0)
SHAPE = (4, 4, 3)
DIM = int(np.prod(SHAPE))
NORMS = ("linf", "l2")
ETA = fab.ETA


def _dual_norm(v, norm):
  """The norm whose ratio |f_y - f_t| / ||w_y - w_t|| is the distance in `norm` (l_1 for l_inf)."""
  return np.sum(np.abs(v)) if norm == "linf" else np.sqrt(np.sum(v * v))


def _linear(w, b):
  w, b = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
  return lambda x: x.reshape(x.shape[0], -1) @ w + b


@functools.lru_cache(maxsize=None)
def _attack(logits_fn, num_steps, norm, restarts=1, compact=False):
  """A jitted fab_t_single(x, y, rank, eps) shared by the tests (one compilation per setting).
  Without compaction by default: these tests measure FAB's minimisation, which compaction stops
  once a point is within eps."""
  return jax.jit(lambda x, y, rank, eps: fab.fab_t_single(
      logits_fn, x, y, KEY, rank, eps=eps, num_steps=num_steps, norm=norm, restarts=restarts,
      compact=compact))


# ---------------------------------------------------------------------------------------------
# The projection onto hyperplane and box
# ---------------------------------------------------------------------------------------------
def _bisection_projection(t, w, b, norm):
  """Independent reference: the optimal d is clip(-lam * s_i, -t_i, 1 - t_i) with s = sign(w')
  (l_inf) or w' (l_2), w' = w oriented so that w' . t >= b'; bisect lam on the hyperplane."""
  sign = 1.0 if w @ t - b >= 0 else -1.0
  w, c = w * sign, abs(w @ t - b)
  s = np.sign(w) if norm == "linf" else w
  d_of = lambda lam: np.clip(-lam * s, -t, 1 - t)
  if -(w @ d_of(1e9)) < c:  # unreachable: every coordinate to its box edge
    return d_of(1e9)
  lo, hi = 0.0, 1e9
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if -(w @ d_of(mid)) < c else (lo, mid)
  return d_of(hi)


@pytest.mark.parametrize("norm", NORMS)
def test_projection_matches_bisection(norm):
  rs = np.random.RandomState(1)
  n, rows = 30, 64
  t = rs.uniform(0, 1, (rows, n))
  t[rs.rand(rows, n) < 0.2] = 0.0
  t[rs.rand(rows, n) < 0.2] = 1.0
  w = rs.randn(rows, n) * (rs.rand(rows, n) < 0.8)  # some w_i = 0
  offset = rs.randn(rows) * rs.choice([0.01, 0.3, 2.0, 30.0], rows)  # incl. unreachable ones
  b = np.sum(w * t, -1) + offset
  d = np.asarray(fab.boundary_projection(*(jnp.asarray(a, jnp.float32) for a in (t, w, b)), norm))
  ref = np.stack([_bisection_projection(t[i], w[i], b[i], norm) for i in range(rows)])
  np.testing.assert_allclose(d, ref, atol=2e-6)
  assert np.all(t + d >= -1e-7) and np.all(t + d <= 1 + 1e-7)
  reach = np.abs(np.sum(w * (t + ref), -1) - b) < 1e-6
  assert 0 < reach.sum() < rows  # both cases occur
  np.testing.assert_allclose(np.sum(w * (t + d), -1)[reach], b[reach], atol=1e-4)
  assert np.all(d[w == 0] == 0)


# ---------------------------------------------------------------------------------------------
# Known answers on linear models (the box [0, 1] does not bind: x in [0.35, 0.65])
# ---------------------------------------------------------------------------------------------
RS = np.random.RandomState(0)
W2 = RS.randn(DIM, 2)
LIN2 = _linear(W2, [0.0, 0.0])
X2 = RS.uniform(0.35, 0.65, (6,) + SHAPE).astype(np.float32)


def _closed_form_2class(x, norm):
  logits = np.asarray(LIN2(jnp.asarray(x)))
  return np.abs(logits[:, 1] - logits[:, 0]) / _dual_norm(W2[:, 1] - W2[:, 0], norm)


@pytest.mark.parametrize("norm", NORMS)
def test_linear_two_classes_closed_form(norm):
  y = np.argmax(np.asarray(LIN2(jnp.asarray(X2))), -1)
  star = _closed_form_2class(X2, norm)
  assert star.max() < 0.3  # the box does not bind: every coordinate moves by <= star < 0.35
  # One step from the clean image lands at the boundary point, overshot by eta exactly.
  _, found, dist = _attack(LIN2, 1, norm)(X2, y, 0, 0.1)
  assert np.all(found)
  np.testing.assert_allclose(dist, ETA * star, rtol=1e-4)
  # 10 steps: within 2% above the minimum (and never below it).
  x_adv, found, dist = _attack(LIN2, 10, norm)(X2, y, 0, 0.1)
  dist = np.asarray(dist)
  # The closest point so far is kept: 10 steps (the same first 2 iterates) never do worse than 2.
  assert np.all(dist <= np.asarray(_attack(LIN2, 2, norm)(X2, y, 0, 0.1)[2]))
  assert np.all(found) and np.all(dist >= star * (1 - 1e-5)) and np.all(dist <= 1.02 * star), (
      dist / star)
  np.testing.assert_allclose(fab.distance(x_adv, X2, norm), dist, rtol=1e-6)
  assert np.all(np.argmax(LIN2(x_adv), -1) != y)


@pytest.mark.parametrize("norm", NORMS)
def test_step_formula(norm):
  """One biased step (fab_step) on a hyperplane far from the box edges, against its closed form:
  alpha capped at alpha_max in row 0 (x1 as far from the hyperplane as x0), not in row 1."""
  rs = np.random.RandomState(5)
  w = rs.randn(DIM)
  x0 = 0.5 + rs.uniform(-0.01, 0.01, (2, DIM))
  b = x0 @ w - 0.4 * _dual_norm(w, norm) * np.array([0.1, 0.1])  # x0 at distance 0.04
  step = -(np.sign(w) if norm == "linf" else w / np.sqrt(np.sum(w * w)))  # unit, towards it
  x1 = x0 + step * np.array([[-0.04], [0.036]])  # distance 0.08 (behind x0) and 0.004
  dual = _dual_norm(w, norm)
  dist_1 = (x1 @ w - b) / dual
  dist_0 = (x0 @ w - b) / dual
  np.testing.assert_allclose(dist_0, [0.04, 0.04])
  np.testing.assert_allclose(dist_1, [0.08, 0.004])
  alpha = np.minimum(dist_1 / (dist_1 + dist_0), 0.1)[:, None]
  assert alpha[0] == 0.1 and alpha[1] < 0.1
  want = ((1 - alpha) * (x1 + ETA * dist_1[:, None] * step)
          + alpha * (x0 + ETA * dist_0[:, None] * step))
  got = fab.fab_step(*(jnp.asarray(a, jnp.float32) for a in (x1, x0, np.stack([w, w]), b)),
                     norm, alpha_max=0.1, eta=ETA)
  np.testing.assert_allclose(got, want, atol=2e-6)


def _four_class_model(norm):
  """4 classes around the centre 0.5: class 0 (the label, logit 1), class 1 the runner-up
  (logit 0.5) but far (||v_1|| = 5), class 2 second runner-up (logit 0) but near (||v_2|| = 40),
  class 3 out of reach (logit -100). So rank 1 must target class 2."""
  rs = np.random.RandomState(2)
  v = rs.randn(DIM, 4)
  v[:, 0] = 0
  v[:, 1] *= 5 / _dual_norm(v[:, 1], norm)
  v[:, 2] *= 40 / _dual_norm(v[:, 2], norm)
  v[:, 3] = 0
  c = np.array([1.0, 0.5, 0.0, -100.0])
  return _linear(v, c - 0.5 * v.sum(0)), v


@pytest.mark.parametrize("norm", NORMS)
def test_linear_multiclass_known_target(norm):
  model, v = _four_class_model(norm)
  x = (0.5 + np.random.RandomState(3).uniform(-0.002, 0.002, (4,) + SHAPE)).astype(np.float32)
  logits = np.asarray(model(jnp.asarray(x)))
  assert np.all(np.argsort(-logits, -1)[:, :3] == [0, 1, 2])
  y = np.zeros(4, np.int32)
  star = (logits[:, 0] - logits[:, 2]) / _dual_norm(v[:, 0] - v[:, 2], norm)
  far = (logits[:, 0] - logits[:, 1]) / _dual_norm(v[:, 0] - v[:, 1], norm)
  assert np.all(far > 3 * star)
  x_adv, found, dist = _attack(model, 10, norm)(x, y, 1, 0.1)
  assert np.all(found) and np.all(np.asarray(dist) >= star * (1 - 1e-5))
  assert np.all(np.asarray(dist) <= 1.02 * star), np.asarray(dist) / star
  assert np.all(np.argmax(model(x_adv), -1) == 2)


def test_box_binds_and_outputs_stay_in_box():
  """Label 0, target 1, F = f_0 - f_1 = w . x + c. The coordinates that should decrease (w_i > 0)
  sit at 0 and a third of the others at 0.995 (room 0.005 to their edge at 1), so the box binds:
  the minimal distance is that of the box-constrained projection (by bisection, as above)."""
  w = W2[:, 0] - W2[:, 1]
  rs = np.random.RandomState(4)
  x = rs.uniform(0.35, 0.65, (6, DIM))
  x[:, w > 0] = 0.0
  x[(w < 0) & (rs.rand(6, DIM) < 0.33)] = 0.995
  c = 0.1 - np.min(x @ w)  # F in [0.1, ~1.5]: label 0 everywhere
  model = _linear(np.stack([w, np.zeros(DIM)], 1), [c, 0.0])
  y = np.zeros(6, np.int32)
  for norm in NORMS:
    d = np.stack([_bisection_projection(x[i], w, -c, norm) for i in range(6)])
    assert np.allclose((x + d) @ w + c, 0, atol=1e-6)  # the boundary is reachable in the box
    assert np.any(x + d == 1.0)  # some coordinates stop at the box edge
    star = np.max(np.abs(d), -1) if norm == "linf" else np.sqrt(np.sum(d * d, -1))
    x_adv, found, dist = _attack(model, 10, norm)(x.reshape((6,) + SHAPE).astype(np.float32), y,
                                                  0, 0.1)
    x_adv = np.asarray(x_adv).reshape(6, DIM)
    assert x_adv.dtype == np.float32
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.all(x_adv[x == 0] == 0)
    assert np.all(found) and np.all(np.argmax(model(x_adv), -1) == 1)
    np.testing.assert_array_less(star * (1 - 1e-5), dist)
    np.testing.assert_array_less(dist, 1.02 * star)


def test_unreachable_and_already_misclassified():
  """No point of the box changes the prediction: the clean image comes back, found False; a
  misclassified clean image comes back as is, at distance 0."""
  model = _linear(W2 * 0.01, [100.0, 0.0])  # class 0 everywhere in [0, 1]^n
  y = np.array([0, 0, 1, 0], np.int32)  # example 2 is misclassified
  x = X2[:4]
  x_adv, found, dist = _attack(model, 5, "linf")(x, y, 0, 0.1)
  np.testing.assert_array_equal(found, [False, False, True, False])
  np.testing.assert_array_equal(dist, [np.inf, np.inf, 0.0, np.inf])
  np.testing.assert_array_equal(x_adv, x)


# ---------------------------------------------------------------------------------------------
# within_eps and fab_t
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
def test_within_eps(norm):
  x = jnp.full((3,) + SHAPE, 0.5)
  u = np.zeros((3,) + SHAPE, np.float32)
  u[:, 0, 0, 0] = 1.0  # unit in both norms
  eps = 0.125  # exact in float32
  x_adv = x + jnp.asarray(u) * jnp.array([eps, eps * (1 + 1e-4), eps * 0.5])[:, None, None, None]
  np.testing.assert_array_equal(fab.within_eps(x_adv, x, eps, norm), [True, False, True])
  # A FAB point at distance ~star is robust at eps < star and broken at eps > star.
  y = np.argmax(np.asarray(LIN2(jnp.asarray(X2))), -1)
  star = _closed_form_2class(X2, norm)
  x_adv, _, _ = _attack(LIN2, 10, norm)(X2, y, 0, 0.1)
  assert not np.any(fab.within_eps(x_adv, X2, 0.9 * star.min(), norm))
  assert np.all(fab.within_eps(x_adv, X2, 1.05 * star.max(), norm))


def test_fab_t_keeps_first_point_within_eps():
  """On the 4-class model: rank 0 (class 1) and rank 1 (class 2, nearer) in turn."""
  norm = "linf"
  model, _ = _four_class_model(norm)
  x = (0.5 + np.random.RandomState(3).uniform(-0.002, 0.002, (4,) + SHAPE)).astype(np.float32)
  y = np.zeros(4, np.int32)
  run = _attack(model, 10, norm)
  (x0, _, d0), (x1, _, d1) = run(x, y, 0, 0.1), run(x, y, 1, 0.1)
  d0, d1 = np.asarray(d0), np.asarray(d1)
  assert np.all(d1 < d0)
  fab_t = jax.jit(lambda eps: fab.fab_t(model, x, y, KEY, eps=eps, num_steps=10, norm=norm,
                                        num_targets=3, compact=False))
  np.testing.assert_array_equal(fab_t(float(d0.max()) * 1.01), x0)  # the first target's point
  np.testing.assert_array_equal(fab_t(float(d1.max() + d0.min()) / 2), x1)  # only rank 1 within
  np.testing.assert_array_equal(fab_t(0.5 * float(d1.min())), x1)  # none: the closest one


# ---------------------------------------------------------------------------------------------
# Compilation, batch composition, sharding, parameters
# ---------------------------------------------------------------------------------------------
def _mlp_init(seed, d_in, hidden, classes, scale=1.0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return dict(w1=scale * jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
              b1=jnp.zeros(hidden),
              w2=jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
              b2=jnp.zeros(classes))


def _mlp(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


RAND_PARAMS = _mlp_init(1, DIM, 37, 10, scale=10.0)  # tanh saturates: clearly nonlinear
rand_mlp = functools.partial(_mlp, RAND_PARAMS)


def test_compiles_once_and_types():
  traces = []

  def counted(x):
    traces.append(1)
    return rand_mlp(x)
  fn = jax.jit(lambda x, y, rank, eps: fab.fab_t_single(counted, x, y, KEY, rank, eps=eps,
                                                        num_steps=3, restarts=2))
  x = jax.random.uniform(KEY, (4,) + SHAPE)
  x_adv, found, dist = fn(x, jnp.arange(4), 0, 0.1)
  n = len(traces)
  assert n > 0
  assert x_adv.shape == x.shape and x_adv.dtype == jnp.float32
  assert found.shape == (4,) and found.dtype == jnp.bool_ and dist.dtype == jnp.float32
  fn(x * 0.5, jnp.arange(4) + 1, 3, 0.05)
  assert len(traces) == n


def test_per_example_independent_of_batch_and_sharding():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  x = jax.random.uniform(jax.random.PRNGKey(5), (16,) + SHAPE, minval=0.2, maxval=0.8)
  y = jnp.argmax(rand_mlp(x), -1)
  kw = dict(eps=0.3, num_steps=10, norm="linf")
  single = jax.jit(lambda x, y, i, r, c=True: fab.fab_t_single(
      rand_mlp, x, y, KEY, 1, restarts=r, example_index=i, compact=c, **kw)[2],
                   static_argnums=(3, 4))
  full = np.asarray(single(x, y, jnp.arange(16), 3))
  assert np.all(np.isfinite(full))
  # The random restarts matter here (else the comparison below would prove little); without
  # compaction, which stops the points already within eps.
  assert np.any(np.asarray(single(x, y, jnp.arange(16), 3, False))
                < np.asarray(single(x, y, jnp.arange(16), 1, False)))
  for i in (0, 7, 13):
    alone = single(x[i:i + 1], y[i:i + 1], jnp.array([i]), 3)
    np.testing.assert_allclose(alone, full[i:i + 1], rtol=1e-5)
  sharded = jax.jit(jax.shard_map(
      lambda x, y, i: fab.fab_t_single(rand_mlp, x, y, KEY, 1, restarts=3, example_index=i,
                                       **kw)[2],
      mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"), check_vma=False))
  sh = parallel.batch_sharding(mesh)
  args = [jax.device_put(a, sh) for a in (x, y, jnp.arange(16))]
  compiled = sharded.lower(*args).compile()
  assert not [c for c in ("all-reduce", "all-gather", "collective-permute", "all-to-all")
              if c in compiled.as_text()]
  np.testing.assert_allclose(compiled(*args), full, rtol=1e-5)


def test_compaction_same_broken_flags():
  """FAB-T with compaction (rows within eps stop; the rest regrouped every 2 iterations) breaks
  the same rows as without it, for two target ranks; eps is set so that a quarter of the rows
  are never broken and at least a micro-batch of rows is within eps before the last regrouping
  (so a micro-batch is skipped)."""
  x = jax.random.uniform(jax.random.PRNGKey(7), (32,) + SHAPE, minval=0.2, maxval=0.8)
  y = jnp.argmax(rand_mlp(x), -1)
  run = jax.jit(lambda x, y, rank, eps, steps, compact: fab.fab_t_single(
      rand_mlp, x, y, KEY, rank, eps=eps, num_steps=steps, compact=compact, compact_every=2),
                static_argnums=(4, 5))

  def broken(out, eps):
    x_adv = out[0]
    return np.asarray((jnp.argmax(rand_mlp(x_adv), -1) != y) & fab.within_eps(x_adv, x, eps,
                                                                                "linf"))
  for rank in (0, 3):
    final = np.asarray(run(x, y, rank, 0.1, 20, False)[2])
    eps = float(np.quantile(final, 0.75))
    early = np.asarray(run(x, y, rank, eps, 18, False)[2])
    assert np.sum(early <= eps) >= compaction.micro_batch(32)
    plain = broken(run(x, y, rank, eps, 20, False), eps)
    assert plain.any() and not plain.all()
    np.testing.assert_array_equal(plain, broken(run(x, y, rank, eps, 20, True), eps))


def test_no_parameter_gradients():
  """Only input gradients: no dot_general yields a weight-shaped (cotangent) array."""
  shapes = {(DIM, 37), (37, 10), (37, DIM), (10, 37)}
  weight_dots = lambda fn, *a: [e for e in jaxpr_eqns(jax.make_jaxpr(fn)(*a))
                                if e.primitive.name == "dot_general"
                                and tuple(e.outvars[0].aval.shape) in shapes]
  x, y = jax.random.uniform(KEY, (4,) + SHAPE), jnp.arange(4)
  grad_params = lambda p, x, y: jax.grad(lambda p: losses.ce_loss(_mlp(p, x), y).sum())(p)
  assert weight_dots(grad_params, RAND_PARAMS, x, y)  # the detector works
  attack = lambda p, x, y: fab.fab_t(functools.partial(_mlp, p), x, y, KEY, eps=0.1,
                                     num_steps=2, num_targets=2, restarts=2)
  assert not weight_dots(attack, RAND_PARAMS, x, y)


# ---------------------------------------------------------------------------------------------
# Strength on a trained nonlinear model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_mlp():
  """A tanh MLP (64-32-10) trained for 200 full-batch Adam steps on sklearn's digits."""
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  params = _mlp_init(0, 64, 32, 10)
  opt = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda p: losses.ce_loss(_mlp(p, x[:1000]), y[:1000]).mean())(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=200)
    return p
  fn = functools.partial(_mlp, train(params))
  x_te, y_te = jnp.asarray(x[1000:1032]), jnp.asarray(y[1000:1032])
  keep = np.asarray(jnp.argmax(fn(x_te), -1) == y_te)
  assert keep.mean() > 0.9
  return fn, x_te[keep], y_te[keep]


def test_strength_vs_apgd_bisection(digits_mlp):
  """FAB-T (9 targets, 100 steps) finds l_inf distances no larger than a bisection along the
  APGD-CE (eps 0.3) perturbation of each example (measured: ratio <= 0.95, median ~0.82)."""
  fn, x, y = digits_mlp
  dists = jax.jit(lambda x, y: jax.vmap(lambda r: fab.fab_t_single(
      fn, x, y, KEY, r, eps=0.3, num_steps=100, compact=False)[2])(jnp.arange(9)))(x, y)
  d_fab = np.asarray(dists).min(0)
  x_pgd = jax.jit(lambda x, y: apgd_lib.apgd(fn, x, y, KEY, eps=0.3, num_steps=50))(x, y)
  lo, hi = jnp.zeros(len(y)), jnp.ones(len(y))
  for _ in range(25):
    mid = 0.5 * (lo + hi)
    wrong = jnp.argmax(fn(x + mid[:, None, None, None] * (x_pgd - x)), -1) != y
    lo, hi = jnp.where(wrong, lo, mid), jnp.where(wrong, mid, hi)
  broken = np.asarray(jnp.argmax(fn(x_pgd), -1) != y)
  assert broken.mean() > 0.9
  d_pgd = np.asarray(hi * fab.distance(x_pgd, x, "linf"))[broken]
  ratio = d_fab[broken] / d_pgd
  assert np.all(ratio <= 1.02), ratio
  assert np.median(ratio) <= 0.92, ratio


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="l0"), "'l0'"),  # FAB-T has an l1 form
    (dict(num_steps=0), "num_steps=0"),
    (dict(eps=-0.1), "eps=-0.1"),
    (dict(eps=1.5), "eps=1.5"),
    (dict(restarts=0), "restarts=0"),
    (dict(alpha_max=2.0), "alpha_max=2.0"),
    (dict(eta=0.0), "eta=0.0"),
    (dict(beta=0.0), "beta=0.0"),
    (dict(rank=9), "rank=9"),
    (dict(num_targets=0), "num_targets=0"),
])
def test_bad_arguments(kwargs, match):
  x, y = jnp.full((2,) + SHAPE, 0.5), jnp.array([0, 1])
  args = dict(eps=0.1, num_steps=3)
  args.update(kwargs)
  if "num_targets" in kwargs:
    call = lambda: fab.fab_t(rand_mlp, x, y, KEY, **args)
  else:
    rank = args.pop("rank", 0)
    call = lambda: fab.fab_t_single(rand_mlp, x, y, KEY, rank, **args)
  with pytest.raises(ValueError, match=match) as err:
    call()
  assert "\n" not in str(err.value)


def test_bad_classes_and_within_eps_norm():
  x, y = jnp.full((2,) + SHAPE, 0.5), jnp.array([0, 1])
  with pytest.raises(ValueError, match="num_classes=1"):
    fab.fab_t(lambda z: rand_mlp(z)[:, :1], x, y, KEY, eps=0.1)
  with pytest.raises(ValueError, match="'l0'"):
    fab.within_eps(x, x, 0.1, "l0")
