"""Sampling uncertainty of an accuracy measured on n examples (what a plot must show with it).

An accuracy p measured on n test examples is a binomial proportion: its 95% interval is the
Wilson score interval (it stays inside [0, 1] and is sensible near 0 and 1, where the normal
approximation is not). On 360 digits test images an accuracy of 98% has the interval
[96.0%, 99.1%]: differences of half a point there are two images, i.e. noise.
"""
from __future__ import annotations

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(accuracy, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) of the Wilson score interval for accuracies `accuracy` (fractions in [0, 1],
  any shape) measured on `n` examples each (broadcast); NaN where n is 0."""
  p = np.asarray(accuracy, np.float64)
  n = np.asarray(n, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def percent_interval(values, n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(accuracies %, lower errors %, upper errors %) of fractions `values` on `n` examples each:
  what matplotlib's `errorbar(..., yerr=(lower, upper))` takes."""
  p = np.asarray(values, np.float64)
  low, high = wilson_interval(p, n)
  return 100 * p, 100 * (p - low), 100 * (high - p)


def differ_beyond_noise(a: float, b: float, n: int, z: float = Z95) -> bool:
  """Whether accuracies `a` and `b` (fractions, each on n examples) differ by more than their
  95% intervals allow: the intervals do not overlap (a conservative test)."""
  (lo_a, hi_a), (lo_b, hi_b) = (wilson_interval(x, n, z) for x in (a, b))
  return bool(hi_a < lo_b or hi_b < lo_a)
