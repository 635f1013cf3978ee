"""Threat domains: config normalisation, soups on the simplex, union robustness, TRADES."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import perturb
from adv_soups import config_base, soup_weights, soups, threats
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import trades
from adv_soups.evaluation import simplex_plot, union
from adv_soups.models import create_model, init_params


# ----------------------------------------------------------------------------------------------
# Soups over three domains.

def _three_domain_model(adapter):
  config = ml_collections.ConfigDict(dict(variant="tiny/4", num_classes=5, adapter=adapter,
                                          num_domains=3, image_size=8, depth=1, width=32,
                                          num_heads=2, mlp_dim=64))
  model = create_model(config)
  params = perturb(init_params(model, jax.random.key(0)), 0.3, 2)
  single = create_model(ml_collections.ConfigDict(dict(config.to_dict(), num_domains=1)))
  return model, single, params


@pytest.mark.parametrize("adapter", ["token", "norm", "head"])
def test_three_domain_soups_equal_parameter_space_soups(adapter):
  model, single, params = _three_domain_model(adapter)
  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  apply = jax.jit(model.apply)
  for d in range(3):
    corner = np.eye(3, dtype=np.float32)[d]
    mixed = apply({"params": params}, images, jnp.tile(corner, (4, 1)))
    own = apply({"params": params}, images, jnp.full((4,), d, jnp.int32))
    np.testing.assert_array_equal(mixed, own)  # the corner e_d *is* domain d, bit for bit
    soup = soups.interpolate(params, corner)
    for leaf, full, specific in zip(jax.tree.leaves(soup), jax.tree.leaves(params),
                                    jax.tree.leaves(soups.domain_specific(params))):
      np.testing.assert_array_equal(leaf, full[d:d + 1] if specific else full)
  others = np.concatenate([soup_weights.simplex_grid(3, 0.5),
                           soup_weights.parse_weights("1.2,-0.5,0.3;-0.4,0.7,0.7", 3, True)])
  for w in others:
    mixed = apply({"params": params}, images, jnp.tile(jnp.asarray(w, jnp.float32), (4, 1)))
    soup = single.apply({"params": soups.interpolate(params, w)}, images)
    np.testing.assert_allclose(mixed, soup, atol=2e-5)
    # and the soup is not simply one of the corners: the adapters differ between domains
  assert not np.allclose(apply({"params": params}, images, jnp.zeros(4, jnp.int32)),
                         apply({"params": params}, images, jnp.full((4,), 2, jnp.int32)))


# ----------------------------------------------------------------------------------------------
# Weights.

def test_simplex_grid_covers_the_simplex():
  grid = soup_weights.simplex_grid(3, 0.1)
  assert grid.shape == (66, 3)  # C(12, 2)
  np.testing.assert_allclose(grid.sum(1), 1.0)
  assert (grid >= 0).all()
  assert len({tuple(np.round(r, 6)) for r in grid}) == 66
  for corner in np.eye(3):
    assert any(np.allclose(r, corner) for r in grid)
  np.testing.assert_allclose(soup_weights.parse_weights("simplex:1/3", 3)[1], [2 / 3, 1 / 3, 0])


def test_parse_weights_vectors_and_affine():
  w = soup_weights.parse_weights("0.2,0.3,0.5;0,0,1", 3)
  np.testing.assert_allclose(w, [[0.2, 0.3, 0.5], [0, 0, 1]])
  np.testing.assert_allclose(soup_weights.parse_weights("1/3,1/3,1/3", 3), [[1 / 3] * 3])
  affine = soup_weights.parse_weights("1.5,-0.25,-0.25", 3, extrapolate=True)
  np.testing.assert_allclose(affine, [[1.5, -0.25, -0.25]])


@pytest.mark.parametrize("text, extrapolate, message", [
    ("0.2,0.3,0.4", False, "sums to 0.9"),
    ("0.5,0.5", False, "has 2 values"),
    ("1.5,-0.25,-0.25", False, "--extrapolate"),
    ("simplex:0.3", False, "1/n"),
    ("simplex:x", False, "malformed"),
    ("a,b,c", False, "malformed"),
    ("", False, "empty"),
])
def test_parse_weights_refuses_bad_input(text, extrapolate, message):
  with pytest.raises(ValueError, match=message):
    soup_weights.parse_weights(text, 3, extrapolate)


# ----------------------------------------------------------------------------------------------
# Threats in the config.

def _threats_config(**threats_):
  config = config_base.base_config()
  config.threats = threats.ordered(threats_)
  return config


def test_a_config_without_threats_is_one_threat_named_by_its_norm():
  config = config_base.base_config()
  config.attack.update(norm="l2", eps=0.5, num_steps=3)
  config.train.adv_weight = 0.7
  out = threats.normalise(config)
  assert list(out) == ["l2"]
  assert out["l2"] == dict(threats.THREAT_DEFAULTS, norm="l2", eps=0.5, num_steps=3, weight=0.7)
  # the same from the dict of an old config.json
  assert threats.normalise(config.to_dict()) == out
  assert threats.num_domains(config) == 2


def test_threats_keep_their_order_through_a_resolved_config_json():
  config = _threats_config(zlinf=dict(norm="linf", eps=0.1), al2=dict(norm="l2", eps=0.5))
  resolved = threats.resolve(config)
  assert list(resolved) == ["zlinf", "al2"]
  assert resolved["al2"]["step_size"] == pytest.approx(2.5 * 0.5 / 10)
  import json
  as_saved = json.loads(json.dumps(config.to_dict(), sort_keys=True))  # config.json sorts keys
  assert list(as_saved["threats"]) == ["al2", "zlinf"]
  assert list(threats.normalise(as_saved)) == ["zlinf", "al2"]
  assert threats.normalise(as_saved) == resolved


def test_canonical_spelling_makes_old_and_new_forms_equal():
  old = config_base.base_config()
  old.attack.update(norm="linf", eps=0.1, num_steps=5)
  new = _threats_config(linf=dict(norm="linf", eps=0.1, num_steps=5))
  assert threats.canonical(old.to_dict()) == threats.canonical(new.to_dict())
  new.threats.linf.eps = 0.2
  assert threats.canonical(old.to_dict()) != threats.canonical(new.to_dict())


@pytest.mark.parametrize("entry, message", [
    (dict(norm="l7", eps=0.1), "norm='l7' is unknown"),
    (dict(norm="linf"), "has no eps"),
    (dict(eps=0.1), "has no norm"),
    (dict(norm="linf", eps=1.5), "out of range"),
    (dict(norm="l2", eps=0.5, loss="hinge"), "loss='hinge' is unknown"),
    (dict(norm="l2", eps=0.5, num_steps=0), "num_steps must be an integer >= 1"),
    (dict(norm="l2", eps=0.5, weight=-1.0), "weight=-1.0 must be a number >= 0"),
    (dict(norm="l2", eps=0.5, epsilon=0.1), "epsilon is not a field"),
])
def test_bad_threats_are_one_line(entry, message):
  with pytest.raises(ValueError, match=message) as info:
    threats.normalise(_threats_config(t=entry))
  assert "\n" not in str(info.value)


def test_threats_and_a_changed_attack_are_refused():
  config = _threats_config(linf=dict(norm="linf", eps=0.1))
  threats.check_exclusive(config, config_base.base_config())  # attack at its default: fine
  config.attack.eps = 0.2
  with pytest.raises(ValueError, match="config.attack.eps"):
    threats.check_exclusive(config, config_base.base_config())


# ----------------------------------------------------------------------------------------------
# Union robustness on a model whose two threats break disjoint examples.

def _two_region_logits(x):
  """Labels are all 0; logits [z0 - z1, 0] = [margin, 0]. Examples with pixel 7 = 1 have margin
  0.35 - sum(x[0:4] - 0.5) (dense: l_inf eps 0.1 reaches 0.4, l_2 eps 0.15 only 0.3); the others
  0.125 - (x[4] - 0.5) (sparse: l_inf reaches 0.1, l_2 0.15)."""
  flat = x.reshape(x.shape[0], -1)
  dense = 0.35 - jnp.sum(flat[:, 0:4] - 0.5, axis=1)
  sparse = 0.125 - (flat[:, 4] - 0.5)
  margin = jnp.where(flat[:, 7] > 0.5, dense, sparse)
  return jnp.stack([margin, jnp.zeros_like(margin)], axis=1)


def test_union_robustness_is_below_each_threat_when_they_break_disjoint_examples():
  images = np.full((8, 2, 4, 1), 0.5, np.float32)
  images[:, 1, 3, 0] = [1, 1, 1, 1, 0, 0, 0, 0]  # pixel 7: the first four are "dense" examples
  labels = jnp.zeros(8, jnp.int32)
  attacks = {"linf": dict(norm="linf", eps=0.1), "l2": dict(norm="l2", eps=0.15)}
  robust = {}
  for name, threat in attacks.items():
    x_adv = pgd_lib.pgd(_two_region_logits, images, labels, jax.random.key(0), num_steps=20,
                        **threat)
    robust[name] = np.asarray(jnp.argmax(_two_region_logits(x_adv), -1) == 0)[:, None]
  clean = np.asarray(jnp.argmax(_two_region_logits(jnp.asarray(images)), -1) == 0)[:, None]
  assert clean.all()
  acc = union.accuracies(clean, robust)
  assert acc["linf"][0] == 0.5 and acc["l2"][0] == 0.5  # each breaks its own half
  assert acc["union"][0] < min(acc["linf"][0], acc["l2"][0])
  assert acc["union"][0] == 0.0


def test_selection_reports_the_chosen_soup_on_disjoint_examples():
  rng = np.random.default_rng(0)
  clean = rng.random((40, 3)) < 0.9
  robust = {"linf": rng.random((40, 3)) < 0.5, "l2": rng.random((40, 3)) < 0.5}
  holdout = union.first_half(40)
  # the union accuracies on each half, to check the choice and the report
  u = union.union_correct(robust)
  out = union.select_on_half(clean, robust, "union", holdout)
  assert out["index"] == int(np.argmax(u[:20].mean(0)))
  assert out["reported"]["union"] == pytest.approx(u[20:, out["index"]].mean())
  assert out["selection_examples"] == out["reported_examples"] == 20
  with pytest.raises(ValueError, match="allowed union, clean, linf, l2"):
    union.select_on_half(clean, robust, "l1", holdout)


def test_simplex_plot_is_a_png():
  grid = soup_weights.simplex_grid(3, 0.25)
  values = grid[:, 1] * 0.5 + 0.2
  png = simplex_plot.to_png(grid, {"clean": values, "union": 1 - values}, ["clean", "a", "b"])
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  assert simplex_plot.best(values) == int(np.argmax(values))
  np.testing.assert_allclose(simplex_plot.to_plane(np.eye(3)), simplex_plot.CORNERS)


# ----------------------------------------------------------------------------------------------
# TRADES on a linear model.

def _linear(weights, bias):
  def logits_fn(x):
    return x.reshape(x.shape[0], -1) @ weights + bias
  return logits_fn


def test_trades_loss_has_the_closed_form():
  rng = np.random.default_rng(0)
  w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
  x, x_adv = rng.random((5, 4)), rng.random((5, 4))
  targets = np.eye(3)[[0, 1, 2, 1, 0]] * 0.9 + 0.1 / 3  # label-smoothed
  beta = 6.0

  def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
  p, q = softmax(x @ w + b), softmax(x_adv @ w + b)
  expected = -(targets * np.log(p)).sum(1) + beta * (p * np.log(p / q)).sum(1)
  fn = _linear(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))
  clean_logits, adv_logits = fn(jnp.asarray(x, jnp.float32)), fn(jnp.asarray(x_adv, jnp.float32))
  got = trades.trades_loss(clean_logits, adv_logits, jnp.asarray(targets), beta)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # gradients flow through both terms, the clean logits inside the KL included
  grad = jax.grad(lambda z: trades.trades_loss(z, adv_logits, jnp.asarray(targets), beta).sum())(
      clean_logits)
  kl = (p * np.log(p / q)).sum(1, keepdims=True)
  expected_grad = (p - targets) + beta * p * (np.log(p / q) - kl)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def _disagreeing_linear_model():
  """Two classes on 4 pixels, all at 1.0 (the box lets a pixel only go down): the logit
  difference z1 - z0 = log 9 + 7.5 * sum(x - 1), so the model predicts class 1 (p = 0.1, 0.9)
  where the label is 0. The hard-label CE grows with z1 - z0 (blocked by the box: its attack
  stays at x); the KL to the model's own prediction grows as z1 - z0 falls (its attack goes to
  x - eps, the KL's maximum over the ball)."""
  w = jnp.stack([jnp.zeros(4), jnp.full(4, 7.5)], axis=1)
  b = jnp.asarray([0.0, float(np.log(9.0)) - 30.0])
  return _linear(w, b)


