"""The l_1 threat model: the exact projection onto the l_1 ball intersected with the pixel box,
l_1-APGD with its sparse step and eps schedule, and the l_1 pieces of FAB-T and Square.

Croce & Hein, "Mind the box: l_1-APGD for sparse adversarial attacks on image classifiers", ICML
2021; schedule and constants as in AutoAttack (`autopgd_base.py`, `set_version('standard')`).

Projection (`project_delta`). For a proposed perturbation u of x (x in [0, 1]^n), the closest d
(in l_2) with |d|_1 <= eps and x + d in [0, 1]^n is, coordinate-wise,
    d_i = sign(u_i) min(max(|u_i| - lam, 0), r_i),   r_i = room towards sign(u_i) (1 - x_i or x_i),
with lam = 0 when the box projection is already inside the ball, else the lam >= 0 with
    f(lam) = sum_i min(max(|u_i| - lam, 0), r_i) = eps
(the KKT conditions of the problem: soft-thresholding, then the box). f is non-increasing and
piecewise linear with breakpoints at |u_i| and |u_i| - r_i: f(lam) = sum_j w_j max(v_j - lam, 0)
over v = (|u|, |u| - r), w = (+1, -1). One sort of the 2n breakpoints and two cumulative sums
give f at every breakpoint and the segment holding the root (no data-dependent indexing).

l_1-APGD (`apgd_l1`), per example, from AutoAttack's L1 branch:
  - the step moves along the signs of the top-k gradient coordinates (|g_i| >= the k-th largest,
    k = ceil-ish (topk * n)), each by step / (number of coordinates moved), then projects;
  - no momentum; the first step size is 1 * eps (not 2 * eps);
  - every max(int(0.04 N), 1) iterations the sparsity adapts: with s = |x_best - x|_0, when s fell
    below 0.95 of its value at the previous check the step size resets to eps and the iterate to
    x_best (and its gradient), else the step size shrinks by 1.5 (within [eps / 10, eps]); topk
    becomes s / n / 1.5 (0.2 at a random start without an initial point);
  - `largereps` (AutoAttack's `use_largereps`, its standard l_1 version): an eps schedule of
    3 eps, 2 eps, eps over ceil(0.3 N), ceil(0.3 N) and the rest of the N iterations; the start is
    x + N(0, I) projected onto the 3 eps ball, each stage starts from the previous stage's best
    point projected onto its own ball, and only the last stage (radius eps) counts successes.
Success means a wrong prediction at some iterate of the (last) stage; the function returns that
iterate where there is one, else the best-loss point.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adv_soups.attacks import pgd as pgd_lib

L1_ALPHA = 1.0  # first step size / eps
SPARSITY_SHRINK = 1.5  # adasp_redstep: step size / 1.5 when the sparsity did not fall
MIN_STEP_FRACTION = 0.1  # step size >= eps / 10 (adasp_minstep = 10)
INIT_TOPK = 0.2
LARGEREPS_FACTORS = (3.0, 2.0, 1.0)
LARGEREPS_FRACTIONS = (0.3, 0.3, 0.4)
_bcast = pgd_lib._bcast  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def l1_norm(d: jax.Array) -> jax.Array:
  """Per-example l_1 norm: [B, ...] -> [B]."""
  return jnp.sum(jnp.abs(d.reshape(d.shape[0], -1)), axis=-1)


def project_delta(u: jax.Array, x: jax.Array, eps) -> jax.Array:
  """The exact projection of the perturbation u onto {d : |d|_1 <= eps, x + d in [0, 1]}.

  u, x: [B, ...] (x in [0, 1]); eps: scalar or [B], pixel units (>= 0). Returns d [B, ...]
  float32 (see the module docstring; |d|_1 <= eps up to float32 rounding, which a final
  rescaling keeps on the inside).
  """
  shape = u.shape
  u = u.reshape(shape[0], -1).astype(jnp.float32)
  x = x.reshape(shape[0], -1).astype(jnp.float32)
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (shape[0],))
  n = u.shape[-1]
  a = jnp.abs(u)
  room = jnp.where(u >= 0, 1.0 - x, x)
  room = jnp.maximum(room, 0.0)
  v = jnp.concatenate([a, a - jnp.minimum(room, a)], axis=-1)  # breakpoints
  w = jnp.concatenate([jnp.ones_like(a), -jnp.ones_like(a)], axis=-1)
  neg_v, w_s = lax.sort((-v, w), dimension=-1, num_keys=1)  # v descending
  v_s = -neg_v
  s_ex = jnp.cumsum(w_s * v_s, axis=-1) - w_s * v_s  # sum_{j<k} w_j v_j
  w_ex = jnp.cumsum(w_s, axis=-1) - w_s  # sum_{j<k} w_j
  f_at = s_ex - v_s * w_ex  # f(v_(k)), non-decreasing in k
  k = jnp.sum(f_at <= eps[:, None], axis=-1)  # >= 1 (f(v_(0)) = 0 <= eps)
  kk = jnp.minimum(k, 2 * n - 1)[:, None]
  s_k = jnp.take_along_axis(s_ex, kk, axis=-1)[:, 0]
  w_k = jnp.take_along_axis(w_ex, kk, axis=-1)[:, 0]
  lo = jnp.take_along_axis(v_s, kk, axis=-1)[:, 0]
  hi = jnp.take_along_axis(v_s, jnp.maximum(kk - 1, 0), axis=-1)[:, 0]
  lam = jnp.where(w_k > 0, (s_k - eps) / jnp.where(w_k > 0, w_k, 1.0), lo)
  lam = jnp.clip(lam, lo, hi)
  lam = jnp.where(k >= 2 * n, 0.0, jnp.maximum(lam, 0.0))
  d = jnp.sign(u) * jnp.minimum(jnp.maximum(a - lam[:, None], 0.0), room)
  norm = jnp.sum(jnp.abs(d), axis=-1)
  d = d * jnp.where(norm > eps, eps / jnp.maximum(norm, 1e-30), 1.0)[:, None]
  return d.reshape(shape)


def project(x_adv: jax.Array, x: jax.Array, eps) -> jax.Array:
  """x + project_delta(x_adv - x): the closest point to x_adv in the l_1 ball around x and
  [0, 1]. x_adv, x [B, ...]; eps scalar or [B]."""
  return jnp.clip(x + project_delta(x_adv - x, x, eps), 0.0, 1.0)


def boundary_projection(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Minimal-l_1 step d [N, n] with w . (t + d) = b and t + d in [0, 1]^n, per row (FAB's l_1
  projection). t [N, n] in [0, 1], w [N, n], b [N].

  The cheapest coordinates move first: after flipping signs so that c = w . t - b >= 0, moving
  coordinate i by m_i against w_i lowers w . z by |w_i| m_i, for an l_1 cost m_i, up to its room
  to the box edge; so, in order of decreasing |w_i|, each coordinate moves by
  clip((c - what the earlier ones achieved) / |w_i|, 0, room_i). Where the box cannot reach the
  hyperplane every coordinate with w_i != 0 moves to its edge (as `fab.boundary_projection`).
  """
  c = jnp.sum(w * t, axis=-1) - b
  flip = jnp.where(c >= 0, 1.0, -1.0)
  w = w * flip[:, None]
  c = jnp.abs(c)
  aw = jnp.abs(w)
  room = jnp.where(w > 0, t, 1.0 - t)
  order = jnp.argsort(-aw, axis=-1)
  aw_s = jnp.take_along_axis(aw, order, axis=-1)
  room_s = jnp.take_along_axis(room, order, axis=-1)
  gain = aw_s * room_s
  before = jnp.cumsum(gain, axis=-1) - gain  # achieved by the coordinates before
  live = aw_s > 0
  m_s = jnp.where(live, jnp.clip((c[:, None] - before) / jnp.where(live, aw_s, 1.0), 0.0,
                                 room_s), 0.0)
  inverse = jnp.argsort(order, axis=-1)
  m = jnp.take_along_axis(m_s, inverse, axis=-1)
  return -jnp.sign(w) * m


