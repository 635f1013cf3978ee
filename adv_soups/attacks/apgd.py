"""Auto-PGD (APGD-CE, APGD-DLR) and APGD-T (targeted DLR over the top runner-up classes).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020; schedule as in AutoAttack's `autopgd_base.py`:
  - initial step size 2 * eps (l_inf and l_2), one per example;
  - momentum alpha = 0.75 (none on the first step):
      z = P(x_k + eta * dir(grad)),  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}));
  - checkpoints after w_1 = 0.22 N iterations, then windows shrinking by 0.03 N down to 0.06 N
    (integer windows max(int(.22 N), 1), - max(int(.03 N), 1), floor max(int(.06 N), 1), as in
    AutoAttack); at a checkpoint an example's step size halves when
      (1) its loss increased in fewer than rho = 0.75 of the window's steps (strict "<", as the
          paper states; AutoAttack's code uses "<="), or
      (2) its step size was not halved at the previous checkpoint and its best loss has not
          improved since then (not checked at the first checkpoint, as in AutoAttack),
    and a halving restarts it from its best point (and that point's gradient);
  - the best-loss point is tracked, and the last misclassified iterate is kept.
All of it is per example with fixed shapes and `jnp.where` masks (no data-dependent indexing), in
one `lax.fori_loop`; restarts and APGD-T's targets are `lax.scan`s. Success (for restarts and
targets) means a wrong prediction, as in AutoAttack, also for targeted losses.
Random starts: uniform in the eps ball (AutoAttack scales its l_inf start to the cube's surface and
puts its l_2 start on the sphere; we use the same start as `pgd`).
norm "l1" runs l_1-APGD instead (`attacks.l1`: the top-k sparse step, the exact projection onto
the l_1 ball and the box, its own sparsity schedule, optionally the 3 / 2 / 1 eps schedule);
restarts, targets and the success rule are shared. `state_factory` lets EOT (`attacks.eot`)
replace the one deterministic forward / backward pass per iterate.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adv_soups.attacks import l1 as l1_lib
from adv_soups.attacks import losses as losses_lib

from adv_soups.attacks import pgd as pgd_lib

MOMENTUM = 0.75
RHO = 0.75
DEFAULT_NUM_TARGETS = 9


def checkpoint_schedule(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Static APGD checkpoints: (is_checkpoint [N] bool, window length [N] int) per iteration.

  Iteration i (0-based) is a checkpoint when the i+1 iterations so far end a window; for N = 100
  the checkpoints fall after 22, 41, 57, 70, 80, 87, 93 and 99 iterations (p_j of the paper).
  """
  k = max(int(0.22 * num_steps), 1)
  decr = max(int(0.03 * num_steps), 1)
  k_min = max(int(0.06 * num_steps), 1)
  is_check = np.zeros(num_steps, bool)
  window = np.ones(num_steps, np.int32)
  end = k
  while end <= num_steps:
    is_check[end - 1] = True
    window[end - 1] = k
    k = max(k - decr, k_min)
    end += k
  return is_check, window


def deterministic_state(logits_fn, loss_fn, labels, targets, restart):
  """The default `state_fn(x_adv, i) -> (wrong [B], loss [B], grad)`: one forward and one
  backward pass of a deterministic model (i, the iteration, and `restart` are unused; the EOT
  version in `attacks.eot` draws the model's randomness from them)."""
  del restart

  def state_fn(xa, i):
    del i
    logits, loss, g = pgd_lib.loss_and_input_grad(logits_fn, loss_fn, xa, labels, targets)
    return jnp.argmax(logits, axis=-1) != labels, loss, g
  return state_fn


