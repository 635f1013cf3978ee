"""Shrink-only compaction inside one compiled attack stage: rows already done stop costing compute.

An iterative attack (Square's queries, FAB's iterations) runs `body(i, rows) -> rows` on a batch of
B rows for i = start .. stop - 1. Every `chunk` iterations the rows still active are moved to the
front (a stable order: active rows by position, then the others) and the next chunk runs on
micro-batches of `micro` rows taken in that order, only as many as hold every active row
(ceil(active / micro)); each micro-batch's rows are written back, the rows no micro-batch took are
left as they were. The last micro-batch is shifted back to end at row B when it would run past it
(B need not be a multiple of `micro`); its rows that an earlier micro-batch already ran are not
written back. So the stage stays one compiled program with fixed shapes and *one* copy of the
model (at `micro` rows), a chunk with no active row runs nothing, and the work follows the active
rows in steps of `micro` rows.

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

MIN_MICRO = 8  # micro-batches are multiples of this (below it, a smaller batch saves nothing)
MICRO_FRACTION = 2  # a micro-batch is about half the batch (smaller ones run slower per row on CPU)


def micro_batch(batch: int, fraction: int = MICRO_FRACTION, multiple: int = MIN_MICRO) -> int:
  """Rows per micro-batch for a batch of `batch` rows: ceil(batch / fraction) rounded up to a
  multiple of `multiple`, at most `batch` (a batch of <= `multiple` rows is not compacted)."""
  size = -(-int(batch) // int(fraction))
  return min(int(batch), -(-size // multiple) * multiple)


def _take(tree, idx):
  return jax.tree_util.tree_map(lambda a: a[idx], tree)


def _put(tree, idx, sub):
  return jax.tree_util.tree_map(lambda a, s: a.at[idx].set(s), tree, sub)


def compacted_loop(body: Callable[[Any, Any], Any], rows: Any, active: Callable[[Any], Any],
                   start: int, stop: int, *, chunk: int, micro: int) -> Any:
  """`rows = body(i, rows)` for i in [start, stop), compacting the active rows every `chunk` steps.

  Args:
    body: (i int32 scalar, rows) -> rows; rows a pytree of arrays with a common leading axis
      [b, ...] (b = B or `micro`); must leave inactive rows unchanged (see the module docstring).
    rows: the pytree, leading axis B.
    active: rows -> [b] bool, the rows that still need iterations (evaluated at each chunk start).
    start, stop: static iteration range.
    chunk: iterations between two compactions (>= 1).
    micro: rows per micro-batch (`micro_batch(B)`); >= B turns compaction off (one plain
      `fori_loop` over all rows).

  Returns: rows after the last iteration, leading axis B.
  """
  if stop <= start:
    return rows
  batch = jax.tree_util.tree_leaves(rows)[0].shape[0]
  if micro >= batch:
    return lax.fori_loop(start, stop, body, rows)
  num_chunks = -(-(stop - start) // chunk)
  position = jnp.arange(batch, dtype=jnp.int32)

  def chunk_body(c, rows):
    first = start + c * chunk
    last = jnp.minimum(first + chunk, stop)
    act = active(rows)
    n = jnp.sum(act.astype(jnp.int32))
    order = jnp.argsort(jnp.where(act, position, batch + position))  # active first, stable

    def micro_body(m, rows):
      begin = m * micro
      offset = jnp.minimum(begin, batch - micro)  # the last one ends at row B
      idx = lax.dynamic_slice(order, (offset,), (micro,))
      sub = _take(rows, idx)
      out = lax.fori_loop(first, last, body, sub)
      fresh = offset + jnp.arange(micro) >= begin  # rows an earlier micro-batch has not run
      out = jax.tree_util.tree_map(
          lambda o, s: jnp.where(fresh.reshape((-1,) + (1,) * (o.ndim - 1)), o, s), out, sub)
      return _put(rows, idx, out)

    return lax.fori_loop(0, -(-n // micro), micro_body, rows)

  return lax.fori_loop(0, num_chunks, chunk_body, rows)
