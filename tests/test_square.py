"""Tests of the Square attack: known optima on linear models, gradient masking, invariants, purity,
compilation, per-example keys, the reference schedule and update shapes, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adv_soups import parallel

from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import square as sq
from conftest import jaxpr_eqns

KEY = jax.random.PRNGKey(0)
SHAPE = (8, 8, 1)
D = int(np.prod(SHAPE))


# ---------------------------------------------------------------------------------------------
# Two-class linear models with known optima
# ---------------------------------------------------------------------------------------------
def _binary_problem(norm, n=48, seed=0):
  """A two-class linear model z = (0, x . w + b) and points spread on both sides of its worst
  case: (logits_fn, x [n, 8, 8, 1], labels, eps, optimum [n] (the exact worst-case margin over
  the eps ball and [0, 1]), scale (eps ||w||_1 or eps ||w||_2))."""
  rs = np.random.RandomState(seed)
  w = rs.randn(D).astype(np.float64)
  b = -0.5 * w.sum()
  eps = 0.05 if norm == "linf" else 0.3
  scale = eps * (np.abs(w).sum() if norm == "linf" else np.linalg.norm(w))
  # Clean margins from 0.05 to 1.95 times the largest change the ball allows.
  target = np.linspace(0.05, 1.95, n) * scale
  x = rs.uniform(0.45, 0.55, (n, D))
  x = x + ((target - x @ w - b) / (w @ w))[:, None] * w[None]
  if norm == "linf":
    x = np.clip(x, 0.0, 1.0)
  assert x.min() >= 0 and x.max() <= 1
  x = x.astype(np.float32)
  margin = x.astype(np.float64) @ w + b
  if norm == "linf":  # separable: each coordinate moves to the better end of its interval
    lo, hi = np.maximum(-eps, -x), np.minimum(eps, 1 - x)
    optimum = margin + np.minimum(w * lo, w * hi).sum(axis=1)
  else:  # the ball stays inside [0, 1] at the optimum x - eps w / |w|
    assert (x - eps * w / np.linalg.norm(w)).min() > 0
    optimum = margin - scale
  w32, b32 = jnp.asarray(w, jnp.float32), jnp.float32(b)
  fn = lambda z: jnp.stack([jnp.zeros(z.shape[0]), z.reshape(z.shape[0], -1) @ w32 + b32], -1)
  return fn, x.reshape((n,) + SHAPE), np.ones(n, np.int32), eps, optimum, scale


def _margin(fn, x):
  z = np.asarray(fn(jnp.asarray(x)), np.float64)
  return z[:, 1] - z[:, 0]


@pytest.fixture(scope="module")
def binary_runs():
  """Square (1,000 queries) on the two-class problems of both norms; every point correct, plus
  two clean errors (label 0) appended."""
  out = {}
  for norm in ("linf", "l2"):
    fn, x, y, eps, optimum, scale = _binary_problem(norm)
    y = np.concatenate([y, [0, 0]]).astype(np.int32)
    x = np.concatenate([x, x[-2:]])
    run = jax.jit(functools.partial(sq.square_run, fn, eps=eps, num_queries=1000, norm=norm,
                                    rescale_schedule=norm == "linf"))
    x_adv, wrong, queries = run(x, y, KEY)
    out[norm] = dict(fn=fn, x=x, y=y, eps=eps, optimum=optimum, scale=scale,
                     x_adv=np.asarray(x_adv), wrong=np.asarray(wrong),
                     queries=np.asarray(queries))
  return out


def test_linf_reaches_the_vertex_optimum(binary_runs):
  r = binary_runs["linf"]
  n = len(r["optimum"])
  broken, adv_margin = r["wrong"][:n], _margin(r["fn"], r["x_adv"][:n])
  np.testing.assert_array_equal(broken, r["optimum"] < 0)
  robust = r["optimum"] > 0
  # Sound (never below the optimum) and, with the 1-pixel squares of the rescaled schedule,
  # at the optimum itself: min f_y - f_t - eps |w_y - w_t|_1 (with the [0, 1] box).
  assert np.all(adv_margin[robust] >= r["optimum"][robust] - 1e-4 * r["scale"])
  np.testing.assert_allclose(adv_margin[robust], r["optimum"][robust], atol=1e-3 * r["scale"])


def test_l2_breaks_every_point_breakable_at_half_eps(binary_runs):
  r = binary_runs["l2"]
  n = len(r["optimum"])
  broken, adv_margin = r["wrong"][:n], _margin(r["fn"], r["x_adv"][:n])
  ratio = 1 + r["optimum"] / r["scale"]  # clean margin / (eps |w|_2)
  assert not broken[ratio > 1].any()  # a robust point is never reported broken
  assert broken[ratio < 0.5].all()
  robust = ratio > 1
  assert np.all(adv_margin[robust] >= r["optimum"][robust] - 1e-4 * r["scale"])
  # On a pixel-wise random w (no spatial structure for the windows to exploit) 1,000 queries
  # get at least half-way to the optimum margin - eps |w|_2 (measured: 63-83%).
  gained = (r["optimum"][robust] + r["scale"] - adv_margin[robust]) / r["scale"]
  assert gained.min() > 0.5, gained.min()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_inside_ball_and_box_and_query_count(binary_runs, norm):
  r = binary_runs[norm]
  d = (r["x_adv"] - r["x"]).reshape(len(r["x"]), -1)
  size = np.abs(d).max(axis=1) if norm == "linf" else np.linalg.norm(d, axis=1)
  assert size.max() <= r["eps"] * (1 + 1e-6), size.max()
  assert r["x_adv"].min() >= 0 and r["x_adv"].max() <= 1
  # The two clean errors are returned unchanged, unattacked (no queries), and reported wrong.
  np.testing.assert_array_equal(r["x_adv"][-2:], r["x"][-2:])
  assert r["wrong"][-2:].all() and not r["queries"][-2:].any()
  # A point still robust spent the start and every iteration; a broken one stopped early.
  n = len(r["optimum"])
  assert np.all(r["queries"][:n][~r["wrong"][:n]] == 1001)
  assert np.all(r["queries"][:n][r["wrong"][:n]] <= 1001)
  assert r["queries"][:n][r["wrong"][:n]].min() < 1001


# ---------------------------------------------------------------------------------------------
# Gradient masking: a quantised input layer
# ---------------------------------------------------------------------------------------------
def test_breaks_a_quantised_model_pgd_cannot():
  """Inputs quantised to 1/16 (gradient zero almost everywhere), then a 10-class linear layer.
  With grid-aligned images and eps = 2/16 its worst case over the ball is the linear layer's:
  that of a vertex x +- eps."""
  rs = np.random.RandomState(1)
  w = rs.randn(D, 10).astype(np.float32)
  fn = lambda z: (jnp.round(z.reshape(z.shape[0], -1) * 16) / 16) @ w
  x = (rs.randint(2, 15, (96, D)) / 16).astype(np.float32)
  y = np.argmax(x @ w, axis=-1).astype(np.int32)
  eps = 2 / 16
  logits = x.astype(np.float64) @ w
  own = logits[np.arange(len(y)), y]
  spread = np.abs(w[:, y].T[:, None, :] - w.T[None]).sum(-1)  # |w_y - w_t|_1 [n, K]
  at_half_eps = np.where(np.arange(10) == y[:, None], np.inf,
                         own[:, None] - logits - eps / 2 * spread).min(1)
  breakable = at_half_eps < 0  # breakable even at eps / 2
  assert 0.3 < breakable.mean() < 0.95
  x = x.reshape((-1,) + SHAPE)
  x_sq = sq.square(fn, x, y, KEY, eps=eps, num_queries=400)
  x_pgd = pgd_lib.pgd(fn, x, y, KEY, eps=eps, num_steps=20)
  broken_sq = np.asarray(jnp.argmax(fn(x_sq), -1) != y)
  broken_pgd = np.asarray(jnp.argmax(fn(x_pgd), -1) != y)
  assert broken_sq[breakable].mean() >= 0.9, broken_sq[breakable].mean()
  assert broken_pgd[breakable].mean() <= 0.2, broken_pgd[breakable].mean()
  assert np.abs(np.asarray(x_sq) - x).max() <= eps + 1e-6


# ---------------------------------------------------------------------------------------------
# Purity, compilation, per-example keys, sharding
# ---------------------------------------------------------------------------------------------
@jax.custom_jvp
def _no_derivative(z):
  return z


@_no_derivative.defjvp
def _no_derivative_jvp(primals, tangents):
  raise AssertionError("differentiated")




@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_never_differentiates(norm):
  w = jax.random.normal(KEY, (16, 3))
  fn = lambda z: _no_derivative(z.reshape(z.shape[0], -1) @ w)
  x, y = jax.random.uniform(KEY, (2, 4, 4, 1)), jnp.array([0, 1])
  # The detector works: an attack that differentiates calls the jvp rule while tracing.
  with pytest.raises(AssertionError, match="differentiated"):
    jax.make_jaxpr(lambda x: pgd_lib.pgd(fn, x, y, KEY, eps=0.1, num_steps=2, norm=norm))(x)
  jaxpr = jax.make_jaxpr(lambda x: sq.square(fn, x, y, KEY, eps=0.1, num_queries=30,
                                             norm=norm))(x)
  names = {e.primitive.name for e in jaxpr_eqns(jaxpr.jaxpr)}
  assert "custom_jvp_call" in names  # the model stays an undifferentiated call


def test_compiles_once_for_two_calls():
  traces = []
  w = jax.random.normal(KEY, (16, 3))

  def counted(z):
    traces.append(1)
    return z.reshape(z.shape[0], -1) @ w
  run = jax.jit(lambda x, y, k, e: sq.square(counted, x, y, k, eps=e, num_queries=40))
  x = jax.random.uniform(KEY, (4, 4, 4, 1))
  out1 = run(x, jnp.arange(4) % 3, KEY, 0.1)
  n = len(traces)
  assert n > 0
  out2 = run(x * 0.5, jnp.arange(4) % 2, jax.random.PRNGKey(3), 0.2)
  assert len(traces) == n
  assert not np.array_equal(np.asarray(out1), np.asarray(out2))


def _elementwise_model():
  """A model whose logits per example do not depend on the batch's size (no matmul blocking)."""
  w = jax.random.normal(jax.random.PRNGKey(5), (D, 4))
  return lambda z: jnp.sum(z.reshape(z.shape[0], -1, 1) * w[None], axis=1)


