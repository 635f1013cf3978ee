"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), l_inf, l_2, l_1.

FAB looks for the *smallest* perturbation that changes the prediction, so its points may lie
outside the eps ball: a FAB point breaks an example only if it is misclassified and
`within_eps`. Constants and schedule as in AutoAttack's standard version (`fab_base.py`,
`autoattack.py`): 9 target classes (the runner-ups by clean logit), 100 iterations, 1 restart per
target, alpha_max = 0.1, eta = 1.05, beta = 0.9.

One iteration, from the current point x_k (x_0 = the clean image x for the first restart):
  - linearise the target-vs-true logit difference F(z) = z_t(z) - z_y(z) at x_k: the hyperplane
    {z : g . z = g . x_k - F(x_k)}, g = dF/dx (one forward and one input-gradient pass);
  - d_k = the minimal-norm step from x_k onto the hyperplane inside the box [0, 1]^n, and
    d_0 = the same from the clean image (`boundary_projection`);
  - alpha = min(|d_k| / (|d_k| + |d_0|), alpha_max), and
      x_{k+1} = clip((1 - alpha) (x_k + eta d_k) + alpha (x + eta d_0), 0, 1)
    (a step biased towards the original point, overshooting by eta);
  - if x_{k+1} is misclassified (one more forward pass), it is kept when it is the closest to x so
    far, and the iterate steps back towards x: x_{k+1} <- x + beta (x_{k+1} - x).
Restarts r >= 1 start from a random point at distance min(best so far, eps) / 2 from x (uniform
noise in [-1, 1]^n scaled to that l_inf norm / a Gaussian direction scaled to that l_2 or l_1
norm),
clipped to [0, 1]; AutoAttack's radius is eps / 2, the same for every example not yet broken
within eps. eps is used only there and in `within_eps`. AutoAttack runs later restarts only on the
examples not yet broken within eps; here too (with `compact`, the default): an example whose
closest point is within eps stops, and every 10 iterations the examples still running are
run in as few micro-batches of ~B/2 rows as hold them (`compaction`), so broken ones stop costing
compute.

The projection onto {w . z = b} intersected with the box, for both norms, solves one scalar
equation: after flipping the sign so that c = w . t - b >= 0, every coordinate moves against its
w_i by min(lam, q_i) (l_inf: q_i = its room to the box edge) or by |w_i| min(lam, q_i) (l_2: the
KKT solution d_i = clip(-lam w_i, -t_i, 1 - t_i), q_i = room / |w_i|), and lam >= 0 solves
  sum_i a_i min(lam, q_i) = c,     a_i = |w_i| (l_inf) or w_i^2 (l_2),
a concave piecewise-linear function of lam: one sort, two cumulative sums and a count give the
segment that holds the root (no data-dependent indexing). Where the box makes the hyperplane
unreachable, every coordinate moves all the way to its box edge (the closest the box gets).