def _apgd_run(logits_fn, x, labels, targets, keys, eps, num_steps, norm, loss_fn,
              state_fn=None):
  """One APGD run from random starts `keys` [B]: (x_out, success [B], best loss [B]).
  `state_fn(x_adv, i)` (default `deterministic_state`) gives (wrong, loss, grad) at iterate i
  (-1: the start)."""
  bc = pgd_lib._bcast  # pylint: disable=protected-access
  is_check, window = checkpoint_schedule(num_steps)
  is_check, window = jnp.asarray(is_check), jnp.asarray(window, jnp.float32)
  attack_state = state_fn or deterministic_state(logits_fn, loss_fn, labels, targets, 0)

  x0 = pgd_lib.random_start(keys, x, eps, norm)
  wrong0, loss0, g0 = attack_state(x0, -1)
  state = dict(
      x=x0, x_old=x0, grad=g0, step=jnp.full_like(loss0, 2.0) * eps,
      x_best=x0, grad_best=g0, loss_best=loss0, loss_prev=loss0,
      n_inc=jnp.zeros_like(loss0), loss_best_last=loss0,
      reduced_last=jnp.ones_like(wrong0), x_found=x0, found=wrong0)

  def body(i, s):
    a = jnp.where(i > 0, MOMENTUM, 1.0)
    z = pgd_lib.project(s["x"] + bc(s["step"], x) * pgd_lib.ascent_direction(s["grad"], norm),
                        x, eps, norm)
    x_new = pgd_lib.project(s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["x_old"]),
                            x, eps, norm)
    wrong, loss, g = attack_state(x_new, i)
    x_found = jnp.where(bc(wrong, x), x_new, s["x_found"])
    improved = loss > s["loss_best"]
    x_best = jnp.where(bc(improved, x), x_new, s["x_best"])
    grad_best = jnp.where(bc(improved, x), g, s["grad_best"])
    loss_best = jnp.where(improved, loss, s["loss_best"])
    n_inc = s["n_inc"] + (loss > s["loss_prev"]).astype(loss.dtype)
    # Checkpoint (a no-op mask except at the static checkpoint iterations).
    chk = is_check[i]
    cond1 = n_inc < RHO * window[i]
    cond2 = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
    halve = chk & (cond1 | cond2)
    return dict(
        x=jnp.where(bc(halve, x), x_best, x_new), x_old=s["x"],
        grad=jnp.where(bc(halve, x), grad_best, g),
        step=jnp.where(halve, 0.5 * s["step"], s["step"]),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best, loss_prev=loss,
        n_inc=jnp.where(chk, 0.0, n_inc),
        loss_best_last=jnp.where(chk, loss_best, s["loss_best_last"]),
        reduced_last=jnp.where(chk, halve, s["reduced_last"]),
        x_found=x_found, found=s["found"] | wrong)

  s = lax.fori_loop(0, num_steps, body, state)
  x_out = jnp.where(bc(s["found"], x), s["x_found"], s["x_best"])
  return x_out, s["found"], s["loss_best"]


def _apgd_restarts(logits_fn, x, labels, targets, rng, index, eps, num_steps, norm, loss_fn,
                   restarts, largereps=False, state_factory=None):
  """APGD with `restarts` random starts, keyed per example; returns (x_out, success, loss).
  norm "l1" runs l_1-APGD (`attacks.l1`; `largereps`: its 3 / 2 / 1 eps schedule);
  `state_factory(logits_fn, loss_fn, labels, targets, restart)` makes each restart's
  `state_fn` (default `deterministic_state`; `attacks.eot` averages gradients over draws)."""
  factory = state_factory or deterministic_state

  def run(r):
    keys = pgd_lib.example_keys(rng, index, r)
    state_fn = factory(logits_fn, loss_fn, labels, targets, r)
    if norm == "l1":
      return l1_lib.apgd_l1_run(state_fn, x, keys, eps, num_steps, largereps)
    return _apgd_run(logits_fn, x, labels, targets, keys, eps, num_steps, norm, loss_fn,
                     state_fn)
  best = run(0)
  if restarts > 1:
    best, _ = lax.scan(lambda b, r: (pgd_lib.select_better(run(r), b), None), best,
                       jnp.arange(1, restarts))
  return best


def apgd(logits_fn, images, labels, rng, *, eps: float, num_steps: int = 100,
         norm: str = "linf", loss: str = "ce", restarts: int = 1, targets=None,
         example_index=None, largereps: bool = False, state_factory=None) -> jax.Array:
  """Auto-PGD adversarial examples (APGD-CE with loss="ce", APGD-DLR with loss="dlr").

  Args:
    logits_fn: images [B, H, W, C] float32 -> logits [B, K]; only its input is differentiated.
    images: [B, H, W, C] float32 in [0, 1].
    labels: [B] int in [0, K).
    rng: PRNG key; random starts are keyed per example by fold_in(rng, example_index[i]).
    eps: threat-model radius in pixel units (l_inf: [0, 1]; l_2, l_1: >= 0).
    num_steps: iterations N >= 1 (each one forward + one backward pass; +1 for the start).
    norm: "linf", "l2" or "l1" (l_1-APGD of `attacks.l1`: sparse steps, exact projection onto
      the l_1 ball and the box).
    loss: "ce", "margin" or "dlr". With `targets`, the targeted version (targeted DLR needs
      K >= 4 classes).
    restarts: >= 1 random restarts; each example keeps a misclassified point if any restart
      found one, else its highest-loss point.
    targets: optional [B] int target classes (targeted loss; success still = misclassified).
    example_index: optional [B] int global example index (default arange(B)), for shard_map.
    largereps: l_1 only: AutoAttack's use_largereps eps schedule (3 eps, 2 eps, eps over 30 /
      30 / 40% of the iterations; num_steps >= 3).
    state_factory: how a restart evaluates the model (default one deterministic pass;
      `attacks.eot.eot_state_factory` averages over draws of a randomised model).

  Returns:
    [B, H, W, C] float32: the last misclassified iterate where one was found, else the best-loss
    point; inside the eps ball and [0, 1].
  """
  check_largereps(norm, num_steps, largereps)
  pgd_lib.validate(logits_fn, images, labels, targets, eps=eps, norm=norm, num_steps=num_steps,
                   restarts=restarts, loss=loss, norms=pgd_lib.ALL_NORMS)
  x = lax.stop_gradient(jnp.asarray(images, jnp.float32))
  eps = jnp.asarray(eps, jnp.float32)
  index = pgd_lib._default_index(x, example_index)  # pylint: disable=protected-access
  loss_fn = losses_lib.get_loss(loss, targets is not None)
  return _apgd_restarts(logits_fn, x, labels, targets, rng, index, eps, num_steps, norm,
                        loss_fn, restarts, largereps, state_factory)[0]