ULPS = 1e-6  # images in [0, 1]: a few float32 ulps (the l_2 update's reductions may round
# differently at another batch size: jax 0.12.1 on CPU does, by one ulp)


def _same_run(a, b):
  """Two `square_run` outputs (images, broken flags, queries) agree: the flags and the query
  counts exactly, the images to a few ulps."""
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=0, atol=ULPS)
  for x, y in zip(a[1:], b[1:]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_example_keys_independent_of_the_batch(norm):
  fn = _elementwise_model()
  x = jax.random.uniform(jax.random.PRNGKey(2), (16,) + SHAPE)
  y = jnp.argmax(fn(x), -1)
  eps = 0.1 if norm == "linf" else 1.0
  run = jax.jit(lambda x, y, i, k: sq.square_run(fn, x, y, k, eps=eps, num_queries=60,
                                                  norm=norm, example_index=i))
  full = run(x, y, jnp.arange(16), KEY)
  assert full[1].any() and not full[1].all()  # some broken, some not: a meaningful comparison
  pick = np.array([11, 2, 7, 0, 5, 14, 9, 3])
  part = run(x[pick], y[pick], jnp.asarray(pick), KEY)
  _same_run(tuple(np.asarray(a)[pick] for a in full), part)
  # A different rng changes the result.
  other = run(x, y, jnp.arange(16), jax.random.PRNGKey(1))[0]
  assert not np.array_equal(np.asarray(other), np.asarray(full[0]))
  # A longer run continues the same search, and a point stops changing once misclassified: the
  # points broken within 30 queries come out identical after 60.
  short = jax.jit(lambda x, y: sq.square_run(fn, x, y, KEY, eps=eps, num_queries=30,
                                             norm=norm))(x, y)
  early = np.asarray(short[1])
  assert early.any() and np.all(np.asarray(full[1])[early])
  np.testing.assert_allclose(np.asarray(short[0])[early], np.asarray(full[0])[early], rtol=0,
                             atol=ULPS)
  assert np.all(np.asarray(short[2])[early] == np.asarray(full[2])[early])


def test_shard_map_equals_one_device():
  fn = _elementwise_model()
  x = jax.random.uniform(jax.random.PRNGKey(2), (16,) + SHAPE)
  y = jnp.argmax(fn(x), -1)
  run = lambda x, y, i: sq.square(fn, x, y, KEY, eps=0.1, num_queries=60, example_index=i)
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  sm = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
  sh = parallel.batch_sharding(mesh)
  args = [jax.device_put(a, sh) for a in (x, y, jnp.arange(16))]
  np.testing.assert_array_equal(np.asarray(sm(*args)),
                                np.asarray(jax.jit(run)(x, y, jnp.arange(16))))


# ---------------------------------------------------------------------------------------------
# The reference schedule, starts and update shapes
# ---------------------------------------------------------------------------------------------
def _reference_p(it, n, p_init, rescale):
  """AutoAttack's p_selection, written out as its if-chain."""
  if rescale:
    it = int(it / n * 10000)
  for k, bound in enumerate([10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]):
    if it <= bound:
      return p_init / 2 ** k
  return p_init / 512


@pytest.mark.parametrize("n,rescale", [(5000, False), (1000, True), (10000, False)])
def test_p_schedule_matches_reference(n, rescale):
  np.testing.assert_allclose(sq.p_schedule(n, 0.8, rescale),
                             [_reference_p(i, n, 0.8, rescale) for i in range(n)])


def test_side_lengths_and_phases():
  # AutoAttack on 32 x 32 CIFAR-10, 5,000 queries: l_inf sides round(sqrt(p * 1024)).
  assert sq.phases(5000, 32, 32, "linf") == [
      (0, 11, 29), (11, 51, 20), (51, 201, 14), (201, 501, 10), (501, 1001, 7), (1001, 2001, 5),
      (2001, 4001, 4), (4001, 5000, 3)]
  # l_2: at least 3 and odd (20 -> 21, 14 -> 15, 10 -> 11, 4 -> 5); equal sides merge.
  assert [s for _, _, s in sq.phases(5000, 32, 32, "l2")] == [29, 21, 15, 11, 7, 5, 3]
  assert sq.side_length(0.8, 8, 8, "linf") == 7 and sq.side_length(1e-4, 8, 8, "linf") == 1
  assert sq.side_length(0.8, 4, 4, "l2") == 4  # never larger than the image


def _reference_eta(s):
  """AutoAttack's eta(s) (without its random transpose), as its loops over rectangles."""
  def rect(x, y):
    delta = np.zeros((x, y))
    c0, c1 = x // 2, y // 2
    for k in range(max(x // 2 + 1, y // 2 + 1)):
      delta[max(c0, 0):min(c0 + 2 * k + 1, x), max(c1, 0):min(c1 + 2 * k + 1, y)] += 1 / (k + 1) ** 2
      c0, c1 = c0 - 1, c1 - 1
    return delta / np.sqrt((delta ** 2).sum()) if x else delta
  delta = np.concatenate([rect(s // 2, s), -rect(s - s // 2, s)])
  return delta / np.sqrt((delta ** 2).sum())


@pytest.mark.parametrize("s", [1, 2, 3, 5, 6, 29])
def test_meta_pseudo_gaussian_matches_reference(s):
  np.testing.assert_allclose(sq.meta_pseudo_gaussian(s), _reference_eta(s), rtol=1e-6,
                             atol=1e-7)


def test_starts():
  x = jnp.full((8, 8, 3), 0.5)
  lin = np.asarray(jax.jit(sq._linf_start)(KEY, x, 0.1)) - 0.5
  np.testing.assert_allclose(np.abs(lin), 0.1, rtol=1e-5)
  assert np.all(lin == lin[:1])  # vertical stripes: constant down each column
  assert len(np.unique(np.sign(lin[0]))) == 2
  l2 = np.asarray(jax.jit(sq._l2_start)(KEY, x, 1.0)) - 0.5
  np.testing.assert_allclose(np.linalg.norm(l2), 1.0, rtol=1e-5)
  # 8 // 5 = 1-pixel tiles from row / column 1 (AutoAttack's (8 - 5) // 2): row 0, column 0
  # are untouched, every other pixel carries +-1 times one sign per channel.
  assert not l2[0].any() and not l2[:, 0].any()
  np.testing.assert_allclose(np.abs(l2[1:, 1:]), 1 / np.sqrt(7 * 7 * 3), rtol=1e-5)
  x32 = jnp.full((32, 32, 1), 0.5)
  l2 = np.asarray(jax.jit(sq._l2_start)(KEY, x32, 1.0))[..., 0] - 0.5
  tile = l2[1:7, 7:13]  # a 6 x 6 tile: a signed, possibly transposed, meta pseudo-gaussian
  eta = sq.meta_pseudo_gaussian(6)
  assert any(np.allclose(tile / np.linalg.norm(tile), v, atol=1e-5)
             for v in (eta, -eta, eta.T, -eta.T))
  assert not l2[0].any() and not l2[31].any()


def test_single_updates():
  x = jnp.asarray(np.random.RandomState(0).uniform(0.3, 0.7, (8, 8, 2)), jnp.float32)
  linf = jax.jit(lambda k, cur: sq._linf_update(sq._draws(k, 2), x, cur, 0.1, 3))
  l2 = jax.jit(lambda k, cur: sq._l2_update(sq._draws(k, 2), x, cur, 0.25, 3))
  cur = np.asarray(jax.jit(sq._linf_start)(KEY, x, 0.1))
  for seed in range(5):
    new = np.asarray(linf(jax.random.PRNGKey(seed), cur))
    rows, cols = np.nonzero(np.any(new != cur, axis=-1))
    # One square of side 3 (all channels) at most; every pixel stays at x +- eps.
    assert rows.max() - rows.min() <= 2 and cols.max() - cols.min() <= 2
    np.testing.assert_allclose(np.abs(new - np.asarray(x)), 0.1, rtol=1e-5)
  # l_2: the new point has norm eps exactly (no [0, 1] clipping here) and is a new point.
  cur = np.asarray(jax.jit(sq._l2_start)(KEY, x, 0.25))
  for seed in range(5):
    new = np.asarray(l2(jax.random.PRNGKey(seed), cur))
    np.testing.assert_allclose(np.linalg.norm(new - np.asarray(x)), 0.25, rtol=1e-5)
    assert np.abs(new - cur).max() > 1e-3


def _reference_l2_update(x, cur, eps, s, r1, c1, r2, c2, signs, flip, per_channel=True):
  """AutoAttack's l_2 Square step written out in numpy on one [H, W, C] image: the new window is
  normalised per channel and gets the per-channel budget sqrt(max(eps^2 - |delta|^2, 0) / C +
  |delta on both windows|^2). per_channel=False normalises it over all channels instead."""
  c = x.shape[-1]
  delta = (cur - x).astype(np.float64)
  window = delta[r1:r1 + s, c1:c1 + s]
  old = window / (np.sqrt((window ** 2).sum(axis=(0, 1))) + 1e-12)
  both = np.zeros(x.shape[:2], bool)
  both[r1:r1 + s, c1:c1 + s] = True
  both[r2:r2 + s, c2:c2 + s] = True
  eta = _reference_eta(s).T if flip else _reference_eta(s)
  new = eta[..., None] * signs + old
  axes = (0, 1) if per_channel else (0, 1, 2)
  budget = np.sqrt(max(eps ** 2 - (delta ** 2).sum(), 0.0) / c + (delta[both] ** 2).sum())
  new = new / np.sqrt((new ** 2).sum(axis=axes, keepdims=True)) * budget
  delta[r2:r2 + s, c2:c2 + s] = 0.0
  delta[r1:r1 + s, c1:c1 + s] = new
  return x + eps * delta / np.sqrt((delta ** 2).sum())


@pytest.mark.parametrize("channels", [3, 1])
def test_l2_window_budget_per_channel(channels):
  """The l_2 update's new window against the reference formula, on an image whose channels carry
  very unequal perturbation mass (with one channel the per-channel and the all-channel budgets
  coincide; with three they must not, or the test could not tell them apart)."""
  rs = np.random.RandomState(4)
  h, s, eps = 12, 5, 0.3 * channels
  x = rs.uniform(0.3, 0.7, (h, h, channels)).astype(np.float32)
  delta = rs.randn(h, h, channels) * np.array([0.05, 0.3, 1.0])[:channels]
  cur = (x + 0.6 * eps * delta / np.linalg.norm(delta)).astype(np.float32)
  r1, c1, r2, c2 = 2, 3, 6, 5
  u = (np.array([r1, c1, r2, c2]) + 0.5) / (h - s + 1)
  signs = np.array([1.0, -1.0, 1.0])[:channels]
  for flip in (False, True):
    draws = dict(u=jnp.asarray(u, jnp.float32), signs=jnp.asarray(signs, jnp.float32),
                 flip=jnp.asarray(flip))
    got = np.asarray(sq._l2_update(draws, jnp.asarray(x), jnp.asarray(cur), eps, s))
    want = _reference_l2_update(x, cur, eps, s, r1, c1, r2, c2, signs, flip)
    assert want.min() > 0 and want.max() < 1  # [0, 1] clipping plays no part
    np.testing.assert_allclose(got, want, atol=1e-6)
    other = _reference_l2_update(x, cur, eps, s, r1, c1, r2, c2, signs, flip, per_channel=False)
    assert (np.abs(other - want).max() > 1e-2) == (channels > 1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_compaction_same_results_per_example(norm):
  """Square with compaction (every 10 queries) returns the same points, flags and query counts
  as without it, on a batch where more than half the rows break well before the end (so the
  micro-batches are skipped)."""
  fn = _elementwise_model()
  x = jax.random.uniform(jax.random.PRNGKey(3), (48,) + SHAPE)
  y = jnp.argmax(fn(x), -1)
  eps, n = (0.3, 200) if norm == "linf" else (2.5, 200)
  run = jax.jit(lambda x, y, compact: sq.square_run(fn, x, y, KEY, eps=eps, num_queries=n,
                                                     norm=norm, compact=compact,
                                                     compact_every=10), static_argnums=2)
  plain, compacted = run(x, y, False), run(x, y, True)
  wrong, queries = np.asarray(plain[1]), np.asarray(plain[2])
  assert not wrong.all()
  assert np.sum(wrong & (queries <= n - 10)) >= sq.compaction.micro_batch(48)
  _same_run(plain, compacted)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="l0"), "unknown norm 'l0'"),  # Square has an l1 form
    (dict(eps=-0.1), "eps must be >= 0"),
    (dict(eps=1.5), "l_inf eps must be in"),
    (dict(num_queries=0), "num_queries must be an integer >= 1, got num_queries=0"),
    (dict(num_queries=2.5), "num_queries must be an integer"),
    (dict(p_init=0.0), r"p_init must be in \(0, 1\], got p_init=0.0"),
    (dict(p_init=1.5), "p_init must be in"),
])
def test_bad_arguments(kwargs, match):
  fn = lambda z: z.reshape(z.shape[0], -1)[:, :3]
  args = dict(dict(eps=0.1, num_queries=10), **kwargs)
  with pytest.raises(ValueError, match=match):
    sq.square(fn, jnp.zeros((2, 4, 4, 1)), jnp.zeros(2, jnp.int32), KEY, **args)


def test_bad_data():
  fn = lambda z: z.reshape(z.shape[0], -1)[:, :3]
  with pytest.raises(ValueError, match="images must be in"):
    sq.square(fn, jnp.full((2, 4, 4, 1), 2.0), jnp.zeros(2, jnp.int32), KEY, eps=0.1)
  with pytest.raises(ValueError, match="labels must be in"):
    sq.square(fn, jnp.zeros((2, 4, 4, 1)), jnp.array([0, 3]), KEY, eps=0.1)
  with pytest.raises(ValueError, match=r"images must be \[B, H, W, C\]"):
    sq.square(fn, jnp.zeros((2, 16)), jnp.zeros(2, jnp.int32), KEY, eps=0.1)
