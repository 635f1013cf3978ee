"""Shrink-only compaction inside one compiled attack stage: rows already done stop costing compute.

An iterative attack (Square's queries, FAB's iterations) runs `body(i, rows) -> rows` on a batch of
B rows for i = start .. stop - 1. Every `chunk` iterations the rows still active are moved to the
front (a stable order: active rows by position, then the others) and the next chunk runs on the
first `size` rows only, `size` the smallest of a few static bucket sizes (`bucket_sizes`: B, then
about B/2, B/4, B/8, multiples of 8) that holds every active row; the rows it ran on are written
back, the others are left as they were. A `lax.switch` picks the bucket, so the whole stage is still
one compiled program with fixed shapes (one copy of the model per bucket size); a chunk with no
active row runs nothing.

What makes it exact: `body` must treat rows independently (the model too: no batch statistics),
take everything it needs per row from `rows` (the clean images, labels, per-example random keys,
per-row model inputs), draw its randomness from the row's own key and the global iteration
number i (never from the batch position), and leave a row that is not active unchanged. Then every
row goes through the same sequence of computations with and without compaction (up to the
float rounding of a different batch size, which XLA's CPU kernels do not show).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

MIN_BUCKET = 8  # buckets are multiples of this (below it, a smaller batch saves nothing)


def bucket_sizes(batch: int, num_sizes: int = 4, multiple: int = MIN_BUCKET) -> tuple[int, ...]:
  """Static row counts a chunk may run on, descending: (batch, ~batch/2, ~batch/4, ...).

  Each smaller size is ceil(batch / 2^k) rounded up to a multiple of `multiple`; sizes not below
  the previous one are dropped, so a small batch gets fewer (batch <= multiple: only (batch,)).
  """
  sizes = [int(batch)]
  for k in range(1, num_sizes):
    s = -(-int(batch) // 2 ** k)
    s = -(-s // multiple) * multiple
    if s < sizes[-1]:
      sizes.append(s)
  return tuple(sizes)


def _take(tree, idx):
  return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _put(tree, idx, sub):
  return jax.tree_util.tree_map(lambda a, s: a.at[idx].set(s), tree, sub)


def compacted_loop(body: Callable[[Any, Any], Any], rows: Any, active: Callable[[Any], Any],
                   start: int, stop: int, *, chunk: int, sizes: tuple[int, ...]) -> Any:
  """`rows = body(i, rows)` for i in [start, stop), compacting the active rows every `chunk` steps.

  Args:
    body: (i int32 scalar, rows) -> rows; rows a pytree of arrays with a common leading axis
      [b, ...] (b any of `sizes`); must leave inactive rows unchanged (see the module docstring).
    rows: the pytree, leading axis B = sizes[0].
    active: rows -> [b] bool, the rows that still need iterations (evaluated at each chunk start).
    start, stop: static iteration range.
    chunk: iterations between two compactions (>= 1).
    sizes: `bucket_sizes(B)`; (B,) alone turns compaction off (one plain `fori_loop`).

  Returns: rows after the last iteration, leading axis B.
  """
  if stop <= start:
    return rows
  if len(sizes) == 1:
    return lax.fori_loop(start, stop, body, rows)
  batch = sizes[0]
  num_chunks = -(-(stop - start) // chunk)

  def run(first, last, sub):
    return lax.fori_loop(first, last, body, sub)

  def chunk_body(c, rows):
    first = start + c * chunk
    last = jnp.minimum(first + chunk, stop)
    act = active(rows)
    n = jnp.sum(act.astype(jnp.int32))
    position = jnp.arange(batch, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(act, position, batch + position))  # active first, stable

    def branch(size):
      if size == batch:
        return lambda r: run(first, last, r)

      def compact(r):
        idx = order[:size]
        return _put(r, idx, run(first, last, _take(r, idx)))
      return compact
    branches = [branch(s) for s in sizes] + [lambda r: r]  # last: nothing active
    smallest = jnp.sum(jnp.asarray(sizes) >= n) - 1  # index of the smallest size holding n
    return lax.switch(jnp.where(n == 0, len(sizes), smallest), branches, rows)

  return lax.fori_loop(0, num_chunks, chunk_body, rows)
