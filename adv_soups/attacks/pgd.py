"""Projected gradient descent (Madry et al. 2018), l_inf and l_2, and the pieces APGD shares.

An attack is a pure function of `logits_fn(images [B, H, W, C]) -> logits [B, K]` and a batch.
Only the input is differentiated (the gradient of the summed per-example loss w.r.t. the images;
examples are independent), so the model's parameters are constants to the attack: no parameter
gradient is ever built. Every iterate is projected onto the eps ball around the clean image and
onto the pixel box [0, 1]. The iterations are one `lax.fori_loop` (restarts one `lax.scan`), so
under `jax.jit` an attack compiles once per input shape; nothing syncs with the host, and the
functions work inside `jax.jit`, `jax.vmap` and `jax.shard_map`.

Random starts are keyed per example: example i of the batch uses `fold_in(rng, index[i])`, where
`index` defaults to `arange(B)` (pass the global index as `example_index` under `shard_map`), and
restart r uses `fold_in(fold_in(rng, index[i]), r)`. So sharding a batch does not change them.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adv_soups.attacks import losses as losses_lib

NORMS = ("linf", "l2")  # PGD's (and training's) norms
ALL_NORMS = ("linf", "l2", "l1")  # evaluation: APGD, FAB-T and Square also have l_1 forms
LogitsFn = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def is_concrete(x: Any) -> bool:
  """True when `x` is a concrete value (not a tracer under jit / vmap / grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_settings(*, eps: Any, norm: str, num_steps: int, restarts: int = 1,
                   loss: str | None = None, norms: tuple[str, ...] = NORMS) -> None:
  """Raises ValueError for a bad eps / norm / num_steps / restarts / loss (data-free checks);
  `norms`: the norms the caller has (PGD: l_inf and l_2; APGD, FAB-T, Square: `ALL_NORMS`)."""
  if norm not in norms:
    raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(norms)}")
  if is_concrete(eps):
    e = float(eps)
    if not e >= 0:  # also rejects NaN
      raise ValueError(f"eps must be >= 0, got eps={e}")
    if norm == "linf" and e > 1:
      raise ValueError(f"l_inf eps must be in [0, 1] (pixels are in [0, 1]), got eps={e}")
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got num_steps={num_steps}")
  if int(restarts) != restarts or restarts < 1:
    raise ValueError(f"restarts must be an integer >= 1, got restarts={restarts}")
  if loss is not None:
    losses_lib.check_loss(loss, None, False)


def check_data(images: Any, labels: Any, num_classes: int | None = None,
               targets: Any = None) -> None:
  """Raises ValueError for images outside [0, 1] or labels / targets outside [0, num_classes).

  Each check runs only where the value is concrete (not a tracer).
  """
  # numpy, not jnp: under a jit trace jnp would stage even a concrete (closed-over) array.
  if is_concrete(images) and np.size(images):
    images = np.asarray(images)
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
      raise ValueError(f"images must be in [0, 1], got values in [{lo}, {hi}]")
  for name, arr in (("labels", labels), ("targets", targets)):
    if arr is None or not is_concrete(arr) or not np.size(arr) or num_classes is None:
      continue
    arr = np.asarray(arr)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_classes:
      raise ValueError(f"{name} must be in [0, {num_classes}), got values in [{lo}, {hi}]")


def num_classes_of(logits_fn: LogitsFn, images: jax.Array) -> int:
  """The number of classes K of `logits_fn` (shape inference only, no computation)."""
  return int(jax.eval_shape(logits_fn, images).shape[-1])


def validate(logits_fn: LogitsFn, images, labels, targets, *, eps, norm, num_steps, restarts,
             loss, step_size=None, norms: tuple[str, ...] = NORMS) -> int | None:
  """All argument checks of pgd / apgd; returns the number of classes (None if not needed)."""
  check_settings(eps=eps, norm=norm, num_steps=num_steps, restarts=restarts, loss=loss,
                 norms=norms)
  if step_size is not None and is_concrete(step_size) and not float(step_size) >= 0:
    raise ValueError(f"step_size must be >= 0, got step_size={float(step_size)}")
  if jnp.ndim(images) < 2:
    raise ValueError(f"images must be [B, ...], got shape {jnp.shape(images)}")
  num_classes = None
  need_c = loss == "dlr" or any(
      a is not None and is_concrete(a) for a in (labels, targets))
  if need_c:
    num_classes = num_classes_of(logits_fn, images)
    losses_lib.check_loss(loss, num_classes, targets is not None)
  check_data(images, labels, num_classes, targets)
  return num_classes