The l_1 projection (`l1.boundary_projection`, AutoAttack's `projection_l1`) moves the
coordinates with the largest |w_i| first, each up to its box edge, until the hyperplane is reached.

All of it runs per example with fixed shapes, `jnp.where` masks and one `lax.fori_loop` (restarts
and targets `lax.scan`s), so it compiles once per input shape and works under `jax.jit`,
`jax.vmap` and `jax.shard_map`; only the input is differentiated, never the parameters.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax

from adv_soups.attacks import apgd as apgd_lib
from adv_soups.attacks import compaction
from adv_soups.attacks import pgd as pgd_lib
from adv_soups.attacks import l1 as l1_lib

DEFAULT_NUM_TARGETS = 9
ALPHA_MAX = 0.1
ETA = 1.05
BETA = 0.9
# within_eps: distance <= eps * (1 + RTOL) + ATOL (float32 rounding of x_adv - x and its norm).
WITHIN_EPS_RTOL = 1e-6
WITHIN_EPS_ATOL = 1e-7
_MIN_STEP_NORM = 1e-8  # floor of |d_k| and |d_0| in alpha (as AutoAttack)
_TINY_WEIGHT = 1e-12  # l_2: |w_i| / max|w| below this counts as 0 (its q_i would overflow)
COMPACT_EVERY = 10  # iterations between two compactions of the rows not yet broken within eps
_bcast = pgd_lib._bcast  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def check_fab_settings(*, eps, norm: str, num_steps: int, restarts: int = 1,
                       alpha_max: float = ALPHA_MAX, eta: float = ETA,
                       beta: float = BETA) -> None:
  """Raises ValueError (one line) for a bad eps / norm / num_steps / restarts / FAB constant."""
  pgd_lib.check_settings(eps=eps, norm=norm, num_steps=num_steps, restarts=restarts,
                         norms=pgd_lib.ALL_NORMS)
  if not 0 <= float(alpha_max) <= 1:
    raise ValueError(f"alpha_max must be in [0, 1], got alpha_max={alpha_max}")
  if not float(eta) > 0:
    raise ValueError(f"eta (overshoot) must be > 0, got eta={eta}")
  if not 0 < float(beta) <= 1:
    raise ValueError(f"beta (backward step) must be in (0, 1], got beta={beta}")


def _check_classes(num_classes: int, rank=None) -> None:
  if num_classes < 2:
    raise ValueError(f"FAB-T needs >= 2 classes, got num_classes={num_classes}")
  if rank is not None and pgd_lib.is_concrete(rank):
    r = int(rank)
    if not 0 <= r < num_classes - 1:
      raise ValueError(f"rank must be in [0, {num_classes - 1}) (a runner-up class), got "
                       f"rank={r}")


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def distance(x_adv: jax.Array, x: jax.Array, norm: str) -> jax.Array:
  """Per-example |x_adv - x| in `norm` ("linf", "l2" or "l1"): [B, ...] -> [B] float32."""
  return _norm_flat((x_adv - x).reshape(x.shape[0], -1), norm)


def within_eps(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """True [B] where |x_adv - x|_norm <= eps (up to float32 rounding: a relative 1e-6 and an
  absolute 1e-7). x_adv, x [B, H, W, C] in [0, 1]; eps in pixel units."""
  pgd_lib.check_settings(eps=eps, norm=norm, num_steps=1, norms=pgd_lib.ALL_NORMS)
  eps = jnp.asarray(eps, jnp.float32)
  return distance(x_adv, x, norm) <= eps * (1 + WITHIN_EPS_RTOL) + WITHIN_EPS_ATOL


def _solve_capped_sum(q: jax.Array, a: jax.Array, c: jax.Array) -> jax.Array:
  """lam >= 0 with sum_i a_i min(lam, q_i) = c, per row; +inf where even lam = inf falls short.

  q, a [N, n] >= 0; c [N] >= 0. With q sorted ascending, the left side at lam = q_(k) is
  G_k = sum_{j<k} a_j q_j + q_(k) sum_{j>=k} a_j (non-decreasing in k); the root lies on the
  segment after the last G_k < c, where the first k coordinates are capped.
  """
  n = q.shape[-1]
  q_s, a_s = lax.sort((q, a), dimension=-1, num_keys=1)
  aq = a_s * q_s
  capped = jnp.cumsum(aq, axis=-1) - aq  # sum_{j<k} a_j q_j
  free = jnp.flip(jnp.cumsum(jnp.flip(a_s, -1), axis=-1), -1)  # sum_{j>=k} a_j
  g = capped + q_s * free
  k = jnp.sum(g < c[:, None], axis=-1)
  kk = jnp.minimum(k, n - 1)[:, None]
  cap_k = jnp.take_along_axis(capped, kk, axis=-1)[:, 0]
  free_k = jnp.take_along_axis(free, kk, axis=-1)[:, 0]
  lam = jnp.maximum((c - cap_k) / jnp.maximum(free_k, 1e-30), 0.0)
  return jnp.where(k >= n, jnp.inf, lam)


def boundary_projection(t: jax.Array, w: jax.Array, b: jax.Array, norm: str) -> jax.Array:
  """Minimal-norm step d [N, n] with w . (t + d) = b and t + d in [0, 1]^n, per row.

  t [N, n] points in [0, 1], w [N, n] hyperplane normals, b [N] offsets; norm "linf", "l2" or "l1".
  Where the box cannot reach the hyperplane, d moves every coordinate (with w_i != 0) to the box
  edge on the hyperplane's side. Coordinates with w_i = 0 do not move.
  """
  if norm == "l1":  # the cheapest coordinates first (AutoAttack's projection_l1)
    return l1_lib.boundary_projection(t, w, b)
  c = jnp.sum(w * t, axis=-1) - b
  flip = jnp.where(c >= 0, 1.0, -1.0)
  scale = jnp.max(jnp.abs(w), axis=-1)
  scale = jnp.where(scale > 0, scale, 1.0)
  w = w * (flip / scale)[:, None]  # the problem is invariant to scaling (w, b)
  c = jnp.abs(c) / scale
  room = jnp.where(w > 0, t, 1.0 - t)  # how far each coordinate can move against w_i
  direction = -jnp.sign(w)
  if norm == "linf":
    lam = _solve_capped_sum(room, jnp.abs(w), c)
    return direction * jnp.minimum(lam[:, None], room)
  aw = jnp.abs(w)
  live = aw > _TINY_WEIGHT
  q = jnp.where(live, room / jnp.where(live, aw, 1.0), 0.0)
  lam = _solve_capped_sum(q, jnp.where(live, aw * aw, 0.0), c)
  return jnp.where(live, direction * jnp.minimum(aw * lam[:, None], room), 0.0)


def _norm_flat(d: jax.Array, norm: str) -> jax.Array:
  if norm == "linf":
    return jnp.max(jnp.abs(d), axis=-1)
  if norm == "l1":
    return jnp.sum(jnp.abs(d), axis=-1)
  return jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))


