"""AutoAttack's checks for models that an evaluation may overrate (gradient masking and friends).

Ported from AutoAttack's `checks.py` (Croce & Hein), with its thresholds; see its `flags_doc.md`
for what each flag means and what to do about it. Each check returns None when it has nothing to
say, else a one-line warning; none changes a number (the caller prints and records the line).

  check_randomized      outputs vary across repeated forward passes (a randomised defence:
                        evaluate it with EoT instead); max l_2 distance of the l_2-normalised
                        logits > 1e-4, or a different number of correct predictions.
  check_probabilities   the outputs look like probabilities (all in (-1e-5, 1 + 1e-5), every row
                        summing to 1 within 1e-5) rather than logits.
  check_zero_gradients  the DLR loss has an all-zero input gradient on some point at APGD's start,
                        or APGD-T's targeted DLR at its start for some target (AutoAttack warns
                        when any point of any batch has one); `zero_gradient_masks` is the
                        compiled check the evaluation runs on every batch.
  check_square_sr       Square lowered the accuracy left by the white-box attacks by more than
                        0.002 (a black-box attack beating white-box ones hints at masking).
  check_n_classes       too few classes for the losses / number of targets requested.
  check_dynamic         the model differentiates something while computing its logits (an
                        optimisation at inference time: a "dynamic" defence).
  check_eps_grid        (ours, opt-in) robust accuracy that rises with eps beyond a tolerance.

`check_dynamic` replaces AutoAttack's trace of PyTorch's autograd entry points by a trace of JAX's
autodiff interpreter (any call into jax/_src/interpreters/ad.py: JVP, linearize, transpose) while
`logits_fn` is traced (no computation runs), so jacfwd and linear_transpose are caught too.
"""
from __future__ import annotations

import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adv_soups.attacks import apgd as apgd_lib
from adv_soups.attacks import losses as losses_lib
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import registry

RANDOMIZED_REPEATS = 5
RANDOMIZED_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5
SQUARE_TOLERANCE = 0.002
EPS_GRID_TOLERANCE = 0.01
DOC = "see AutoAttack's flags_doc.md"
# Public names of JAX's differentiation entry points (jax/_src/api.py): only to *name* what
# check_dynamic saw; it detects differentiation by JAX's autodiff interpreter itself.
_AUTODIFF_NAMES = frozenset({"grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd",
                             "jacrev", "hessian", "linear_transpose"})


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
            f"expectation over its randomness (EoT, AutoAttack's version='rand'), {DOC}")
  return None


def check_probabilities(logits, *, tolerance: float = PROBABILITY_TOLERANCE) -> str | None:
  """Warns when outputs [B, K] look like probabilities (in [0, 1], rows summing to 1) not logits."""
  out = np.asarray(logits, np.float64)
  if (out.max() < 1 + tolerance and out.min() > -tolerance
      and np.all(np.abs(out.sum(axis=-1) - 1) < tolerance)):
    return ("the model's outputs look like probabilities (rows in [0, 1] summing to 1), not "
            f"logits; attack the pre-softmax logits, {DOC}")
  return None


def zero_gradient_masks(logits_fn, *, norm: str = "linf", num_targets: int = 0):
  """A jitted `fn(images [B, H, W, C], labels [B], rng, eps, example_index [B], target_rng)
  -> [1 + T, B] bool`: row 0, the DLR loss (the margin loss if K < 3) has an all-zero input
  gradient at APGD's start (uniform in the eps ball, keyed as APGD's first restart by `rng`);
  row 1 + t, APGD-T's targeted DLR towards the t-th runner-up class has one at APGD-T's start
  for that target (keyed as the runner keys it, by `target_rng`), as AutoAttack checks at the
  start of every APGD run with a DLR loss. T = min(num_targets, K - 1) when K >= 4, else 0.
  Build it once and call it on every batch (one compilation per batch shape)."""
  pgd_lib.check_settings(eps=0.0, norm=norm, num_steps=1)

  def masks(x, labels, rng, eps, index, target_rng):
    x = jnp.asarray(x, jnp.float32)
    num_classes = pgd_lib.num_classes_of(logits_fn, x)
    loss = losses_lib.dlr_loss if num_classes >= 3 else losses_lib.margin_loss
    targets = min(int(num_targets), num_classes - 1) if num_classes >= 4 else 0

    def zero(start, fn, targets_):
      _, _, g = pgd_lib.loss_and_input_grad(logits_fn, fn, start, labels, targets_)
      return jnp.sum(jnp.abs(g), axis=tuple(range(1, g.ndim))) == 0
    with jax.default_matmul_precision("highest"):
      start = pgd_lib.random_start(pgd_lib.example_keys(rng, index, 0), x, eps, norm)
      out = [zero(start, lambda z, y, _: loss(z, y), None)]
      if targets:
        clean = logits_fn(x)
        for rank in range(targets):
          key = jax.random.fold_in(target_rng, rank)
          start_t = pgd_lib.random_start(pgd_lib.example_keys(key, index, 0), x, eps, norm)
          out.append(zero(start_t, losses_lib.targeted_dlr_loss,
                          apgd_lib.runner_up_targets(clean, labels, rank)))
      return jnp.stack(out)
  return jax.jit(masks)


