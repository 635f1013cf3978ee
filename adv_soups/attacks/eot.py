"""Randomised models: per-example keys for their randomness, and expectation over
transformation (EOT) for APGD (AutoAttack's version='rand': APGD-CE and APGD-DLR, 20 draws).

A randomised model here is `rand_logits_fn(images [B, ...], keys [B]) -> logits [B, K]` whose
randomness (dropout at evaluation, random input transformations) for example i comes from
keys[i] alone (so apply the model per example, under vmap: Flax's Dropout draws one mask for the
whole batch). Every key derives from the example's own key (its global index), so a result does
not depend on the batch the example sits in, on the sharding, or on how the runner regroups rows.

  - `input_keys(keys, images)`: the key of one forward pass = fold_in(example key, a hash of
    the example's input). An attack that knows nothing of the randomness (the standard version)
    sees a fresh draw at every new point it queries, and the same number twice for the same point
    (the final re-scoring pass too is keyed this way).
  - `eot_state_factory`: APGD's `state_fn` for EOT: at iterate i of restart r, draw d of example
    j uses fold_in(fold_in(fold_in(key_j, r), i + 1), d); the gradient is the mean of the draws'
    input gradients (AutoAttack's `eot_iter`), the loss the mean of their losses (AutoAttack keeps
    the last draw's), and an iterate counts as misclassified by draw 0's prediction.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adv_soups.attacks import pgd as pgd_lib

DEFAULT_DRAWS = 20  # AutoAttack's eot_iter in version='rand'


def check_draws(draws) -> int:
  """The number of EOT draws as an int >= 1; ValueError (one line) otherwise."""
  if isinstance(draws, bool) or int(draws) != draws or draws < 1:
    raise ValueError(f"the number of EOT draws must be an integer >= 1, got {draws}")
  return int(draws)


def input_hash(images: jax.Array) -> jax.Array:
  """A per-example uint32 hash [B] of the float32 bits of images [B, ...] (a fixed random
  linear combination mod 2^32: any change of a pixel changes it)."""
  flat = images.reshape(images.shape[0], -1).astype(jnp.float32)
  bits = lax.bitcast_convert_type(flat, jnp.uint32)
  mult = np.random.default_rng(12345).integers(1, 2 ** 32, size=flat.shape[-1], dtype=np.uint64)
  mult = jnp.asarray((mult | 1).astype(np.uint32))
  return jnp.sum(bits * mult, axis=-1, dtype=jnp.uint32)


def input_keys(keys: jax.Array, images: jax.Array) -> jax.Array:
  """Per-example keys [B] of one forward pass: fold_in(keys[i], input_hash(images)[i])."""
  return jax.vmap(jax.random.fold_in)(keys, input_hash(images))


def eot_state_factory(rand_logits_fn, keys: jax.Array, draws: int):
  """An APGD `state_factory` (see `apgd.apgd`) averaging over `draws` draws of a randomised
  model. rand_logits_fn(images, keys [B]) -> logits; keys [B]: the examples' own keys."""
  draws = check_draws(draws)

  def factory(logits_fn, loss_fn, labels, targets, restart):
    del logits_fn  # the randomised model replaces it

    def state_fn(xa, i):
      def one(carry, d):
        ks = jax.vmap(lambda k: jax.random.fold_in(
            jax.random.fold_in(jax.random.fold_in(k, restart), i + 1), d))(keys)
        logits, loss, g = pgd_lib.loss_and_input_grad(
            lambda z: rand_logits_fn(z, ks), loss_fn, xa, labels, targets)
        return (carry[0] + loss, carry[1] + g), jnp.argmax(logits, axis=-1) != labels
      zero = (jnp.zeros(xa.shape[:1], jnp.float32), jnp.zeros_like(xa))
      (loss, g), wrong = lax.scan(one, zero, jnp.arange(draws))
      return wrong[0], loss / draws, g / draws
    return state_fn
  return factory


def per_example_apply(model, params, images, domain, keys, class_index=None):
  """Logits [B, K] of a flax model with its randomness on (train=True: dropout, drop path),
  applied to each example alone with its own dropout key. images [B, H, W, C], domain [B] or
  [B, D] (or None), keys [B]; class_index: optional subset of the logits (e.g. ImageNet-R)."""
  def one(x, d, k):
    logits = model.apply({"params": params}, x[None], None if d is None else d[None],
                         train=True, rngs={"dropout": k})[0]
    return logits if class_index is None else jnp.take(logits, class_index, axis=-1)
  if domain is None:
    return jax.vmap(lambda x, k: one(x, None, k))(images, keys)
  return jax.vmap(one)(images, domain, keys)