def _random_start(keys: jax.Array, x: jax.Array, radius: jax.Array, norm: str) -> jax.Array:
  """x + a random perturbation of norm exactly `radius` [B] (before clipping to [0, 1]); l_2 and
  l_1: a Gaussian direction scaled to that norm."""
  shape = x.shape[1:]
  if norm == "linf":
    noise = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0))(keys)
  else:
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
  n = _norm_flat(noise.reshape(x.shape[0], -1), norm)
  delta = noise * _bcast(radius / jnp.maximum(n, 1e-12), x)
  return jnp.clip(x + delta, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------
def fab_step(x1: jax.Array, x0: jax.Array, w: jax.Array, b: jax.Array, norm: str, *,
             alpha_max: float = ALPHA_MAX, eta: float = ETA) -> jax.Array:
  """FAB's biased projection step towards the hyperplane {z : w . z = b} (the linearised boundary).

  x1 [N, n] the current points, x0 [N, n] the original points, w [N, n], b [N]; all flattened.
  With d1, d0 the minimal steps from x1 and x0 onto the hyperplane inside [0, 1]^n and
  alpha = min(|d1| / (|d1| + |d0|), alpha_max), returns
  clip((1 - alpha) (x1 + eta d1) + alpha (x0 + eta d0), 0, 1)  [N, n].
  """
  n = x1.shape[0]
  d = boundary_projection(jnp.concatenate([x1, x0]), jnp.concatenate([w, w]),
                          jnp.concatenate([b, b]), norm)
  d1, d0 = d[:n], d[n:]
  a1 = jnp.maximum(_norm_flat(d1, norm), _MIN_STEP_NORM)
  a0 = jnp.maximum(_norm_flat(d0, norm), _MIN_STEP_NORM)
  alpha = jnp.clip(a1 / (a1 + a0), 0.0, alpha_max)[:, None]
  return jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d0) * alpha, 0.0, 1.0)


