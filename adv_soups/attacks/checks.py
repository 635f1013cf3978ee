"""AutoAttack's checks for models that an evaluation may overrate (gradient masking and friends).

Ported from AutoAttack's `checks.py` (Croce & Hein), with its thresholds; see its `flags_doc.md`
for what each flag means and what to do about it. Each check returns None when it has nothing to
say, else a one-line warning; none changes a number (the caller prints and records the line).

  check_randomized      outputs vary across repeated forward passes (a randomised defence:
                        evaluate it with EoT instead); max l_2 distance of the l_2-normalised
                        logits > 1e-4, or a different number of correct predictions.
  check_probabilities   the outputs look like probabilities (all in (-1e-5, 1 + 1e-5), every row
                        summing to 1 within 1e-5) rather than logits.
  check_zero_gradients  the DLR loss has an all-zero input gradient on some point at APGD's start
                        (AutoAttack warns when any point has one).
  check_square_sr       Square lowered the accuracy left by the white-box attacks by more than
                        0.002 (a black-box attack beating white-box ones hints at masking).
  check_n_classes       too few classes for the losses / number of targets requested.
  check_dynamic         the model differentiates something while computing its logits (an
                        optimisation at inference time: a "dynamic" defence).
  check_eps_grid        (ours, opt-in) robust accuracy that rises with eps beyond a tolerance.

`check_dynamic` replaces AutoAttack's trace of PyTorch's autograd entry points by a trace of JAX's
(grad, value_and_grad, vjp, jvp, linearize) while `logits_fn` is traced (no computation runs).
"""
from __future__ import annotations

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adv_soups.attacks import losses as losses_lib

from adv_soups.attacks import pgd as pgd_lib

RANDOMIZED_REPEATS = 5
RANDOMIZED_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5
SQUARE_TOLERANCE = 0.002
EPS_GRID_TOLERANCE = 0.01
DOC = "see AutoAttack's flags_doc.md"
# JAX's differentiation entry points (jax/_src/api.py), for check_dynamic.
_AUTODIFF_ENTRY_POINTS = frozenset({"grad", "value_and_grad", "vjp", "jvp", "linearize"})


def check_randomized(logits_fn, images, labels=None, *, n: int = RANDOMIZED_REPEATS,
                     tolerance: float = RANDOMIZED_TOLERANCE) -> str | None:
  """Warns when `logits_fn(images)` [B, K] varies over `n` >= 2 calls (a randomised defence).

  Varies: two calls' per-example l_2-normalised logits differ by more than `tolerance` in l_2,
  or (with labels [B]) the number of correct predictions differs between calls.
  """
  if int(n) != n or n < 2:
    raise ValueError(f"n must be an integer >= 2, got n={n}")
  outputs, correct = [], []
  for _ in range(int(n)):
    out = np.asarray(logits_fn(images), np.float64)
    outputs.append(out / (np.linalg.norm(out, axis=-1, keepdims=True) + 1e-10))
    if labels is not None:
      correct.append(int(np.sum(np.argmax(out, axis=-1) == np.asarray(labels))))
  diff = max(float(np.max(np.linalg.norm(a - b, axis=-1)))
             for i, a in enumerate(outputs) for b in outputs[i + 1:])
  if diff > tolerance or len(set(correct)) > 1:
    counts = f", correct predictions {sorted(set(correct))}" if len(set(correct)) > 1 else ""
    return (f"the model looks randomised: over {n} identical forward passes its normalised "
            f"logits differ by up to {diff:.3g} (l_2){counts}; evaluate it with an "
            "expectation over its randomness: --attack=autoattack-rand (APGD-CE and APGD-DLR "
            f"with EOT, AutoAttack's version='rand'), {DOC}")
  return None


