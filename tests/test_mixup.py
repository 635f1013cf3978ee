"""Mixup / CutMix (timm's batch mode, inside the train step) and soft targets in the attacks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups.attacks import losses
from adv_soups.attacks.pgd import pgd
from adv_soups.data import mixup

K = 5


def _batch(b=8, size=6):
  # Example i is the constant image (i + 1) / 10: every pixel says where it came from.
  images = jnp.broadcast_to(((jnp.arange(b) + 1) / 10.0)[:, None, None, None], (b, size, size, 3))
  labels = jnp.arange(b) % K
  return images, labels


def test_partner_swaps_adjacent_pairs():
  np.testing.assert_array_equal(mixup.partner(jnp.arange(6)), [1, 0, 3, 2, 5, 4])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_blends_images_and_targets_with_the_same_lam(smoothing):
  images, labels = _batch()
  mixed, targets, lam = mixup.mix_batch(jax.random.key(0), images, labels, num_classes=K,
                                        mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=smoothing)
  lam = float(lam)
  assert 0 < lam < 1
  partner = np.array([1, 0, 3, 2, 5, 4, 7, 6])
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[partner], atol=1e-6)
  one_hot = np.eye(K)[np.asarray(labels)] * (1 - smoothing) + smoothing / K
  np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[partner], atol=1e-6)
  np.testing.assert_allclose(np.sum(targets, -1), 1.0, atol=1e-6)


def test_cutmix_targets_match_the_pasted_area():
  images, labels = _batch(size=16)
  for seed in range(10):
    mixed, targets, lam = mixup.mix_batch(jax.random.key(seed), images, labels, num_classes=K,
                                          mixup_alpha=0.0, cutmix_alpha=1.0)
    pasted = np.mean(np.asarray(mixed) != np.asarray(images), axis=(1, 2, 3))
    np.testing.assert_allclose(pasted, 1 - float(lam), atol=1e-6)  # the area from the partner
    own = np.eye(K)[np.asarray(labels)]
    partner = own[[1, 0, 3, 2, 5, 4, 7, 6]]
    np.testing.assert_allclose(targets, float(lam) * own + (1 - float(lam)) * partner, atol=1e-6)
    np.testing.assert_allclose(np.sum(targets, -1), 1.0, atol=1e-6)
    # Every pixel is either the example's own or its partner's (no blending).
    values = np.unique(np.asarray(mixed[0]))
    assert np.isclose(values[:, None], [0.1, 0.2]).any(axis=1).all()


def test_mixup_and_cutmix_switch_per_batch_with_probability_half():
  images, labels = _batch()
  fn = jax.jit(lambda k: mixup.mix_batch(k, images, labels, num_classes=K, mixup_alpha=0.8,
                                         cutmix_alpha=1.0, switch_prob=0.5)[0])
  own, other = np.asarray(images), np.asarray(images)[[1, 0, 3, 2, 5, 4, 7, 6]]
  n, cutmix = 100, 0
  for seed in range(n):
    mixed = np.asarray(fn(jax.random.key(seed)))
    cutmix += bool(np.all(np.isclose(mixed, own) | np.isclose(mixed, other)))  # no blending
  assert 0.3 * n < cutmix < 0.7 * n


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="mixup_alpha"):
    mixup.check_settings(-0.1, 1.0, 0.5)
  with pytest.raises(ValueError, match="switch_prob"):
    mixup.check_settings(0.8, 1.0, 1.5)


def _linear_model(seed=0, dim=6 * 6 * 3):
  w = jax.random.normal(jax.random.key(seed), (dim, K)) * 0.3
  return lambda x: x.reshape(x.shape[0], -1) @ w


def test_pgd_with_one_hot_soft_targets_follows_the_int_label_iterates():
  """For l_inf PGD only the gradient's sign matters, and CE and log CE share it: one-hot soft
  targets give exactly the int-label attack."""
  images, labels = _batch()
  logits_fn = _linear_model()
  kw = dict(eps=0.05, num_steps=5)
  x_int = pgd(logits_fn, images, labels, jax.random.key(1), **kw)
  x_soft = pgd(logits_fn, images, jax.nn.one_hot(labels, K), jax.random.key(1), **kw)
  np.testing.assert_array_equal(x_soft, x_int)


def test_pgd_raises_the_soft_target_loss():
  images, labels = _batch()
  _, targets, _ = mixup.mix_batch(jax.random.key(0), images, labels, num_classes=K,
                                  mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.1)
  logits_fn = _linear_model()
  x_adv = pgd(logits_fn, images, targets, jax.random.key(2), eps=0.05, num_steps=5)
  before = losses.soft_ce_loss(logits_fn(images), targets)
  after = losses.soft_ce_loss(logits_fn(x_adv), targets)
  assert np.all(np.asarray(after) > np.asarray(before))
  assert float(jnp.max(jnp.abs(x_adv - images))) <= 0.05 + 1e-6
  with pytest.raises(ValueError, match="soft-target"):
    pgd(logits_fn, images, targets, jax.random.key(2), eps=0.05, num_steps=5, loss="dlr")
