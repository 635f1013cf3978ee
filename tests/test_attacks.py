"""Tests of adv_soups.attacks: known answers, invariants, strength, purity, sharding, errors."""
import functools

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from adv_soups import parallel
from adv_soups.attacks import apgd, apgd_t, checkpoint_schedule, pgd, robust_accuracy
from adv_soups.attacks import losses

KEY = jax.random.PRNGKey(0)
EPS = 0.1
COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _linear_binary(seed=0, shape=(2, 2, 3)):
  """logits = x W + b with 2 classes: margin and CE are monotone in (w1 - w0) . x."""
  d = int(np.prod(shape))
  w = jax.random.normal(jax.random.PRNGKey(seed), (d, 2))
  b = jnp.array([0.1, -0.2])
  return (lambda x: x.reshape(x.shape[0], -1) @ w + b), (w[:, 1] - w[:, 0]).reshape(shape)


def _mlp_init(seed, d_in, hidden, classes):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return dict(w1=jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in), b1=jnp.zeros(hidden),
              w2=jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
              b2=jnp.zeros(classes))


def _mlp(params, x):
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


RAND_PARAMS = _mlp_init(1, 48, 37, 10)  # hidden 37: parameter shapes are easy to spot in jaxprs
rand_mlp = functools.partial(_mlp, RAND_PARAMS)


@pytest.fixture(scope="module")
def digits():
  """A 2-layer MLP trained for 300 full-batch Adam steps on sklearn's digits (8x8x1, [0, 1])."""
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  y = data.target.astype(np.int32)
  perm = np.random.RandomState(0).permutation(len(y))
  x, y = x[perm], y[perm]
  x_tr, y_tr, x_te, y_te = x[:1437], y[:1437], x[1437:], y[1437:]
  params = _mlp_init(0, 64, 64, 10)
  opt = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(lambda p: losses.ce_loss(_mlp(p, x_tr), y_tr).mean())(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=300)
    return p
  params = train(params)
  acc = float(np.mean(np.argmax(_mlp(params, x_te), -1) == y_te))
  assert acc > 0.9, acc
  return dict(params=params, fn=functools.partial(_mlp, params), x=x_te, y=y_te)


def _batches(x, y, size, **extra):
  return [dict(image=x[i:i + size], label=y[i:i + size],
               **{k: v[i:i + size] for k, v in extra.items()}) for i in range(0, len(y), size)]