def random_start(keys: jax.Array, x: jax.Array, eps) -> jax.Array:
  """x + N(0, I) projected onto the l_1 ball of radius eps (scalar or [B]) and the box: keys [B],
  x [B, ...] -> [B, ...] (AutoAttack's l_1 start)."""
  noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
  return project(x + noise, x, eps)


# ---------------------------------------------------------------------------------------------
# l_1-APGD
# ---------------------------------------------------------------------------------------------
def largereps_schedule(num_steps: int) -> list[tuple[float, int]]:
  """[(eps factor, iterations)] of AutoAttack's use_largereps: 3, 2, 1 times eps over
  ceil(0.3 N), ceil(0.3 N) and N minus those (N >= 3; the last stage gets at least 1)."""
  first = [math.ceil(f * num_steps) for f in LARGEREPS_FRACTIONS[:-1]]
  last = num_steps - sum(first)
  if last < 1:
    raise ValueError(f"the l_1 eps schedule (3 eps, 2 eps, eps) needs num_steps >= 3, got "
                     f"num_steps={num_steps}")
  return list(zip(LARGEREPS_FACTORS, first + [last]))


def l0_norm(d: jax.Array) -> jax.Array:
  """Per-example number of non-zero coordinates [B] float32."""
  return jnp.sum((d.reshape(d.shape[0], -1) != 0).astype(jnp.float32), axis=-1)


