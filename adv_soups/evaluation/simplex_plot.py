"""The simplex (ternary) plot of a three-domain sweep: one triangle per metric (clean, each threat,
union), the soups' accuracy as colour, the best soup of each panel marked with a star.

Corner d of the triangle is domain d (0 = clean); a soup with weights w sits at
sum_d w[d] * corner[d], so the grid of `simplex:STEP` fills the triangle and affine soups
(weights outside [0, 1]) fall outside it.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

CORNERS = np.asarray([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3.0) / 2.0]])


def to_plane(weights: np.ndarray) -> np.ndarray:
  """Ternary coordinates [S, 2] of soup weights [S, 3] (rows summing to 1)."""
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 2 or weights.shape[1] != 3:
    raise ValueError(f"the simplex plot needs weights [S, 3], got shape {weights.shape}")
  return weights @ CORNERS


def best(values: np.ndarray) -> int:
  """Index of the best soup of one panel (the first among ties)."""
  return int(np.argmax(np.asarray(values, np.float64)))


def to_png(weights: np.ndarray, metrics: Mapping[str, Sequence[float]],
           corner_names: Sequence[str], title: str = "") -> bytes:
  """PNG bytes: one ternary panel per entry of `metrics` ({name: accuracy [S] in [0, 1]}), colour
  = accuracy (%), a star on each panel's best soup; `corner_names` names the 3 domains."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  from matplotlib import tri as mtri
  xy = to_plane(weights)
  fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), squeeze=False)
  for ax, (name, values) in zip(axes[0], metrics.items()):
    values = 100.0 * np.asarray(values, np.float64)
    outline = np.vstack([CORNERS, CORNERS[:1]])
    ax.plot(outline[:, 0], outline[:, 1], "k-", lw=0.8)
    if len(xy) >= 3 and np.ptp(xy[:, 1]) > 0:
      try:
        ax.tripcolor(mtri.Triangulation(xy[:, 0], xy[:, 1]), values, shading="gouraud",
                     cmap="viridis", vmin=0, vmax=100)
      except (RuntimeError, ValueError):  # collinear points: the scatter below is enough
        pass
    points = ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap="viridis", vmin=0, vmax=100, s=18,
                        edgecolors="k", linewidths=0.3)
    top = best(values)
    ax.scatter(xy[top, 0], xy[top, 1], marker="*", s=220, c="red", edgecolors="white",
               linewidths=0.8, zorder=5)
    for corner, label, offset in zip(CORNERS, corner_names, ((-12, -12), (0, -12), (-6, 6))):
      ax.annotate(label, corner, xytext=offset, textcoords="offset points", fontsize=8)
    ax.set_title(f"{name}: best {values[top]:.1f}%", fontsize=9)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.colorbar(points, ax=ax, shrink=0.7, label="accuracy (%)")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()
