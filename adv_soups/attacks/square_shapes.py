"""The Square Attack's static shapes and positions, shared by its l_inf / l_2 form (`square`) and
its l_1 form (`square_l1`): the l_2 / l_1 update's meta pseudo-gaussian, the l_2 start's tiling,
and a window's random position."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def rectangle_bump(rows: int, cols: int) -> np.ndarray:
  """[rows, cols]: sum of 1/(k+1)^2 over the concentric rectangles k >= d around the centre
  (rows // 2, cols // 2), d the Chebyshev distance to it; unit l_2 norm (empty if rows == 0)."""
  if rows == 0:
    return np.zeros((0, cols), np.float64)
  k_max = max(rows // 2 + 1, cols // 2 + 1)
  tail = np.cumsum((1.0 / (np.arange(k_max) + 1.0) ** 2)[::-1])[::-1]  # tail[d] = sum_{k>=d}
  d = np.maximum(np.abs(np.arange(rows)[:, None] - rows // 2),
                 np.abs(np.arange(cols)[None, :] - cols // 2))
  bump = tail[d]
  return bump / np.sqrt(np.sum(bump ** 2))


@functools.lru_cache(maxsize=None)
def meta_pseudo_gaussian(s: int) -> np.ndarray:
  """The l_2 Square Attack's s x s update shape: a positive bump on the top s // 2 rows, a
  negative one on the other rows, unit l_2 norm. [s, s] float32 (numpy)."""
  eta = np.concatenate([rectangle_bump(s // 2, s), -rectangle_bump(s - s // 2, s)])
  return (eta / np.sqrt(np.sum(eta ** 2))).astype(np.float32)


def l2_init_tiles(height: int, width: int):
  """The l_2 start's static tiling: (side s, tile id [H, W] int (-1: no tile), row offset
  [H, W], column offset [H, W], number of tiles). Tiles of side s = max(H // 5, 1) start at
  max((n - 5 s) // 2, 0) + k s along each axis (n = H or W) and must fit inside the image."""
  s = max(height // 5, 1)

  def starts(n):
    first = max((n - 5 * s) // 2, 0)
    return [first + k * s for k in range(n // s) if first + (k + 1) * s <= n]
  rows, cols = starts(height), starts(width)
  tile = -np.ones((height, width), np.int32)
  off_r = np.zeros((height, width), np.int32)
  off_c = np.zeros((height, width), np.int32)
  for a, r0 in enumerate(rows):
    for b, c0 in enumerate(cols):
      tile[r0:r0 + s, c0:c0 + s] = a * len(cols) + b
      off_r[r0:r0 + s, c0:c0 + s] = np.arange(s)[:, None]
      off_c[r0:r0 + s, c0:c0 + s] = np.arange(s)[None, :]
  return s, tile, off_r, off_c, len(rows) * len(cols)


def tiled_start(key, height: int, width: int, channels: int) -> jnp.ndarray:
  """The l_2 / l_1 start's unnormalised perturbation [H, W, C]: the image tiled with meta
  pseudo-gaussian squares (`l2_init_tiles`), each transposed or not and signed per channel at
  random (`key`); zero outside every tile."""
  s, tile, off_r, off_c, n_tiles = l2_init_tiles(height, width)
  eta = meta_pseudo_gaussian(s)
  k_t, k_s = jax.random.split(key)
  transpose = jax.random.bernoulli(k_t, 0.5, (n_tiles,))
  signs = jax.random.rademacher(k_s, (n_tiles, channels), jnp.float32)
  valid = tile >= 0
  t = np.where(valid, tile, 0)
  shape = jnp.where(transpose[t], eta.T[off_r, off_c], eta[off_r, off_c])  # [H, W]
  return jnp.where(valid[..., None], shape[..., None] * signs[t], 0.0)


def position(u, n, s):
  """A uniform integer in [0, n - s] from a uniform u in [0, 1)."""
  return jnp.minimum(jnp.floor(u * (n - s + 1)).astype(jnp.int32), n - s)