# ---------------------------------------------------------------------------------------------
# Geometry: norms, projection, random starts
# ---------------------------------------------------------------------------------------------
def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Per-example [B] values reshaped to broadcast against x [B, ...]."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def l2_norm(x: jax.Array) -> jax.Array:
  """Per-example l_2 norm: x [B, ...] -> [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def project(x_adv: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """Projects x_adv [B, ...] onto {|x_adv - x|_norm <= eps} and then clips to [0, 1].

  Clipping to the box never increases |x_adv - x| coordinate-wise (x is in [0, 1]), so the result
  is inside both sets (up to float rounding, ~1e-7).
  """
  if norm == "linf":
    x_adv = jnp.clip(x_adv, x - eps, x + eps)
  else:
    d = x_adv - x
    n = l2_norm(d)
    scale = jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))
    x_adv = x + d * _bcast(scale, d)
  return jnp.clip(x_adv, 0.0, 1.0)


def ascent_direction(g: jax.Array, norm: str) -> jax.Array:
  """Steepest-ascent direction of unit norm: sign(g) for l_inf, g / |g|_2 for l_2. [B, ...]."""
  if norm == "linf":
    return jnp.sign(g)
  return g / _bcast(jnp.maximum(l2_norm(g), 1e-12), g)


def example_keys(rng: jax.Array, index: jax.Array, restart: Any = None) -> jax.Array:
  """Per-example keys [B]: fold_in(rng, index[i]), then fold_in(., restart) if given."""
  def one(i):
    k = jax.random.fold_in(rng, i)
    return k if restart is None else jax.random.fold_in(k, restart)
  return jax.vmap(one)(index)


def random_start(keys: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """A random point of the eps ball around x (uniform in the l_inf cube / the l_2 ball), in [0, 1].

  keys [B] (one per example), x [B, ...] -> [B, ...].
  """
  shape = x.shape[1:]
  if norm == "linf":
    noise = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0))(keys)
    delta = eps * noise
  else:
    dim = 1
    for s in shape:
      dim *= s

    def one(k):
      k1, k2 = jax.random.split(k)
      g = jax.random.normal(k1, shape, jnp.float32)
      r = jax.random.uniform(k2, (), jnp.float32) ** (1.0 / dim)
      return g / jnp.maximum(jnp.sqrt(jnp.sum(g * g)), 1e-12) * r
    delta = eps * jax.vmap(one)(keys)
  return project(x + delta, x, eps, norm)


# ---------------------------------------------------------------------------------------------
# Loss and input gradient
# ---------------------------------------------------------------------------------------------
def loss_and_input_grad(logits_fn: LogitsFn, loss_fn, x, labels, targets):
  """Logits [B, K], per-example loss [B] and d(sum of loss)/dx [B, ...] at x.

  One forward and one backward pass; only x is differentiated (`jax.vjp` of logits_fn at x).
  """
  logits, vjp_model = jax.vjp(logits_fn, x)
  per_ex, vjp_loss = jax.vjp(lambda z: loss_fn(z, labels, targets), logits)
  (dlogits,) = vjp_loss(jnp.ones_like(per_ex))
  (g,) = vjp_model(dlogits.astype(logits.dtype))
  return logits, per_ex, g


def select_better(new, old):
  """Per-example choice between two attack results (x, success [B], loss [B]).

  Prefers a successful result (the old one when both are), else the higher loss.
  """
  x_n, s_n, l_n = new
  x_o, s_o, l_o = old
  take = (s_n & ~s_o) | (~s_n & ~s_o & (l_n > l_o))
  return (jnp.where(_bcast(take, x_n), x_n, x_o), s_n | s_o, jnp.where(take, l_n, l_o))


def _default_index(images, example_index):
  if example_index is None:
    return jnp.arange(images.shape[0], dtype=jnp.int32)
  return example_index


# ---------------------------------------------------------------------------------------------
# PGD
# ---------------------------------------------------------------------------------------------
def pgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, rng: jax.Array, *,
        eps: float, num_steps: int, step_size: float | None = None, norm: str = "linf",
        loss: str = "ce", random_start: bool = True, restarts: int = 1,
        targets: jax.Array | None = None, example_index: jax.Array | None = None) -> jax.Array:
  """PGD-k adversarial examples: x_{t+1} = Proj(x_t + step_size * dir(grad_x loss(x_t))).

  Args:
    logits_fn: images [B, H, W, C] float32 -> logits [B, K]. Parameters are closed over (or
      constants): the attack differentiates only its input.
    images: [B, H, W, C] float32 in [0, 1].
    labels: [B] int in [0, K), or soft targets [B, K] float (rows summing to 1, e.g. mixup's);
      soft targets need loss "ce" and no `targets`, and the attack then maximises the soft-target
      cross-entropy (`losses.soft_ce_loss`; restarts count a success as argmax != argmax(labels)).
    rng: a PRNG key; example i starts from `fold_in(rng, example_index[i])`.
    eps: radius of the threat model, in pixel units ([0, 1] for l_inf, >= 0 for l_2).
    num_steps: k >= 1 gradient steps.
    step_size: per-step length (pixel units, in the norm's own sense). Default 2.5 * eps / k, the
      common practice of Madry et al. (2018) and the project's training default.
    norm: "linf" (steps along sign(grad)) or "l2" (steps along grad / |grad|_2).
    loss: "ce" (as log CE, which does not saturate in float32), "margin" (Carlini-Wagner) or
      "dlr" (Croce & Hein 2020); see `losses`.
    random_start: start from a uniform point of the eps ball (else from the clean image).
    restarts: >= 1 independent random starts; each example keeps its worst result: a
      successful one if any (the first), else the one with the highest final loss.
    targets: optional [B] int; makes the attack targeted (the loss then pulls toward `targets`:
      -log CE to the target, the target's CW margin, or targeted DLR). Success then means predicting
      the target; untargeted success means any wrong prediction.
    example_index: optional [B] int global index of each example (default arange(B)); give it
      when calling on a shard inside `shard_map` so random starts match the unsharded run.

  Returns:
    Adversarial images [B, H, W, C] float32, inside the eps ball around `images` and in [0, 1].
  """
  soft = jnp.ndim(labels) == 2
  if soft and (loss != "ce" or targets is not None):
    raise ValueError(f"soft-target labels {jnp.shape(labels)} need loss 'ce' and no targets, got "
                     f"loss={loss!r}, targets={'given' if targets is not None else None}")
  validate(logits_fn, images, None if soft else labels, targets, eps=eps, norm=norm,
           num_steps=num_steps, restarts=restarts, loss=loss, step_size=step_size)
  x = jnp.asarray(images, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)
  step = 2.5 * eps / num_steps if step_size is None else jnp.asarray(step_size, jnp.float32)
  if soft:
    loss_fn = lambda logits, soft_targets, _: losses_lib.soft_ce_loss(logits, soft_targets)
  else:
    loss_fn = losses_lib.get_loss(loss, targets is not None)
  index = _default_index(x, example_index)
  x = lax.stop_gradient(x)

  def one_run(restart):
    if random_start:
      x0 = random_start_fn(example_keys(rng, index, restart), x, eps, norm)
    else:
      x0 = x

    def body(_, xa):
      _, _, g = loss_and_input_grad(logits_fn, loss_fn, xa, labels, targets)
      return project(xa + step * ascent_direction(g, norm), x, eps, norm)
    return lax.fori_loop(0, num_steps, body, x0)

  if restarts == 1:
    return one_run(0)

  def evaluate(xa):
    logits = logits_fn(xa)
    pred = jnp.argmax(logits, axis=-1)
    truth = jnp.argmax(labels, axis=-1) if soft else labels
    success = (pred == targets) if targets is not None else (pred != truth)
    return xa, success, loss_fn(logits, labels, targets)

  first = evaluate(one_run(0))

  def scan_body(best, r):
    return select_better(evaluate(one_run(r)), best), None
  best, _ = lax.scan(scan_body, first, jnp.arange(1, restarts))
  return best[0]


random_start_fn = random_start  # `pgd` has an argument of the same name
