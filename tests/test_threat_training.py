"""Multi-threat co-training: the rows of a step, each threat's attack against its own adapter,
and the objective (CE and TRADES)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adv_soups import threats as threats_lib
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import trades
from adv_soups.models import create_model, init_params
from adv_soups.training import threat_rows


def _threats(**entries):
  config = ml_collections.ConfigDict(dict(threats=threats_lib.ordered(entries)))
  return threats_lib.resolve(config)


@pytest.fixture(scope="module")
def three_domains():
  config = ml_collections.ConfigDict(dict(variant="tiny/4", num_classes=5, adapter="token",
                                          num_domains=3, image_size=8, depth=1, width=32,
                                          num_heads=2, mlp_dim=64))
  model = create_model(config)
  params = init_params(model, jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = treedef.unflatten([x + 0.5 * jax.random.normal(k, x.shape, x.dtype)
                              for x, k in zip(leaves, keys)])
  images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  labels = jnp.asarray([0, 1, 2, 3])

  def logits_fn_of(d):
    return lambda x: model.apply({"params": params}, x, jnp.full((x.shape[0],), d, jnp.int32))
  return model, params, images, labels, logits_fn_of


def test_layout_of_ce_and_trades_threats():
  rows = threat_rows.layout(_threats(linf=dict(norm="linf", eps=0.1),
                                     l2=dict(norm="l2", eps=0.5, loss="trades")))
  assert rows.domains == (0, 1, 2, 2)
  assert rows.sources == (-1, 0, -1, 1)
  assert rows.threat_rows == ((None, 1), (2, 3))
  single = threat_rows.layout(_threats(l2=dict(norm="l2", eps=0.5, loss="trades")), cotrain=False)
  assert single.domains == (0, 0) and single.sources == (-1, 0)


def test_each_threat_is_crafted_against_its_own_adapter(three_domains):
  _, _, images, labels, logits_fn_of = three_domains
  threats = _threats(a=dict(norm="linf", eps=0.05, num_steps=3),
                     b=dict(norm="linf", eps=0.05, num_steps=3))
  rows = threat_rows.layout(threats)
  rng = jax.random.key(3)
  x_a, x_b = jax.jit(lambda im, lb: threat_rows.craft(logits_fn_of, im, lb, rng, threats,
                                                      jnp.int32(0), rows))(images, labels)
  settings = dict(eps=0.05, num_steps=3, step_size=2.5 * 0.05 / 3, norm="linf")
  own_a = pgd_lib.pgd(logits_fn_of(1), images, labels, rng, **settings)
  own_b = pgd_lib.pgd(logits_fn_of(2), images, labels, jax.random.fold_in(rng, 1), **settings)
  shared_b = pgd_lib.pgd(logits_fn_of(1), images, labels, jax.random.fold_in(rng, 1), **settings)
  np.testing.assert_allclose(x_a, own_a, atol=1e-6)
  np.testing.assert_allclose(x_b, own_b, atol=1e-6)
  # same settings and keys, other adapter: another attack (so the check above can fail)
  assert np.abs(np.asarray(shared_b) - np.asarray(own_b)).max() > 1e-3


def test_trades_threat_crafts_with_the_kl_attack():
  """On a linear model whose prediction disagrees with the label, the TRADES threat's examples
  are the KL's maximiser (x - eps), where the label-CE attack would stay at x."""
  w = jnp.stack([jnp.zeros(4), jnp.full(4, 7.5)], axis=1)
  b = jnp.asarray([0.0, float(np.log(9.0)) - 30.0])
  fn = lambda x: x.reshape(x.shape[0], -1) @ w + b
  threats = _threats(t=dict(norm="linf", eps=0.1, num_steps=10, loss="trades"),
                     c=dict(norm="linf", eps=0.1, num_steps=10))
  images = jnp.ones((3, 2, 2, 1))
  x_t, x_c = threat_rows.craft(lambda d: fn, images, jnp.zeros(3, jnp.int32), jax.random.key(0),
                               threats, jnp.int32(0), threat_rows.layout(threats))
  np.testing.assert_allclose(x_t, 0.9, atol=1e-6)
  np.testing.assert_allclose(x_c, 1.0, atol=1e-6)


def test_eps_warmup_scales_each_threat_on_its_own():
  threats = _threats(a=dict(norm="linf", eps=0.1, eps_warmup_steps=10),
                     b=dict(norm="l2", eps=0.5))
  eps_a, step_a = threat_rows.schedule(threats["a"], jnp.int32(5))
  eps_b, _ = threat_rows.schedule(threats["b"], jnp.int32(5))
  np.testing.assert_allclose([eps_a, step_a], [0.05, 0.5 * threats["a"]["step_size"]], rtol=1e-6)
  assert eps_b == 0.5


def test_objective_sums_clean_ce_and_each_threats_weighted_loss():
  threats = _threats(linf=dict(norm="linf", eps=0.1, weight=0.5),
                     l2=dict(norm="l2", eps=0.5, loss="trades", beta=3.0, weight=2.0))
  rows = threat_rows.layout(threats)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2 * rows.num_rows, 5)), jnp.float32)
  targets = jax.nn.one_hot(jnp.asarray([1, 4]), 5)
  loss, parts = threat_rows.losses(logits, targets, rows, threats, clean_weight=0.7)
  z = logits.reshape(2, rows.num_rows, 5)
  ce = lambda r: optax.softmax_cross_entropy(z[:, r], targets)
  tr = trades.trades_loss(z[:, 2], z[:, 3], targets, 3.0)
  np.testing.assert_allclose(loss, (0.7 * ce(0) + 0.5 * ce(1) + 2.0 * tr).sum() / 2, rtol=1e-6)
  np.testing.assert_allclose(parts["l2"], tr, rtol=1e-6)
  np.testing.assert_allclose(parts["linf"], ce(1), rtol=1e-6)