def check_probabilities(logits, *, tolerance: float = PROBABILITY_TOLERANCE) -> str | None:
  """Warns when outputs [B, K] look like probabilities (in [0, 1], rows summing to 1) not logits."""
  out = np.asarray(logits, np.float64)
  if (out.max() < 1 + tolerance and out.min() > -tolerance
      and np.all(np.abs(out.sum(axis=-1) - 1) < tolerance)):
    return ("the model's outputs look like probabilities (rows in [0, 1] summing to 1), not "
            f"logits; attack the pre-softmax logits, {DOC}")
  return None


def zero_gradient_mask(logits_fn, images, labels, rng=None, *, eps: float = 0.0,
                       norm: str = "linf", example_index=None) -> np.ndarray:
  """[B] bool: the DLR loss (the margin loss if K < 3) has an all-zero input gradient at APGD's
  start (uniform in the eps ball, keyed as APGD's first restart; the clean images if `rng` is
  None or eps is 0). Give it correctly classified points, as APGD attacks only those: where the
  label is the third-highest class the DLR loss is the constant 1 (a zero gradient by design)."""
  pgd_lib.check_settings(eps=eps, norm=norm, num_steps=1, norms=pgd_lib.ALL_NORMS)
  x = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels)
  num_classes = pgd_lib.num_classes_of(logits_fn, x)
  loss = losses_lib.dlr_loss if num_classes >= 3 else losses_lib.margin_loss

  @jax.jit
  def grad_l1(x, labels):
    if rng is not None and float(eps) > 0:
      index = pgd_lib._default_index(x, example_index)  # pylint: disable=protected-access
      keys = pgd_lib.example_keys(rng, index, 0)
      if norm == "l1":
        from adv_soups.attacks import l1 as l1_lib  # pylint: disable=import-outside-toplevel
        x = l1_lib.random_start(keys, x, eps)
      else:
        x = pgd_lib.random_start(keys, x, eps, norm)
    _, _, g = pgd_lib.loss_and_input_grad(logits_fn, lambda z, y, _: loss(z, y), x, labels,
                                          None)
    return jnp.sum(jnp.abs(g), axis=tuple(range(1, g.ndim)))
  return np.asarray(grad_l1(x, labels)) == 0


def check_zero_gradients(logits_fn, images, labels, rng=None, *, eps: float = 0.0,
                         norm: str = "linf", example_index=None) -> str | None:
  """Warns when any point's DLR-loss input gradient is all zero at APGD's start (see
  `zero_gradient_mask`; images [B, H, W, C], labels [B])."""
  zero = zero_gradient_mask(logits_fn, images, labels, rng, eps=eps, norm=norm,
                            example_index=example_index)
  if zero.any():
    return (f"{int(zero.sum())} of {zero.size} points have an all-zero input gradient of the "
            "DLR loss at APGD's start: gradient-based attacks may overrate the model (e.g. "
            f"quantised inputs); trust Square / use BPDA, {DOC}")
  return None


def _check_fraction(name: str, value) -> float:
  v = float(value)
  if not 0 <= v <= 1:
    raise ValueError(f"{name} must be a fraction in [0, 1], got {name}={value}")
  return v


def check_square_sr(acc_before_square: float, acc_after_square: float, *,
                    tolerance: float = SQUARE_TOLERANCE) -> str | None:
  """Warns when Square lowered the robust accuracy left by the white-box attacks (fractions in
  [0, 1]) by more than `tolerance` (AutoAttack: 0.002). Call it only when white-box attacks ran
  before Square (AutoAttack is silent when Square is the only attack)."""
  before = _check_fraction("acc_before_square", acc_before_square)
  after = _check_fraction("acc_after_square", acc_after_square)
  if after < before - tolerance:
    return (f"Square lowered the robust accuracy left by the white-box attacks by "
            f"{100 * (before - after):.2f} points ({100 * before:.2f}% -> {100 * after:.2f}%): "
            "the gradient-based evaluation may be unreliable; run Square with more queries / "
            f"restarts or an adaptive attack, {DOC}")
  return None