def _fab_run(logits_fn, rows, *, num_steps, norm, alpha_max, eta, beta, eps, compact,
             compact_every):
  """One FAB-T run of `num_steps` iterations from rows["x1"]; updates rows["best"/"best_dist"].

  rows: dict of per-row arrays: x (clean) [B, H, W, C], y and targets [B], args (the per-row
  model inputs), x1 (the start), best, best_dist. With `compact`, a row whose best point is
  within eps stops (it is broken; further iterations would only move it closer to x) and the
  other rows are compacted every `compact_every` iterations.
  """
  def done(r):
    return r["best_dist"] <= eps * (1 + WITHIN_EPS_RTOL) + WITHIN_EPS_ATOL

  def body(_, r):
    x, labels, targets, x1, best, best_dist = (r["x"], r["y"], r["targets"], r["x1"], r["best"],
                                               r["best_dist"])
    bsz = x.shape[0]
    f = lambda z: logits_fn(z, *r["args"])
    logits, vjp = jax.vjp(f, x1)
    num_classes = logits.shape[-1]
    cot = (jax.nn.one_hot(targets, num_classes, dtype=logits.dtype)
           - jax.nn.one_hot(labels, num_classes, dtype=logits.dtype))
    diff = jnp.sum(cot * logits, axis=-1).astype(jnp.float32)  # z_t - z_y at x1
    (g,) = vjp(cot)
    w = g.reshape(bsz, -1).astype(jnp.float32)
    x1f = x1.reshape(bsz, -1)
    b = jnp.sum(w * x1f, axis=-1) - diff
    x_new = fab_step(x1f, x.reshape(bsz, -1), w, b, norm, alpha_max=alpha_max,
                     eta=eta).reshape(x.shape)
    adv = jnp.argmax(f(x_new), axis=-1) != labels
    dist = distance(x_new, x, norm)
    live = ~done(r) if compact else jnp.ones_like(adv)  # rows within eps stay as they are
    better = live & adv & (dist < best_dist)
    x1_new = jnp.where(_bcast(adv, x), x + beta * (x_new - x), x_new)  # the backward step
    return dict(r, x1=jnp.where(_bcast(live, x), x1_new, x1),
                best=jnp.where(_bcast(better, x), x_new, best),
                best_dist=jnp.where(better, dist, best_dist))

  bsz = rows["x"].shape[0]
  micro = compaction.micro_batch(bsz) if compact else bsz
  return compaction.compacted_loop(body, rows, lambda r: ~done(r), 0, num_steps,
                                   chunk=compact_every, micro=micro)


def fab_t_single(logits_fn, images, labels, rng, rank, *, eps, num_steps: int = 100,
                 norm: str = "linf", restarts: int = 1, example_index=None,
                 alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA,
                 row_args: tuple = (), compact: bool = True,
                 compact_every: int = COMPACT_EVERY):
  """One target rank of FAB-T: the smallest adversarial perturbation towards one runner-up class.

  Args:
    logits_fn: `logits_fn(images [b, H, W, C] float32, *row_args)` -> logits [b, K] (K >= 2);
      only its input is differentiated. Rows must be independent (compaction calls it on subsets
      of the rows): per-row model inputs go in `row_args`, never in its closure.
    images: [B, H, W, C] float32 in [0, 1].
    labels: [B] int in [0, K).
    rng: PRNG key; restart r >= 1 of example i starts from the key
      fold_in(fold_in(fold_in(rng, rank), example_index[i]), r). The first restart starts from the
      clean image (no randomness).
    rank: the target is the rank-th runner-up class of the clean logits (0 = the highest-scoring
      class other than the label; `apgd.runner_up_targets`); may be traced.
    eps: pixel units; the radius of the random starts (restarts >= 2) and, with `compact`, when a
      row is done; FAB's points are not bounded by it (check them with `within_eps`).
    num_steps: iterations per restart (each one forward + one input-gradient pass, and one more
      forward pass to check the new point).
    norm: "linf", "l2" or "l1": the norm minimised.
    restarts: >= 1 runs; each example keeps its closest adversarial point over all of them.
    example_index: optional [B] int global example index (default arange(B)), for shard_map.
    alpha_max, eta, beta: FAB's bias towards the clean image, overshoot and backward step.
    row_args: per-row arrays [B, ...] passed to logits_fn after the images (e.g. soup mixing
      weights), gathered with their rows.
    compact: a row stops once its closest point is misclassified and within eps (it is broken;
      later iterations would only bring it closer to x), and every `compact_every` iterations the
      rows still running are gathered and run in as few micro-batches of ~B/2 rows as hold them
      (`compaction`). Which rows end within eps is the same as with False; the points of
      those rows are then the first within eps, not the closest after all iterations.
    compact_every: iterations between two compactions.

  Returns:
    (x_adv [B, H, W, C] float32 in [0, 1], found [B] bool, dist [B] float32): the closest
    misclassified point found (the clean image where none was found, or where the clean image is
    already misclassified: dist 0 there), whether there is one, and its distance to `images` in
    `norm` (+inf where none was found).
  """
  check_fab_settings(eps=eps, norm=norm, num_steps=num_steps, restarts=restarts,
                     alpha_max=alpha_max, eta=eta, beta=beta)
  if isinstance(compact_every, bool) or int(compact_every) != compact_every or compact_every < 1:
    raise ValueError(f"compact_every must be an integer >= 1, got compact_every={compact_every}")
  row_args = tuple(row_args)
  x = lax.stop_gradient(jnp.asarray(images, jnp.float32))
  labels = jnp.asarray(labels)
  eps = jnp.asarray(eps, jnp.float32)
  index = pgd_lib._default_index(x, example_index)  # pylint: disable=protected-access
  clean_logits = logits_fn(x, *row_args)
  _check_classes(clean_logits.shape[-1], rank)
  targets = apgd_lib.runner_up_targets(clean_logits, labels, rank)
  clean_wrong = jnp.argmax(clean_logits, axis=-1) != labels
  best_dist = jnp.where(clean_wrong, 0.0, jnp.inf).astype(jnp.float32)

  def run(start, best, best_dist):
    rows = dict(x=x, y=labels, targets=targets, args=row_args, x1=start, best=best,
                best_dist=best_dist)
    out = _fab_run(logits_fn, rows, num_steps=num_steps, norm=norm, alpha_max=float(alpha_max),
                   eta=float(eta), beta=float(beta), eps=eps, compact=compact,
                   compact_every=int(compact_every))
    return out["best"], out["best_dist"]
  if restarts == 1:
    best, best_dist = run(x, x, best_dist)
  else:  # one scan (one copy of the loop to compile); restart 0 starts from the clean image
    key = jax.random.fold_in(rng, rank)

    def restart(carry, r):
      best, best_dist = carry
      radius = 0.5 * jnp.minimum(best_dist, eps)
      start = _random_start(pgd_lib.example_keys(key, index, r), x, radius, norm)
      return run(jnp.where(r == 0, x, start), best, best_dist), None
    (best, best_dist), _ = lax.scan(restart, (x, best_dist), jnp.arange(restarts))
  return best, jnp.isfinite(best_dist), best_dist


