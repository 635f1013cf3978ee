"""Adapter soups as pytree arithmetic.

Rule: a parameter is domain-specific iff its name starts with `domain_` (see models/adapters.py);
its leading axis has length num_domains. `interpolate(params, [1 - a, a])` is the adversarial model
soup at alpha `a` (0 = clean mode, 1 = robust mode), a standalone model with `num_domains=1`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adv_soups.models.adapters import DOMAIN_PREFIX


def _name(path) -> str:
  key = path[-1]
  return str(getattr(key, "key", getattr(key, "name", key)))


def domain_specific(params: Any) -> Any:
  """A pytree of bools matching `params`: True for the domain-specific leaves."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _name(p).startswith(DOMAIN_PREFIX), params)


def count_params(params: Any) -> tuple[int, int]:
  """(total number of parameters, domain-specific parameters per domain)."""
  leaves = jax.tree.leaves(params)
  flags = jax.tree.leaves(domain_specific(params))
  total = sum(int(np.prod(x.shape)) for x in leaves)
  per_domain = sum(int(np.prod(x.shape[1:])) for x, f in zip(leaves, flags) if f)
  return total, per_domain


def num_domains(params: Any) -> int:
  """The length of the domain axis (1 when the model has no domain-specific parameters)."""
  sizes = {x.shape[0] for x, f in zip(jax.tree.leaves(params),
                                      jax.tree.leaves(domain_specific(params))) if f}
  if len(sizes) > 1:
    raise ValueError(f"domain-specific parameters disagree on the number of domains: {sizes}")
  return sizes.pop() if sizes else 1


def interpolate(params: Any, weights: Sequence[float] | jax.Array) -> Any:
  """Parameters of a single-domain model (num_domains=1) whose adapter is sum_d weights[d] * p[d].

  `weights` has one float per domain; shared leaves are returned unchanged (all of them for a
  model without domain-specific parameters).
  """
  weights = jnp.asarray(weights, jnp.float32)
  if not any(jax.tree.leaves(domain_specific(params))):
    return params  # adapter "none": every domain is the same model
  count = num_domains(params)
  if weights.shape != (count,):
    raise ValueError(f"interpolate needs {count} weights (one per domain), got shape "
                     f"{tuple(weights.shape)}")

  def mix(x, specific):
    if not specific:
      return x
    return jnp.einsum("d,d...->...", weights, x.astype(jnp.float32))[None].astype(x.dtype)

  return jax.tree.map(mix, params, domain_specific(params))


def mix_weights(alphas: Sequence[float] | jax.Array) -> np.ndarray:
  """Mixing weights [A, 2] = [[1 - a, a] for a in alphas] for a two-domain model (float32
  numpy: host-side, so building a request compiles nothing)."""
  alphas = np.asarray(alphas, np.float32).reshape(-1)
  return np.stack([1.0 - alphas, alphas], axis=-1)


def _check_match(trees: Sequence[Any]) -> None:
  ref_def = jax.tree.structure(trees[0])
  ref = [(np.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(trees[0])]
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trees[0])]
  for i, tree in enumerate(trees[1:], start=1):
    if jax.tree.structure(tree) != ref_def:
      raise ValueError(f"tree {i} has a different structure from tree 0: "
                       f"{jax.tree.structure(tree)} vs {ref_def}")
    for path, (shape, dtype), x in zip(paths, ref, jax.tree.leaves(tree)):
      if np.shape(x) != shape:
        raise ValueError(f"leaf {path}: shape {np.shape(x)} in tree {i} vs {shape} in tree 0")
      if jnp.result_type(x) != dtype:
        raise ValueError(f"leaf {path}: dtype {jnp.result_type(x)} in tree {i} vs {dtype} in tree 0")


def lerp(tree_a: Any, tree_b: Any, a: float) -> Any:
  """(1 - a) * tree_a + a * tree_b for two pytrees of identical structure, shapes and dtypes."""
  _check_match([tree_a, tree_b])
  return jax.tree.map(lambda x, y: ((1.0 - a) * x + a * y).astype(jnp.result_type(x)),
                      tree_a, tree_b)


def uniform(trees: Sequence[Any]) -> Any:
  """The mean of several matching pytrees (a uniform soup, e.g. of checkpoints)."""
  trees = list(trees)
  if not trees:
    raise ValueError("uniform() needs at least one tree")
  _check_match(trees)
  return jax.tree.map(lambda *xs: (sum(xs) / len(xs)).astype(jnp.result_type(xs[0])), *trees)
