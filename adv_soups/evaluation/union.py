"""Robustness to each threat and to their union, and choosing a soup on held-out examples.

Inputs are per-example correctness arrays `[N, S]` (N examples, S soups / columns), one per
threat: True where the example is still classified correctly after that threat's attacks (its
own norm and eps). An example is robust to the *union* of the threats only if it is robust to
every one of them (the AND over threats; "Seasoning Model Soups", Croce et al. 2023).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

UNION = "union"


def union_correct(robust_by_threat: Mapping[str, np.ndarray]) -> np.ndarray:
  """Per example and soup, robust to every threat: AND over {threat: bool [N, S]} -> bool [N, S]."""
  arrays = [np.asarray(a, bool) for a in robust_by_threat.values()]
  if not arrays:
    raise ValueError("union robustness needs at least one threat")
  shapes = {a.shape for a in arrays}
  if len(shapes) > 1:
    raise ValueError(f"per-threat results disagree in shape: {sorted(shapes)}")
  return np.logical_and.reduce(arrays)


def accuracies(clean_correct: np.ndarray, robust_by_threat: Mapping[str, np.ndarray],
               mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Accuracy per soup [S] over the examples where `mask` [N] holds (default all): 'clean', one
  entry per threat and 'union'."""
  clean_correct = np.asarray(clean_correct, bool)
  mask = np.ones(clean_correct.shape[0], bool) if mask is None else np.asarray(mask, bool)
  if not mask.any():
    raise ValueError("no examples to score")
  out = {"clean": clean_correct[mask].mean(0)}
  for name, robust in robust_by_threat.items():
    out[name] = np.asarray(robust, bool)[mask].mean(0)
  out[UNION] = union_correct(robust_by_threat)[mask].mean(0)
  return out


def criteria(threat_names: list[str]) -> tuple[str, ...]:
  """The names `--select_on` accepts besides a shift: 'union', 'clean' and each threat."""
  return (UNION, "clean") + tuple(threat_names)


def select(scores: np.ndarray) -> int:
  """The index of the best soup given its selection scores [S] (the first among ties)."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or not scores.size:
    raise ValueError(f"selection scores must be a non-empty vector, got shape {scores.shape}")
  return int(np.argmax(scores))


def select_on_half(clean_correct: np.ndarray, robust_by_threat: Mapping[str, np.ndarray],
                   criterion: str, holdout: np.ndarray) -> dict:
  """Chooses the soup with the best `criterion` accuracy on the examples where `holdout` [N] is
  True and reports every accuracy of that soup on the others (disjoint: the selection never
  sees the examples it is scored on). Returns {criterion, index, selection_accuracy,
  reported: {clean, threat..., union}, selection_examples, reported_examples}."""
  holdout = np.asarray(holdout, bool)
  allowed = criteria(list(robust_by_threat))
  if criterion not in allowed:
    raise ValueError(f"unknown selection criterion {criterion!r}: allowed {', '.join(allowed)}")
  if holdout.all() or not holdout.any():
    raise ValueError("selection needs examples on both sides of the split")
  chosen = accuracies(clean_correct, robust_by_threat, holdout)
  index = select(chosen[criterion])
  reported = accuracies(clean_correct, robust_by_threat, ~holdout)
  return {"criterion": criterion, "index": index,
          "selection_accuracy": float(chosen[criterion][index]),
          "reported": {k: float(v[index]) for k, v in reported.items()},
          "selection_examples": int(holdout.sum()), "reported_examples": int((~holdout).sum())}


def first_half(num_examples: int) -> np.ndarray:
  """The selection mask [N] of a split in two: the first half selects, the second reports."""
  mask = np.zeros(num_examples, bool)
  mask[:num_examples // 2] = True
  return mask
