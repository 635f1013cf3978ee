"""TRADES (Zhang et al. 2019): its per-example loss and its inner attack, as pure functions.

For a model f (logits) and soft or hard targets y:

  loss(x, x_adv) = CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv))

and x_adv maximises the KL term alone over the eps ball around x, i.e. it moves the prediction
away from the model's own clean prediction p = softmax f(x), not from the label. Since
KL(p || q) = CE(q; p) - H(p) and H(p) does not depend on x_adv, maximising the KL is PGD on the
soft-target cross-entropy with target p (held fixed during the attack), which `pgd.pgd` already
does for soft targets; the start is random because the KL's gradient is 0 at x_adv = x.
In training, gradients flow through both terms (through f(x) inside the KL too), as in TRADES.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from adv_soups.attacks import pgd as pgd_lib


def kl_divergence(clean_logits: jax.Array, adv_logits: jax.Array) -> jax.Array:
  """KL(softmax(clean_logits) || softmax(adv_logits)) per example: [B, K], [B, K] -> [B] (nats)."""
  log_p = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
  log_q = jax.nn.log_softmax(adv_logits.astype(jnp.float32))
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def trades_loss(clean_logits: jax.Array, adv_logits: jax.Array, targets: jax.Array,
                beta: float) -> jax.Array:
  """TRADES per example [B]: CE(clean_logits, targets) + beta * KL(clean || adv).

  clean_logits, adv_logits: [B, K]; targets: soft targets [B, K] (rows summing to 1: one-hot,
  label-smoothed or mixup's). Differentiable in both logits.
  """
  log_p = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
  ce = -jnp.sum(targets.astype(jnp.float32) * log_p, axis=-1)
  return ce + beta * kl_divergence(clean_logits, adv_logits)


def kl_attack(logits_fn: pgd_lib.LogitsFn, images: jax.Array, rng: jax.Array, *, eps: float,
              num_steps: int, step_size: float | None = None, norm: str = "linf",
              example_index: jax.Array | None = None) -> jax.Array:
  """TRADES' inner maximisation: x_adv [B, H, W, C] in the eps ball around `images` (and in
  [0, 1]) maximising KL(softmax f(images) || softmax f(x_adv)), by PGD from a random start
  (keyed per example as in `pgd.pgd`). Labels are not used. Only the input is differentiated."""
  clean = lax.stop_gradient(jax.nn.softmax(logits_fn(images).astype(jnp.float32)))
  return pgd_lib.pgd(logits_fn, images, clean, rng, eps=eps, num_steps=num_steps,
                     step_size=step_size, norm=norm, loss="ce", random_start=True,
                     example_index=example_index)