def _jaxpr_eqns(jaxpr):
  """All equations of a (closed) jaxpr, sub-jaxprs (while, scan, pjit, custom_jvp...) included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
          yield from _jaxpr_eqns(sub)


# ---------------------------------------------------------------------------------------------
# Known answers on a linear classifier
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_known_answer_linear(attack, norm):
  f, wd = _linear_binary()
  x = jax.random.uniform(jax.random.PRNGKey(1), (6, 2, 2, 3), minval=0.3, maxval=0.7)
  y = jnp.array([0, 1, 0, 1, 1, 0])
  toward_other = jnp.where(y == 0, 1.0, -1.0)[:, None, None, None]
  if norm == "linf":
    x_opt = x + EPS * jnp.sign(wd) * toward_other
  else:
    x_opt = x + EPS * wd / jnp.linalg.norm(wd) * toward_other
  if attack == "pgd":
    # l_2 PGD from a random start only converges geometrically toward the optimum (the angle to
    # w shrinks by ~(1 + 2.5/k)^-1 a step), so the exact l_2 answer is checked from x itself.
    fn = lambda x, y: pgd(f, x, y, KEY, eps=EPS, num_steps=20, norm=norm, loss="margin",
                          random_start=(norm == "linf"))
  else:
    fn = lambda x, y: apgd(f, x, y, KEY, eps=EPS, num_steps=50, norm=norm, loss="margin")
  x_adv = jax.jit(fn)(x, y)
  best = losses.margin_loss(f(x_opt), y)
  got = losses.margin_loss(f(x_adv), y)
  np.testing.assert_allclose(got, best, atol=1e-4)


def test_known_answer_linf_with_clipping():
  """Near the box edges the l_inf optimum is clip(x + eps sign(w), 0, 1)."""
  f, wd = _linear_binary(seed=3)
  x = jnp.round(jax.random.uniform(jax.random.PRNGKey(2), (4, 2, 2, 3)))  # pixels at 0 or 1
  x = jnp.clip(x + 0.05 * jnp.sign(0.5 - x), 0, 1)  # 0.05 from the edges, so eps 0.1 clips
  y = jnp.array([0, 1, 1, 0])
  toward_other = jnp.where(y == 0, 1.0, -1.0)[:, None, None, None]
  x_opt = jnp.clip(x + EPS * jnp.sign(wd) * toward_other, 0, 1)
  for fn in (functools.partial(pgd, num_steps=10), functools.partial(apgd, num_steps=20)):
    x_adv = jax.jit(lambda x, y: fn(f, x, y, KEY, eps=EPS, loss="margin"))(x, y)
    np.testing.assert_allclose(losses.margin_loss(f(x_adv), y),
                               losses.margin_loss(f(x_opt), y), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_attacks():
  """Jitted attacks on the random MLP, eps a traced argument (one compilation per attack/norm)."""
  out = {}
  for norm in ("linf", "l2"):
    out["pgd", norm] = jax.jit(lambda x, y, k, e, norm=norm: pgd(
        rand_mlp, x, y, k, eps=e, num_steps=5, norm=norm, restarts=2))
    out["apgd", norm] = jax.jit(lambda x, y, k, e, norm=norm: apgd(
        rand_mlp, x, y, k, eps=e, num_steps=8, norm=norm, loss="dlr"))
    out["apgd_t", norm] = jax.jit(lambda x, y, k, e, norm=norm: apgd_t(
        rand_mlp, x, y, k, eps=e, num_steps=5, norm=norm, num_targets=2))
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inside_ball_and_box(compiled_attacks, seed):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.uniform(k1, (8, 4, 4, 3))
  x = x.at[:2].set(jnp.round(x[:2]))  # some pixels exactly on the box edges
  y = jax.random.randint(k2, (8,), 0, 10)
  for (name, norm), fn in compiled_attacks.items():
    eps = 0.05 if norm == "linf" else 0.5
    x_adv = np.asarray(fn(x, y, jax.random.PRNGKey(seed + 10), eps))
    assert x_adv.min() >= 0 and x_adv.max() <= 1, (name, norm)
    d = (x_adv - np.asarray(x)).reshape(8, -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps * (1 + 1e-5) + 1e-6), (name, norm, size.max())
    assert np.any(size > eps / 4), (name, norm)  # it did move


def test_eps_zero_returns_input(compiled_attacks):
  x = jax.random.uniform(jax.random.PRNGKey(5), (8, 4, 4, 3))
  y = jnp.arange(8)
  for (name, norm), fn in compiled_attacks.items():
    np.testing.assert_array_equal(fn(x, y, KEY, 0.0), x, err_msg=f"{name} {norm}")


def test_eps_zero_robust_equals_clean(digits):
  r = robust_accuracy(digits["fn"], _batches(digits["x"][:64], digits["y"][:64], 32), eps=0.0,
                      attacks=("pgd", "apgd-ce", "apgd-t"), num_steps=3, num_targets=2)
  assert r.clean_accuracy < 1  # the check below is not vacuous
  np.testing.assert_array_equal(r.robust, r.clean_correct)
  assert r.robust_accuracy == r.clean_accuracy


def test_robust_accuracy_non_increasing_in_eps():
  """On a binary linear model PGD reaches the l_inf optimum: robust iff margin > eps |w|_1."""
  f, wd = _linear_binary(seed=4, shape=(4, 4, 1))
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(6), (64, 4, 4, 1)))
  logits = np.asarray(f(x))
  y = np.argmax(logits, -1).astype(np.int32)
  y[:4] = 1 - y[:4]  # a few clean errors
  margin = np.abs(logits[:, 1] - logits[:, 0])
  l1 = float(np.abs(wd).sum())
  accs = []
  for eps in [0.0, 0.01, 0.03, 0.06, 0.1, 0.2]:
    for attack in ("pgd", "apgd-ce"):
      r = robust_accuracy(f, _batches(x, y, 32), eps=eps, attacks=(attack,), num_steps=10)
      certain = np.abs(margin - eps * l1) > 1e-3  # away from the decision threshold
      expected = r.clean_correct & (margin > eps * l1)
      np.testing.assert_array_equal(r.robust[certain], expected[certain], err_msg=f"{eps}")
      accs.append(r.robust_accuracy)
  assert all(a >= b for a, b in zip(accs[::2], accs[2::2])), accs
  assert accs[0] > accs[-1]


def test_targeted_attacks_raise_target_logit():
  """Each targeted loss raises the target's standing: log p_t (CE), z_t - max_other (CW), DLR."""
  x = jax.random.uniform(jax.random.PRNGKey(7), (16, 4, 4, 3))
  y = jnp.argmax(rand_mlp(x), -1)
  t = (y + 1 + jnp.arange(16) % 9) % 10
  measure = {
      "ce": lambda z: jax.nn.log_softmax(z)[jnp.arange(16), t],
      "margin": lambda z: losses.targeted_margin_loss(z, y, t),
      # DLR is scale-invariant: it may grow by spreading the logits, not only through z_t - z_y.
      "dlr": lambda z: losses.targeted_dlr_loss(z, y, t),
  }
  for loss, m in measure.items():
    x_adv = jax.jit(lambda x: pgd(rand_mlp, x, y, KEY, eps=0.05, num_steps=10, loss=loss,
                                  targets=t))(x)
    gain = np.asarray(m(rand_mlp(x_adv)) - m(rand_mlp(x)))
    # PGD returns its last iterate, which need not beat the clean point on every example.
    assert gain.mean() > 0 and np.mean(gain > 0) >= 0.85, (loss, gain)
  x_adv = jax.jit(lambda x: apgd(rand_mlp, x, y, KEY, eps=0.05, num_steps=10, loss="dlr",
                                 targets=t))(x)
  gain = np.asarray(measure["dlr"](rand_mlp(x_adv)) - measure["dlr"](rand_mlp(x)))
  assert gain.mean() > 0 and np.mean(gain > 0) >= 0.85, gain


