"""The l_1 form of the Square Attack (AutoAttack's `square.py`, norm 'L1'): the l_2 form's moves
with l_1 norms, and the exact projection onto the l_1 ball and the box instead of a rescaling.

  - Start: the l_2 form's tiling of signed meta pseudo-gaussians (tiles of side H // 5, a random
    sign per tile and channel), scaled to l_1 norm eps, then projected onto the l_1 ball of
    radius eps intersected with [0, 1] (`l1.project_delta`).
  - Iteration: with delta = x_cur - x and two random s x s windows (s odd, >= 3, as the l_2
    form), the mass of window 2 is removed and window 1 gets, per channel, a new signed meta
    pseudo-gaussian plus its old content (normalised to l_1 norm 1), scaled to l_1 norm
    (max(eps - |delta|_1, 0) + |delta on both windows|_1) / C, so the budget the two windows held
    plus what is left is spent again; then the exact l_1-box projection.
Everything else (acceptance on a strictly better margin or a misclassification, the p schedule,
per-example keys, queries) is `square.square_run`'s. AutoAttack's copy that we could read has
only the l_inf and l_2 forms; this l_1 form follows the paper's construction for l_2 with the
norm replaced, as described above.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from adv_soups.attacks import l1 as l1_lib
from adv_soups.attacks import square_shapes as shapes

_TINY = 1e-12


def _project(delta, x, eps):
  return jnp.clip(x + l1_lib.project_delta(delta[None], x[None], eps)[0], 0.0, 1.0)


def l1_start(key, x, eps):
  """One example's start: x [H, W, C] -> x0 [H, W, C] with |x0 - x|_1 <= eps, in [0, 1]."""
  delta = shapes.tiled_start(key, *x.shape)
  delta = delta * eps / (jnp.sum(jnp.abs(delta)) + _TINY)
  return _project(delta, x, eps)


def l1_update(draws, x, x_cur, eps, s):
  """One example's candidate (see the module docstring): x, x_cur [H, W, C] -> [H, W, C]."""
  h, w, c = x.shape
  u = draws["u"]
  position = shapes.position
  r1, c1 = position(u[0], h, s), position(u[1], w, s)
  r2, c2 = position(u[2], h, s), position(u[3], w, s)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  in_1 = (rows >= r1) & (rows < r1 + s) & (cols >= c1) & (cols < c1 + s)
  in_2 = (rows >= r2) & (rows < r2 + s) & (cols >= c2) & (cols < c2 + s)
  delta = x_cur - x
  old = lax.dynamic_slice(delta, (r1, c1, 0), (s, s, c))
  old_norm = jnp.sum(jnp.abs(old), axis=(0, 1))  # [C]
  norm_all = jnp.sum(jnp.abs(delta))
  norm_windows = jnp.sum(jnp.abs(jnp.where((in_1 | in_2)[..., None], delta, 0.0)))
  eta = shapes.meta_pseudo_gaussian(s)
  eta = jnp.where(draws["flip"], eta.T, eta)
  new = eta[..., None] * draws["signs"] + old / (old_norm + _TINY)
  new_norm = jnp.sum(jnp.abs(new), axis=(0, 1))  # [C]
  budget = (jnp.maximum(eps - norm_all, 0.0) + norm_windows) / c
  new = new / (new_norm + _TINY) * budget
  delta = jnp.where(in_2[..., None], 0.0, delta)
  delta = lax.dynamic_update_slice(delta, new, (r1, c1, 0))
  return _project(delta, x, eps)
