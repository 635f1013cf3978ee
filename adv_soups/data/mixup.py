"""Mixup and CutMix inside the train step (timm's `Mixup` in batch mode, DeiT's values 0.8 / 1.0).

`mix_batch(rng, images, labels, ...)` returns the mixed images and their soft targets. Per call
(one call per train step, so one draw per global batch, as timm draws one per batch): with both
alphas > 0, CutMix with probability `switch_prob`, else mixup; lam ~ Beta(alpha, alpha) of the
chosen one. Mixup: x' = lam x + (1 - lam) x_partner. CutMix: a box of area fraction ~1 - lam
(side sqrt(1 - lam) of each dimension, centre uniform over the image, clipped to it) is pasted
from the partner, and lam becomes the area actually kept (timm's `correct_lam`). Targets:
lam * smooth(y) + (1 - lam) * smooth(y_partner), with timm's label smoothing (off = s / K,
on = 1 - s + s / K), which equals smoothing the mixed one-hot targets.

Where the partner comes from (our choice): example 2i is paired with 2i + 1 of the global batch
(and vice versa). The pairs never straddle a device or process boundary as long as each device
holds an even number of examples (checked by `adv_soups.training.resolve_config`), so mixing moves
no data between devices, and the result does not depend on the device or process count: it is a
function of (seed, step) and the global batch alone. (timm pairs i with B - 1 - i of its batch;
which partner is used makes no difference to the distribution of the pairs.)

Why in the step rather than in tf.data: the pairing then does not depend on how the global batch
is split into process-local batches, the per-step randomness comes from the train state's RNG
(checkpointed, so resume is exact), and the pipeline keeps shipping int labels (4 bytes per image
instead of K floats). The cost is a few elementwise ops on device.

In co-training both branches see the same mixed images and PGD maximises the soft-target loss
(our choice: the paper is silent on mixup).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def enabled(mixup_config) -> bool:
  """True when `config.data.mixup` has a positive mixup or CutMix alpha."""
  if mixup_config is None:
    return False
  return (mixup_config.get("mixup_alpha", 0.0) or 0.0) > 0 or \
      (mixup_config.get("cutmix_alpha", 0.0) or 0.0) > 0


def check_settings(mixup_alpha: float, cutmix_alpha: float, switch_prob: float) -> None:
  """ValueError (one line) for a bad setting."""
  for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
    if not value >= 0:
      raise ValueError(f"config.data.mixup.{name}={value} must be >= 0 (0 = off)")
  if not 0 <= switch_prob <= 1:
    raise ValueError(f"config.data.mixup.switch_prob={switch_prob} is outside [0, 1]")


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """int labels [B] -> float32 [B, K]: 1 - s + s / K on the label, s / K elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def partner(x: jax.Array) -> jax.Array:
  """x [B, ...] with each pair (2i, 2i + 1) swapped (B even)."""
  pairs = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return pairs[:, ::-1].reshape(x.shape)


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> jax.Array:
  """bool [H, W], True inside timm's CutMix box for lam: cut = sqrt(1 - lam) of each side,
  int(H * cut) x int(W * cut) centred on a uniform pixel, clipped to the image."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
              mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
              smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mixup or CutMix of a batch with its pair partners (see the module docstring).

  Args:
    rng: a PRNG key (one per step).
    images: float32 [B, H, W, C] in [0, 1], B even.
    labels: int [B].
    num_classes: K.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 turns that one off (not both).
    switch_prob: probability of CutMix when both are on.
    smoothing: label smoothing s in [0, 1).
  Returns:
    (mixed images float32 [B, H, W, C] in [0, 1], soft targets float32 [B, K] summing to 1,
     lam float32 []: the weight of each example's own image / label).
  """
  if not (mixup_alpha > 0 or cutmix_alpha > 0):
    raise ValueError("mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0")
  k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 4)
  other = partner(images)
  height, width = images.shape[1], images.shape[2]

  def mixup():
    lam = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha)
    return lam * images + (1.0 - lam) * other, lam

  def cutmix():
    lam = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha)
    box = cutmix_box(k_box, lam, height, width)
    kept = 1.0 - jnp.mean(box.astype(jnp.float32))
    return jnp.where(box[None, :, :, None], other, images), kept

  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    mixed, lam = jax.lax.cond(use_cutmix, cutmix, mixup)
  elif cutmix_alpha > 0:
    mixed, lam = cutmix()
  else:
    mixed, lam = mixup()
  lam = lam.astype(jnp.float32)
  own = smooth_one_hot(labels, num_classes, smoothing)
  targets = lam * own + (1.0 - lam) * partner(own)
  return mixed.astype(images.dtype), targets, lam