# ---------------------------------------------------------------------------------------------
# Strength on a trained model
# ---------------------------------------------------------------------------------------------
def test_strength_apgd_pgd20_pgd2(digits):
  """APGD-CE + APGD-T <= PGD-20 <= PGD-2 (robust accuracy at l_inf eps 0.1 on digits).

  Counted on unions (a point broken by a weaker attack counts as broken for the stronger one),
  so the chain cannot flake; the stand-alone comparisons below are deterministic (fixed seeds).
  """
  batches = _batches(digits["x"], digits["y"], 128)
  run = functools.partial(robust_accuracy, digits["fn"], batches, eps=0.1)
  r2 = run(attacks="pgd", num_steps=2)
  r20 = run(attacks="pgd", num_steps=20)
  ra = run(attacks=("apgd-ce", "apgd-t"), num_steps=100)
  np.testing.assert_array_equal(r2.clean_correct, ra.clean_correct)
  acc = lambda flags: float(np.mean(flags))
  a2, a20, aa = acc(r2.robust), acc(r2.robust & r20.robust), acc(r2.robust & r20.robust & ra.robust)
  assert aa <= a20 <= a2 < r2.clean_accuracy, (aa, a20, a2)
  # Stand-alone: APGD is clearly stronger than PGD-2 and at least as strong as PGD-20.
  assert ra.robust_accuracy < r2.robust_accuracy - 0.05, (ra.robust_accuracy, r2.robust_accuracy)
  assert ra.robust_accuracy <= r20.robust_accuracy, (ra.robust_accuracy, r20.robust_accuracy)
  assert np.mean(ra.robust & ~r20.robust) <= 0.01  # PGD-20 breaks almost nothing APGD missed
  assert [a["name"] for a in ra.attacks] == ["apgd-ce", "apgd-t"]
  assert ra.attacks[1]["num_targets"] == 9


# ---------------------------------------------------------------------------------------------
# Purity: no parameter gradients; no collectives in the attack loop
# ---------------------------------------------------------------------------------------------
def _param_shaped_dots(fn, *args):
  """dot_generals whose output has a weight matrix's shape (or its transpose): weight cotangents."""
  shapes = {tuple(v.shape) for v in jax.tree.leaves(RAND_PARAMS) if v.ndim == 2}
  shapes |= {s[::-1] for s in shapes}
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [e for e in _jaxpr_eqns(jaxpr) if e.primitive.name == "dot_general"
          and tuple(e.outvars[0].aval.shape) in shapes]


def test_no_parameter_gradients():
  x = jax.random.uniform(KEY, (4, 4, 4, 3))
  y = jnp.arange(4)
  # The detector works: a parameter gradient has dot_generals producing weight-shaped arrays.
  grad_params = lambda p, x, y: jax.grad(lambda p: losses.ce_loss(_mlp(p, x), y).sum())(p)
  assert _param_shaped_dots(grad_params, RAND_PARAMS, x, y)
  # The attacks, with the parameters as traced arguments closed over by logits_fn...
  for attack in (functools.partial(pgd, num_steps=3), functools.partial(apgd, num_steps=3),
                 functools.partial(apgd_t, num_steps=3, num_targets=2)):
    fn = lambda p, x, y: attack(functools.partial(_mlp, p), x, y, KEY, eps=EPS)
    assert not _param_shaped_dots(jax.jit(fn), RAND_PARAMS, x, y)
    # ... and as constants inside jit: they appear only as constants.
    jaxpr = jax.make_jaxpr(jax.jit(lambda x, y: attack(rand_mlp, x, y, KEY, eps=EPS)))(x, y)
    assert not [e for e in _jaxpr_eqns(jaxpr) if e.primitive.name == "dot_general"
                and tuple(e.outvars[0].aval.shape) in {(48, 37), (37, 10), (37, 48), (10, 37)}]


