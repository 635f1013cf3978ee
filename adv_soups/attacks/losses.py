"""Per-example attack losses, all written as quantities the attacker *maximises*.

Every function maps logits [B, C] (float) and int labels [B] (and targets [B] where targeted) to a
per-example loss [B] float32. The attacks take the gradient of the *sum* of these w.r.t. the input;
examples are independent, so that is each example's own gradient.

Definitions (Carlini & Wagner 2017 for the margin; Croce & Hein 2020 for DLR), z = logits,
pi = the class indices sorted by decreasing logit:
  ce               log CE(z, y)  (`log_ce_loss`)                  untargeted
  ce (targeted)    -log CE(z, t) (`targeted_ce_loss`)             move toward t
  margin           max_{j != y} z_j - z_y                          untargeted CW
  margin (target.) z_t - max_{j != t} z_j                          targeted CW
  dlr              -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)          needs C >= 3
  dlr (targeted)   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)         needs C >= 4

Why log CE for the "ce" attack loss: in float32 the plain CE of a confident example is exactly 0
once the margin is ~17 (and its input gradient 0 at ~88), so a CE attack on a confident model
stalls. With t = logsumexp_{j != y} z_j - z_y, CE = softplus(t), and
  log CE = t                      for t < -20   (softplus(t) = e^t (1 + O(e^t)))
           log(softplus(t))       otherwise,
computed this way never saturates (its gradient w.r.t. t is ~1 for very negative t). It is a
monotone transform of CE: PGD (which uses only the gradient's direction) and APGD (which only
compares loss values) follow the same iterates wherever CE does not saturate. `ce_loss` stays the
plain CE (for training and reporting).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["LOSSES", "ce_loss", "check_loss", "dlr_loss", "get_loss", "log_ce_loss",
           "margin_loss", "soft_ce_loss", "targeted_ce_loss", "targeted_dlr_loss",
           "targeted_margin_loss"]

LOSSES = ("ce", "margin", "dlr")
_DLR_DENOM_EPS = 1e-12


def _onehot(labels: jax.Array, num_classes: int) -> jax.Array:
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _max_other(logits: jax.Array, onehot: jax.Array) -> jax.Array:
  """max_{j != y} z_j per example [B] (the label's own logit is masked out)."""
  return jnp.max(jnp.where(onehot > 0, -jnp.inf, logits), axis=-1)


def ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy per example: logits [B, C], labels [B] int -> [B]."""
  logits = logits.astype(jnp.float32)
  return -jnp.sum(_onehot(labels, logits.shape[-1]) * jax.nn.log_softmax(logits), axis=-1)


def soft_ce_loss(logits: jax.Array, soft_targets: jax.Array) -> jax.Array:
  """Cross-entropy with soft targets per example: logits [B, C], targets [B, C] (rows summing to
  1, e.g. mixup's) -> [B]. The attacks' "ce" loss for soft targets: the training loss itself (not
  log CE: with label smoothing or mixed targets it does not saturate; a one-hot soft target gives
  plain CE, which does)."""
  logits = logits.astype(jnp.float32)
  return -jnp.sum(soft_targets.astype(jnp.float32) * jax.nn.log_softmax(logits), axis=-1)


def _log_softplus(t: jax.Array) -> jax.Array:
  """log(softplus(t)) [B], without underflow: = t below -20 (continuous there, error < 1e-8)."""
  cut = -20.0
  return jnp.where(t < cut, t, jnp.log(jax.nn.softplus(jnp.maximum(t, cut))))


def _lse_other_minus_own(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """t = logsumexp_{j != y} z_j - z_y per example [B] (CE(z, y) = softplus(t))."""
  logits = logits.astype(jnp.float32)
  oh = _onehot(labels, logits.shape[-1])
  other = jax.nn.logsumexp(jnp.where(oh > 0, -jnp.inf, logits), axis=-1)
  return other - jnp.sum(oh * logits, axis=-1)


def log_ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """log CE(z, y) per example [B], non-saturating: the untargeted "ce" attack loss."""
  return _log_softplus(_lse_other_minus_own(logits, labels))


def margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CW margin max_{j != y} z_j - z_y per example: logits [B, C], labels [B] -> [B] (> 0: wrong)."""
  logits = logits.astype(jnp.float32)
  oh = _onehot(labels, logits.shape[-1])
  return _max_other(logits, oh) - jnp.sum(oh * logits, axis=-1)


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Difference-of-logits-ratio loss (untargeted) per example: [B, C], [B] -> [B]. Needs C >= 3."""
  logits = logits.astype(jnp.float32)
  srt = jnp.sort(logits, axis=-1)  # ascending: srt[:, -1] is pi1
  return margin_loss(logits, labels) / (srt[:, -1] - srt[:, -3] + _DLR_DENOM_EPS)


def targeted_ce_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """-log CE(z, t) per example [B] (non-saturating); maximising it moves the prediction toward
  `targets` [B]."""
  del labels
  return -log_ce_loss(logits, targets)


def targeted_margin_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted CW margin z_t - max_{j != t} z_j per example [B]."""
  del labels
  return -margin_loss(logits, targets)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) per example [B]. Needs C >= 4."""
  logits = logits.astype(jnp.float32)
  c = logits.shape[-1]
  z_y = jnp.sum(_onehot(labels, c) * logits, axis=-1)
  z_t = jnp.sum(_onehot(targets, c) * logits, axis=-1)
  srt = jnp.sort(logits, axis=-1)
  denom = srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + _DLR_DENOM_EPS
  return -(z_y - z_t) / denom


def check_loss(loss: str, num_classes: int | None, targeted: bool) -> None:
  """Raises ValueError for an unknown loss name or too few classes for DLR (None: unknown C)."""
  if loss not in LOSSES:
    raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
  if loss == "dlr" and num_classes is not None:
    need = 4 if targeted else 3
    if num_classes < need:
      kind = "targeted DLR" if targeted else "DLR"
      raise ValueError(f"{kind} needs >= {need} classes, got num_classes={num_classes}")


def get_loss(loss: str, targeted: bool) -> Callable[..., jax.Array]:
  """The per-example loss `fn(logits [B, C], labels [B], targets [B]) -> [B]` to maximise."""
  check_loss(loss, None, targeted)
  if targeted:
    return {"ce": targeted_ce_loss, "margin": targeted_margin_loss,
            "dlr": targeted_dlr_loss}[loss]
  fn = {"ce": log_ce_loss, "margin": margin_loss, "dlr": dlr_loss}[loss]
  return lambda logits, labels, targets: fn(logits, labels)