def test_trades_inner_attack_maximises_the_kl_to_the_own_prediction_not_the_label_ce():
  fn = _disagreeing_linear_model()
  images = jnp.ones((6, 2, 2, 1), jnp.float32)
  labels = jnp.zeros(6, jnp.int32)
  eps = 0.1
  clean_logits = fn(images)
  np.testing.assert_allclose(jax.nn.softmax(clean_logits)[0], [0.1, 0.9], rtol=1e-5)
  x_kl = trades.kl_attack(fn, images, jax.random.key(0), eps=eps, num_steps=10)
  x_ce = pgd_lib.pgd(fn, images, labels, jax.random.key(0), eps=eps, num_steps=10)
  np.testing.assert_allclose(x_kl, 1.0 - eps, atol=1e-6)  # the KL's maximum over the ball
  np.testing.assert_allclose(x_ce, 1.0, atol=1e-6)        # the label CE's: nowhere to go
  kl_of = lambda x: trades.kl_divergence(clean_logits, fn(x))
  d = np.log(9.0) - 7.5 * 4 * eps  # z1 - z0 at x - eps
  q1 = 1 / (1 + np.exp(-d))
  np.testing.assert_allclose(kl_of(x_kl), 0.1 * np.log(0.1 / (1 - q1)) + 0.9 * np.log(0.9 / q1),
                             rtol=1e-4)
  assert (kl_of(x_kl) > kl_of(x_ce) + 0.1).all()