def check_n_classes(num_classes: int, attacks: Sequence[str], num_targets: int,
                    fab_targets: int | None = None) -> str | None:
  """Warns when `num_classes` is too few for the attacks (names, e.g. 'apgd-t', aliases expanded).

  DLR (apgd-dlr, apgd-t) needs >= 3 classes, targeted DLR (apgd-t) >= 4; APGD-T and FAB-T need
  num_targets + 1 classes for `num_targets` targets (`fab_targets`, default num_targets, for
  FAB-T); with fewer they attack only K - 1 targets.
  """
  attacks = tuple(attacks)
  fab_targets = num_targets if fab_targets is None else fab_targets
  problems = []
  if ("apgd-dlr" in attacks or "apgd-t" in attacks) and num_classes < 3:
    problems.append(f"the DLR loss needs >= 3 classes, the model has {num_classes}")
  elif "apgd-t" in attacks and num_classes < 4:
    problems.append(f"the targeted DLR loss (APGD-T) needs >= 4 classes, the model has "
                    f"{num_classes}")
  elif "apgd-t" in attacks and num_targets + 1 > num_classes:
    problems.append(f"APGD-T asks for {num_targets} target classes but only {num_classes - 1} "
                    "exist")
  if "fab-t" in attacks and fab_targets + 1 > num_classes:
    problems.append(f"FAB-T asks for {fab_targets} target classes but only {num_classes - 1} "
                    "exist")
  if problems:
    return "; ".join(problems) + f", {DOC}"
  return None


def check_dynamic(logits_fn, images) -> str | None:
  """Warns when computing `logits_fn(images)` calls JAX's differentiation (jax.grad, vjp, jvp,
  linearize, value_and_grad): an optimisation at inference time, which AutoAttack's standard
  version does not evaluate adequately. Traces `logits_fn` abstractly (nothing is computed)."""
  calls = []

  def profile(frame, event, arg):
    del arg
    code = frame.f_code
    if (event == "call" and code.co_name in _AUTODIFF_ENTRY_POINTS
        and code.co_filename.replace("\\", "/").endswith("jax/_src/api.py")):
      calls.append(code.co_name)

  previous = sys.getprofile()
  sys.setprofile(profile)
  try:
    jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(jnp.shape(images), jnp.float32))
  finally:
    sys.setprofile(previous)
  if calls:
    return (f"the model differentiates while computing its logits ({', '.join(sorted(set(calls)))}"
            "): a dynamic defence, for which the evaluation may not suffice (adaptive attacks "
            f"are needed), {DOC}")
  return None


def check_eps_grid(eps_values: Sequence[float], robust_accuracies: Sequence[float], *,
                   tolerance: float = EPS_GRID_TOLERANCE) -> str | None:
  """Warns when robust accuracy (fractions) at some eps exceeds that at a smaller eps by more
  than `tolerance` (default 0.01). Opt-in: only for a linear model is it impossible; on a real
  model a weaker attack result at a larger eps is a hint of an unreliable attack."""
  eps = np.asarray(eps_values, np.float64)
  acc = np.asarray([_check_fraction("robust accuracy", a) for a in robust_accuracies])
  if eps.shape != acc.shape or eps.ndim != 1:
    raise ValueError(f"eps_values and robust_accuracies must be two lists of the same length, got "
                     f"{eps.shape} and {acc.shape}")
  worst = None
  for j in range(len(eps)):
    smaller = eps < eps[j]
    if smaller.any():
      i = int(np.flatnonzero(smaller)[np.argmin(acc[smaller])])
      rise = acc[j] - acc[i]
      if rise > tolerance and (worst is None or rise > worst[0]):
        worst = (rise, i, j)
  if worst is None:
    return None
  rise, i, j = worst
  return (f"robust accuracy rises with eps: {100 * acc[i]:.2f}% at eps={eps[i]:g} but "
          f"{100 * acc[j]:.2f}% at eps={eps[j]:g} (+{100 * rise:.2f} points, tolerance "
          f"{100 * tolerance:.2f}): the attack is likely failing at the larger eps")