def zero_gradient_mask(logits_fn, images, labels, rng=None, *, eps: float = 0.0,
                       norm: str = "linf", example_index=None, num_targets: int = 0
                       ) -> np.ndarray:
  """[B] bool: some DLR loss (untargeted, and APGD-T's targeted DLR towards each of its first
  `num_targets` runner-up classes) has an all-zero input gradient at APGD's start (the clean
  images if `rng` is None or eps is 0; see `zero_gradient_masks`). Give it correctly classified
  points, as APGD attacks only those: where the label is the third-highest class the DLR loss is
  the constant 1 (a zero gradient by design)."""
  pgd_lib.check_settings(eps=eps, norm=norm, num_steps=1)
  x = jnp.asarray(images, jnp.float32)
  index = pgd_lib._default_index(x, example_index)  # pylint: disable=protected-access
  if rng is None:
    rng, eps = jax.random.PRNGKey(0), 0.0
  fn = zero_gradient_masks(logits_fn, norm=norm, num_targets=num_targets)
  return np.asarray(fn(x, jnp.asarray(labels), rng, np.float32(eps), index, rng)).any(0)


def zero_gradient_message(count: int, total: int) -> str:
  """The warning for `count` of `total` points with an all-zero DLR gradient."""
  return (f"{count} of {total} points have an all-zero input gradient of the DLR loss at "
          "APGD's start: gradient-based attacks may overrate the model (e.g. quantised "
          f"inputs); trust Square / use BPDA, {DOC}")


def check_zero_gradients(logits_fn, images, labels, rng=None, *, eps: float = 0.0,
                         norm: str = "linf", example_index=None,
                         num_targets: int = 0) -> str | None:
  """Warns when any point's DLR-loss input gradient (untargeted, or APGD-T's targeted DLR for
  its first `num_targets` targets) is all zero at APGD's start (see `zero_gradient_mask`; images
  [B, H, W, C], labels [B])."""
  zero = zero_gradient_mask(logits_fn, images, labels, rng, eps=eps, norm=norm,
                            example_index=example_index, num_targets=num_targets)
  if zero.any():
    return zero_gradient_message(int(zero.sum()), zero.size)
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


def check_n_classes(num_classes: int, attacks: Sequence[str], num_targets: int | None = None,
                    targets: dict[str, int] | None = None) -> str | None:
  """Warns when `num_classes` is too few for the attacks (registry names, e.g. 'apgd-t').

  Each attack needs its registry entry's `min_classes` (DLR: 3, targeted DLR: 4); a targeted
  attack asking for t targets needs t + 1 classes (it then attacks only K - 1). Its targets:
  `targets[name]`, else `num_targets`, else the entry's own (AutoAttack's 9).
  """
  problems = []
  for name in attacks:
    entry = registry.get(name)
    loss = entry.settings_for("linf").get("loss")
    wanted = (targets or {}).get(name, num_targets)
    wanted = entry.settings_for("linf").get("targets", 1) if wanted is None else wanted
    if num_classes < entry.min_classes:
      problems.append(f"{entry.display} ({loss} loss) needs >= {entry.min_classes} classes, "
                      f"the model has {num_classes}")
    elif entry.targeted and wanted + 1 > num_classes:
      problems.append(f"{entry.display} asks for {wanted} target classes but only "
                      f"{num_classes - 1} exist")
  if problems:
    return "; ".join(problems) + f", {DOC}"
  return None


def _autodiff_calls(logits_fn, images) -> set[str]:
  """What JAX differentiation runs while `logits_fn(images)` is traced abstractly: the public
  entry points seen (grad, jacfwd, ...) and 'autodiff' whenever JAX's autodiff interpreter
  (jax/_src/interpreters/ad.py: JVP, linearize, transpose) runs at all, so every entry point,
  present or future, is caught, not a list of names."""
  calls: set[str] = set()

  def profile(frame, event, arg):
    del arg
    if event != "call":
      return
    path = frame.f_code.co_filename.replace("\\", "/")
    if path.endswith("jax/_src/interpreters/ad.py"):
      calls.add("autodiff")
    elif path.endswith("jax/_src/api.py") and frame.f_code.co_name in _AUTODIFF_NAMES:
      calls.add(frame.f_code.co_name)

  previous = sys.getprofile()
  sys.setprofile(profile)
  try:
    jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(jnp.shape(images), jnp.float32))
  finally:
    sys.setprofile(previous)
  return calls


def check_dynamic(logits_fn, images) -> str | None:
  """Warns when computing `logits_fn(images)` differentiates anything (jax.grad, vjp, jvp,
  jacfwd, jacrev, hessian, linearize, linear_transpose, or any other use of JAX's autodiff
  interpreter): an optimisation at inference time, which AutoAttack's standard version does not
  evaluate adequately. Traces `logits_fn` abstractly (nothing is computed)."""
  calls = _autodiff_calls(logits_fn, images)
  if calls:
    named = sorted(calls - {"autodiff"}) or ["JAX autodiff"]
    return (f"the model differentiates while computing its logits ({', '.join(named)}"
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