def test_no_collectives_in_sharded_attack():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  sh = parallel.batch_sharding(mesh)
  x = jax.device_put(jax.random.uniform(KEY, (16, 4, 4, 3)), sh)
  y = jax.device_put(jnp.arange(16) % 10, sh)
  fns = {"pgd": lambda x, y: pgd(rand_mlp, x, y, KEY, eps=EPS, num_steps=3),
         "apgd": lambda x, y: apgd(rand_mlp, x, y, KEY, eps=EPS, num_steps=3, loss="dlr")}
  # The detector works: a batch mean over the sharded axis needs an all-reduce.
  txt = jax.jit(lambda x, y: pgd(rand_mlp, x, y, KEY, eps=EPS, num_steps=3).mean()).lower(
      x, y).compile().as_text()
  assert "all-reduce" in txt
  for name, fn in fns.items():
    jitted = jax.jit(fn)
    txt = jitted.lower(x, y).compile().as_text()
    assert "while" in txt, name
    assert not [c for c in COLLECTIVES if c in txt], name
    out = jitted(x, y)
    assert out.sharding.is_equivalent_to(sh, out.ndim), name
    # Per-example random starts: the sharded result equals the single-device one.
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.jit(fn)(
        np.asarray(x), np.asarray(y))), err_msg=name)
  # Explicit per-device form: shard_map with check_vma, global example indices passed in.
  sm = jax.jit(jax.shard_map(
      lambda x, y, i: pgd(rand_mlp, x, y, KEY, eps=EPS, num_steps=3, example_index=i),
      mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
  idx = jax.device_put(jnp.arange(16), sh)
  assert not [c for c in COLLECTIVES if c in sm.lower(x, y, idx).compile().as_text()]
  np.testing.assert_array_equal(np.asarray(sm(x, y, idx)), np.asarray(jax.jit(fns["pgd"])(x, y)))


def test_vmap_over_batches():
  x = jax.random.uniform(KEY, (2, 4, 4, 4, 3))
  y = jnp.arange(8).reshape(2, 4)
  fn = lambda x, y: pgd(rand_mlp, x, y, KEY, eps=EPS, num_steps=3)
  out = jax.jit(jax.vmap(fn))(x, y)
  np.testing.assert_allclose(out[1], jax.jit(fn)(x[1], y[1]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Multi-device runner
# ---------------------------------------------------------------------------------------------
def test_robust_accuracy_8_devices_equals_1(digits):
  """With a per-example 'domain' (mixing weights), padding masks and `params` passed in."""
  params = dict(mlp=digits["params"], domain_bias=jnp.array([[0.0] * 10, [0.3] * 5 + [-0.3] * 5]))

  def logits_fn(p, images, domain):
    return _mlp(p["mlp"], images) + domain @ p["domain_bias"]
  n = 60
  x, y = digits["x"][:n], digits["y"][:n]
  a = np.linspace(0, 1, n, dtype=np.float32)
  dom = np.stack([1 - a, a], 1)
  mask = np.ones(n, bool)
  mask[-5:] = False
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    r = robust_accuracy(logits_fn, _batches(x, y, 24, domain=dom, mask=mask), eps=0.1,
                        attacks=("pgd", "apgd-ce", "apgd-t"), num_steps=5, num_targets=3,
                        mesh=parallel.make_mesh(devices), params=params)
    results.append(r)
  r8, r1 = results
  assert r8.num_examples == r1.num_examples == n - 5
  np.testing.assert_array_equal(r8.clean_correct, r1.clean_correct)
  np.testing.assert_array_equal(r8.robust, r1.robust)
  np.testing.assert_array_equal(r8.broken_by, r1.broken_by)
  assert r8.accuracy_after == r1.accuracy_after
  assert 0 < r8.robust_accuracy < r8.clean_accuracy
  assert r8.accuracy_after[-1] == r8.robust_accuracy


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
_X = jnp.full((2, 4, 4, 3), 0.5)
_Y = jnp.array([0, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1), "eps=-0.1"),
    (dict(eps=1.5), "eps=1.5"),
    (dict(norm="l1"), "'l1'"),
    (dict(loss="hinge"), "'hinge'"),
    (dict(num_steps=0), "num_steps=0"),
    (dict(restarts=0), "restarts=0"),
    (dict(images=_X + 0.6), r"1\.1"),
    (dict(images=_X - 0.6), r"-0\.1"),
    (dict(labels=jnp.array([0, 10])), "10"),
    (dict(labels=jnp.array([-1, 0])), "-1"),
])
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_bad_arguments(attack, kwargs, match):
  args = dict(images=_X, labels=_Y, eps=0.1, num_steps=3)
  args.update(kwargs)
  fn = pgd if attack == "pgd" else apgd
  with pytest.raises(ValueError, match=match):
    fn(rand_mlp, args.pop("images"), args.pop("labels"), KEY, **args)


def test_bad_arguments_runner_and_classes():
  batches = [dict(image=np.asarray(_X), label=np.asarray(_Y))]
  with pytest.raises(ValueError, match="'cw'"):
    robust_accuracy(rand_mlp, batches, eps=0.1, attacks=("cw",))
  with pytest.raises(ValueError, match="eps=2.0"):
    robust_accuracy(rand_mlp, batches, eps=2.0)
  with pytest.raises(ValueError, match=r"\[-3, 0\]"):
    robust_accuracy(rand_mlp, [dict(image=np.asarray(_X), label=np.array([0, -3]))], eps=0.1,
                    attacks="pgd")
  with pytest.raises(ValueError, match=r"1\.5"):
    robust_accuracy(rand_mlp, [dict(image=np.asarray(_X) * 3, label=np.asarray(_Y))], eps=0.1,
                    attacks="pgd")
  with pytest.raises(ValueError, match="11"):
    robust_accuracy(rand_mlp, [dict(image=np.asarray(_X), label=np.array([0, 11]))], eps=0.1,
                    attacks="pgd")
  three = lambda x: rand_mlp(x)[:, :3]
  with pytest.raises(ValueError, match="num_classes=3"):
    apgd_t(three, _X, _Y, KEY, eps=0.1)
  with pytest.raises(ValueError, match="num_classes=3"):
    apgd(three, _X, _Y, KEY, eps=0.1, loss="dlr", targets=jnp.array([1, 2]))
  with pytest.raises(ValueError, match="num_classes=3"):
    robust_accuracy(three, batches, eps=0.1, attacks=("apgd-t",))
  # l_2 eps above 1 is fine.
  assert pgd(rand_mlp, _X, _Y, KEY, eps=2.0, num_steps=1, norm="l2").shape == _X.shape


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------
def test_compiles_once():
  traces = []

  def counted(x):
    traces.append(1)
    return rand_mlp(x)
  fn = jax.jit(lambda x, y, k: pgd(counted, x, y, k, eps=EPS, num_steps=4, restarts=2))
  x = jax.random.uniform(KEY, (4, 4, 4, 3))
  fn(x, jnp.arange(4), KEY)
  n = len(traces)
  assert n > 0
  fn(x * 0.5, jnp.arange(4) + 1, jax.random.PRNGKey(9))
  assert len(traces) == n
  # The runner caches its compiled stages across calls (same logits_fn, same settings).
  batches = [dict(image=np.asarray(x), label=np.arange(4))]
  robust_accuracy(counted, batches, eps=EPS, attacks=("pgd", "apgd-t"), num_steps=2,
                  num_targets=3)
  n = len(traces)
  robust_accuracy(counted, batches, eps=EPS, attacks=("pgd", "apgd-t"), num_steps=2,
                  num_targets=3)
  assert len(traces) == n


def test_apgd_checkpoints_and_dlr():
  is_check, window = checkpoint_schedule(100)
  assert list(np.nonzero(is_check)[0] + 1) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert list(window[is_check]) == [22, 19, 16, 13, 10, 7, 6, 6]
  z = jnp.array([[4.0, 1.0, 3.0, 0.0, 2.0]])
  y = jnp.array([2])
  np.testing.assert_allclose(losses.dlr_loss(z, y), [-(3.0 - 4.0) / (4.0 - 2.0)])
  np.testing.assert_allclose(losses.targeted_dlr_loss(z, y, jnp.array([4])),
                             [-(3.0 - 2.0) / (4.0 - 1.5)])
  np.testing.assert_allclose(losses.margin_loss(z, jnp.array([0])), [-1.0])