def check_largereps(norm: str, num_steps: int, largereps: bool) -> None:
  """ValueError unless `largereps` (the l_1 eps schedule) comes with norm l1 and >= 3 steps."""
  if largereps:
    if norm != "l1":
      raise ValueError(f"largereps (the 3 / 2 / 1 eps schedule) is l_1-APGD's, got norm={norm!r}")
    l1_lib.largereps_schedule(int(num_steps))


def num_apgd_targets(num_classes: int, num_targets: int = DEFAULT_NUM_TARGETS) -> int:
  """How many runner-up classes APGD-T attacks: min(num_targets, K - 1); K >= 4 required."""
  if num_classes < 4:
    raise ValueError(f"APGD-T (targeted DLR) needs >= 4 classes, got num_classes={num_classes}")
  if int(num_targets) != num_targets or num_targets < 1:
    raise ValueError(f"num_targets must be an integer >= 1, got num_targets={num_targets}")
  return min(int(num_targets), num_classes - 1)


def runner_up_targets(clean_logits: jax.Array, labels: jax.Array, rank) -> jax.Array:
  """The (rank+1)-th highest-scoring class other than the label at the clean point: [B] int.

  clean_logits [B, K], labels [B]. The label is masked out first, so the target is never the true
  class (for a misclassified example the label may be the top or a runner-up; an example targeted
  at its own label would have a DLR of 0 everywhere). For a correctly classified example rank 0
  is the runner-up (AutoAttack's `target_class = 2`). `rank` (< K - 1) may be a traced int.
  """
  oh = jax.nn.one_hot(labels, clean_logits.shape[-1], dtype=jnp.bool_)
  masked = jnp.where(oh, -jnp.inf, clean_logits.astype(jnp.float32))
  order = jnp.argsort(masked, axis=-1)  # ascending; the label comes first
  col = clean_logits.shape[-1] - 1 - rank
  return lax.dynamic_index_in_dim(order, col, axis=1, keepdims=False).astype(jnp.int32)


def apgd_t_single(logits_fn, x, labels, rng, rank, *, eps, num_steps, norm, restarts=1,
                  example_index=None, largereps=False):
  """One target rank of APGD-T: APGD with targeted DLR toward the rank-th runner-up class.

  x [B, ...] in [0, 1], labels [B]; `rank` may be traced (one compilation for all ranks); the
  random starts use fold_in(rng, rank) as their key. Returns (x_adv, success [B], loss [B]).
  norm "l1" / `largereps` as in `apgd`.
  """
  check_largereps(norm, num_steps, largereps)
  x = lax.stop_gradient(jnp.asarray(x, jnp.float32))
  eps = jnp.asarray(eps, jnp.float32)
  index = pgd_lib._default_index(x, example_index)  # pylint: disable=protected-access
  targets = runner_up_targets(logits_fn(x), labels, rank)
  return _apgd_restarts(logits_fn, x, labels, targets, jax.random.fold_in(rng, rank), index, eps,
                        num_steps, norm, losses_lib.targeted_dlr_loss, restarts, largereps)


def apgd_t(logits_fn, images, labels, rng, *, eps: float, num_steps: int = 100,
           norm: str = "linf", num_targets: int = DEFAULT_NUM_TARGETS, restarts: int = 1,
           example_index=None, largereps: bool = False) -> jax.Array:
  """APGD-T: APGD with the targeted DLR loss toward each of the top runner-up classes in turn.

  Args as `apgd`; num_targets: how many runner-up classes (by clean logit) are tried, default 9,
  at most K - 1 (K >= 4 classes required, else ValueError). Each target is a full APGD run of
  `num_steps` on the whole (fixed-shape) batch; an example keeps the first misclassified point
  found, else the highest-loss one. (`runner.robust_accuracy` instead runs one target at a time
  on the examples still robust.) Returns adversarial images [B, H, W, C].
  """
  num_classes = pgd_lib.validate(logits_fn, images, labels, None, eps=eps, norm=norm,
                                 num_steps=num_steps, restarts=restarts, loss="dlr",
                                 norms=pgd_lib.ALL_NORMS)
  if num_classes is None:
    num_classes = pgd_lib.num_classes_of(logits_fn, images)
  n_t = num_apgd_targets(num_classes, num_targets)

  def run(rank):
    return apgd_t_single(logits_fn, images, labels, rng, rank, eps=eps, num_steps=num_steps,
                         norm=norm, restarts=restarts, example_index=example_index,
                         largereps=largereps)
  best = run(0)
  if n_t > 1:
    best, _ = lax.scan(lambda b, r: (pgd_lib.select_better(run(r), b), None), best,
                       jnp.arange(1, n_t))
  return best[0]