def fab_t(logits_fn, images, labels, rng, *, eps, num_steps: int = 100, norm: str = "linf",
          num_targets: int = DEFAULT_NUM_TARGETS, restarts: int = 1, example_index=None,
          alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA,
          row_args: tuple = (), compact: bool = True,
          compact_every: int = COMPACT_EVERY) -> jax.Array:
  """FAB-T over the top `num_targets` runner-up classes (at most K - 1), one `fab_t_single` each.

  Args as `fab_t_single`. Each example keeps the first target's point that is misclassified and
  `within_eps`; where no target gives one, the closest misclassified point over all targets (which
  lies outside eps), else the clean image. (The runner instead runs one target at a time on the
  examples still robust.) Returns [B, H, W, C] float32 in [0, 1].
  """
  check_fab_settings(eps=eps, norm=norm, num_steps=num_steps, restarts=restarts,
                     alpha_max=alpha_max, eta=eta, beta=beta)
  row_args = tuple(row_args)
  num_classes = pgd_lib.num_classes_of(lambda z: logits_fn(z, *row_args), images)
  _check_classes(num_classes)
  if int(num_targets) != num_targets or num_targets < 1:
    raise ValueError(f"num_targets must be an integer >= 1, got num_targets={num_targets}")
  n_t = min(int(num_targets), num_classes - 1)
  x = lax.stop_gradient(jnp.asarray(images, jnp.float32))

  def step(carry, rank):
    best, best_ok, best_dist = carry
    x_adv, _, dist = fab_t_single(logits_fn, x, labels, rng, rank, eps=eps, num_steps=num_steps,
                                  norm=norm, restarts=restarts, example_index=example_index,
                                  alpha_max=alpha_max, eta=eta, beta=beta, row_args=row_args,
                                  compact=compact, compact_every=compact_every)
    ok = jnp.isfinite(dist) & within_eps(x_adv, x, eps, norm)
    take = (ok & ~best_ok) | (~ok & ~best_ok & (dist < best_dist))
    best = jnp.where(_bcast(take, x), x_adv, best)
    return (best, best_ok | ok, jnp.where(take, dist, best_dist)), None

  init = (x, jnp.zeros(x.shape[:1], bool), jnp.full(x.shape[:1], jnp.inf, jnp.float32))
  (best, _, _), _ = lax.scan(step, init, jnp.arange(n_t))
  return best
