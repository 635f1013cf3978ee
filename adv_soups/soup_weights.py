"""Soup mixing weights over all domains (0 = clean, i = the i-th threat): parsing and grids.

A soup is a weight vector w [num_domains] with sum(w) = 1: the model called with mixing weights
w (per example) equals the parameter-space soup sum_d w[d] * p[d] (see soups.py). Forms of the
`--weights` flag:

  simplex:0.1              every point of the simplex whose coordinates are multiples of 0.1
                           (66 soups for 3 domains), corners included
  0.2,0.3,0.5;0,0,1        explicit vectors, ';' between soups, ',' between domains
                           (fractions such as 1/3 are allowed)

Weights must sum to 1 (within 1e-6); a weight outside [0, 1] (an affine soup that leaves the
simplex, as "Seasoning Model Soups" allows) needs `extrapolate`.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from adv_soups import numbers

SUM_TOLERANCE = 1e-6
_FORMS = "simplex:STEP (e.g. simplex:0.1) or vectors such as 0.2,0.3,0.5;0,0,1"


def simplex_grid(num_domains: int, step: float) -> np.ndarray:
  """All weight vectors [S, num_domains] (float64) on the simplex with coordinates in multiples
  of `step` (1 / step must be an integer), in lexicographic order of their integer counts,
  largest domain-0 weight first. S = C(n + D - 1, D - 1) with n = 1 / step."""
  n = round(1.0 / step) if step > 0 else 0
  if n < 1 or not math.isclose(n * step, 1.0, rel_tol=0, abs_tol=1e-9):
    raise ValueError(f"simplex step {step} must be 1/n for an integer n >= 1 (e.g. 0.1, 0.25, "
                     "1/3)")
  rows = [counts for counts in itertools.product(range(n, -1, -1), repeat=num_domains)
          if sum(counts) == n]
  return np.asarray(rows, np.float64) / n


def parse_weights(text: str, num_domains: int, extrapolate: bool = False) -> np.ndarray:
  """Soup weights [S, num_domains] (float64) from `--weights` text (see the module docstring).
  ValueError (one line) for a malformed text, a vector of the wrong length, weights not summing to
  1, or weights outside [0, 1] without `extrapolate`."""
  text = str(text).strip()
  if text.startswith("simplex:"):
    try:
      step = numbers.parse_number(text.split(":", 1)[1], "simplex step")
    except ValueError:
      raise ValueError(f"malformed --weights={text!r}: expected {_FORMS}") from None
    return simplex_grid(num_domains, step)
  try:
    rows = [[numbers.parse_number(v, "weight") for v in part.split(",")]
            for part in text.split(";") if part.strip()]
  except ValueError:
    raise ValueError(f"malformed --weights={text!r}: expected {_FORMS}") from None
  if not rows:
    raise ValueError(f"--weights is empty: expected {_FORMS}")
  for row in rows:
    if len(row) != num_domains:
      raise ValueError(f"--weights vector {','.join(map(str, row))} has {len(row)} values; the "
                       f"model has {num_domains} domains (clean + each threat)")
    if not all(math.isfinite(v) for v in row):
      raise ValueError(f"--weights vector {','.join(map(str, row))} has a non-finite value")
    if abs(sum(row) - 1.0) > SUM_TOLERANCE:
      raise ValueError(f"--weights vector {','.join(map(str, row))} sums to {sum(row):.6g}: "
                       "soup weights must sum to 1")
    if not extrapolate and any(not 0.0 <= v <= 1.0 for v in row):
      raise ValueError(f"--weights vector {','.join(map(str, row))} leaves the simplex (a weight "
                       "outside [0, 1]); pass --extrapolate to allow affine soups")
  return np.asarray(rows, np.float64)


def label(weights: np.ndarray) -> str:
  """A short text name of one soup, e.g. '0.2,0.3,0.5' (for tables and CSV)."""
  return ",".join(f"{round(float(w), 6):g}" for w in weights)