def _sparse_step(x_adv, grad, x, step, topk, eps):
  """One l_1-APGD step: the signs of the top-k gradient coordinates, step / their count each,
  then the projection. x_adv, grad, x [B, ...]; step, topk, eps [B]."""
  bsz = x.shape[0]
  g = grad.reshape(bsz, -1)
  n = g.shape[-1]
  ag = jnp.abs(g)
  srt = jnp.sort(ag, axis=-1)
  idx = jnp.clip(jnp.floor((1.0 - topk) * n), 0, n - 1).astype(jnp.int32)[:, None]
  thr = jnp.take_along_axis(srt, idx, axis=-1)
  s = jnp.sign(g) * (ag >= thr)
  count = jnp.sum(jnp.abs(s), axis=-1, keepdims=True)
  moved = x_adv.reshape(bsz, -1) + step[:, None] * s / (count + 1e-10)
  return project(moved.reshape(x.shape), x, eps)


def _stage(state_fn, x, x_start, eps, num_steps: int, from_init: bool):
  """One l_1-APGD run of `num_steps` iterations at radius eps [B] from x_start.

  state_fn(x_adv, i) -> (wrong [B], loss [B], grad [B, ...]) at iterate i (-1: the start).
  Returns (x_best, found [B], loss_best [B], x_found)."""
  n = int(np.prod(x.shape[1:]))
  k_check = max(int(0.04 * num_steps), 1)
  wrong0, loss0, g0 = state_fn(x_start, -1)
  if from_init:
    sp0 = l0_norm(x_start - x)
    topk0 = sp0 / n / SPARSITY_SHRINK
  else:
    sp0 = jnp.full_like(loss0, float(n))
    topk0 = jnp.full_like(loss0, INIT_TOPK)
  state = dict(x=x_start, grad=g0, step=L1_ALPHA * eps * jnp.ones_like(loss0), topk=topk0,
               sp_old=sp0, x_best=x_start, grad_best=g0, loss_best=loss0, x_found=x_start,
               found=wrong0)

  def body(i, s):
    x_new = _sparse_step(s["x"], s["grad"], x, s["step"], s["topk"], eps)
    wrong, loss, g = state_fn(x_new, i)
    x_found = jnp.where(_bcast(wrong, x), x_new, s["x_found"])
    improved = loss > s["loss_best"]
    x_best = jnp.where(_bcast(improved, x), x_new, s["x_best"])
    grad_best = jnp.where(_bcast(improved, x), g, s["grad_best"])
    loss_best = jnp.where(improved, loss, s["loss_best"])
    chk = (i + 1) % k_check == 0
    sp = l0_norm(x_best - x)
    reset = chk & (sp < 0.95 * s["sp_old"])
    step = jnp.where(reset, L1_ALPHA * eps, s["step"] / SPARSITY_SHRINK)
    step = jnp.clip(step, L1_ALPHA * eps * MIN_STEP_FRACTION, L1_ALPHA * eps)
    return dict(
        x=jnp.where(_bcast(reset, x), x_best, x_new),
        grad=jnp.where(_bcast(reset, x), grad_best, g),
        step=jnp.where(chk, step, s["step"]),
        topk=jnp.where(chk, sp / n / SPARSITY_SHRINK, s["topk"]),
        sp_old=jnp.where(chk, sp, s["sp_old"]),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_found=x_found,
        found=s["found"] | wrong)

  s = lax.fori_loop(0, num_steps, body, state)
  return s["x_best"], s["found"], s["loss_best"], s["x_found"]


def apgd_l1_run(state_fn, x, keys, eps, num_steps: int, largereps: bool):
  """One l_1-APGD run (one random start per example, `keys` [B]); returns (x_out, success [B],
  best loss [B]) like `apgd._apgd_run`. With `largereps` the 3 / 2 / 1 eps schedule."""
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (x.shape[0],))
  if not largereps:
    x0 = random_start(keys, x, eps)
    x_best, found, loss_best, x_found = _stage(state_fn, x, x0, eps, num_steps, False)
  else:
    x_init = random_start(keys, x, LARGEREPS_FACTORS[0] * eps)
    for factor, iters in largereps_schedule(num_steps):
      x_init = project(x_init, x, factor * eps)
      x_init, found, loss_best, x_found = _stage(state_fn, x, x_init, factor * eps, iters, True)
    x_best = x_init
  x_out = jnp.where(_bcast(found, x), x_found, x_best)
  return x_out, found, loss_best