def test_periodic_entry_attacks_each_threat_domain_with_its_own_threat(monkeypatch):
  """The robust evaluator in a run with threats: a threat's name is its domain, attacked with
  that threat's norm and eps; clean and the soups with the first threat's (mutation: every column
  with the first threat)."""
  from adv_soups import data as data_lib
  from adv_soups.evaluation import requests as requests_lib
  from adv_soups.evaluation import run as run_lib
  from adv_soups.evaluators import robust
  from configs import digits_threats
  config = digits_threats.get_config()
  config.model.num_domains = 3
  columns, labels = robust.parse_domains("clean,linf,l2,0.5", 3, ["linf", "l2"])
  assert labels == ["clean", "linf", "l2", "alpha0.5"] and columns.shape == (4, 3)
  np.testing.assert_allclose(columns[:3], np.eye(3))
  calls = []

  def fake_request(workdir, **kw):
    calls.append((kw["norm"], kw["eps"]))
    return types.SimpleNamespace(dataset="digits", split="test", num_examples=None)
  monkeypatch.setattr(requests_lib, "make_request", fake_request)
  monkeypatch.setattr(run_lib, "batch_rows", lambda *a: 1)
  monkeypatch.setattr(data_lib, "get_spec", lambda name: None)
  entry = dict(attack="pgd", domains="clean,l2,0.5,linf")
  groups = robust._requests("config.evals.val", entry, config, None, None, 0, "")
  assert calls == [("linf", 0.1), ("l2", 0.5)]
  assert [g[1] for g in groups] == [["clean", "alpha0.5", "linf"], ["l2"]]
