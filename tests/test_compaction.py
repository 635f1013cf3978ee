"""Micro-batch compaction (`attacks.compaction`): exact, and it skips the rows already done."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adv_soups.attacks import compaction


def _count_rows(budget: np.ndarray, micro: int, chunk: int, steps: int):
  """Each row counts up to its own budget (active while below it) and records the iteration at
  which it got there (`stopped`); `touched` counts every iteration a row went through, active or
  not (the work spent on it)."""
  def body(i, r):
    act = r["count"] < r["budget"]
    count = r["count"] + act.astype(jnp.int32)
    stopped = jnp.where(act & (count == r["budget"]), i, r["stopped"])
    return dict(r, count=count, stopped=stopped, touched=r["touched"] + 1)
  zeros = jnp.zeros(len(budget), jnp.int32)
  rows = dict(count=zeros, budget=jnp.asarray(budget, jnp.int32), stopped=zeros - 1,
              touched=zeros)
  run = jax.jit(lambda r: compaction.compacted_loop(
      body, r, lambda r: r["count"] < r["budget"], 0, steps, chunk=chunk, micro=micro))
  return jax.tree.map(np.asarray, run(rows))


@pytest.mark.parametrize("batch", [21, 24])  # not a multiple of the micro-batch, and one
def test_same_rows_as_without_compaction_and_less_work(batch):
  """Every row ends as without compaction (the iteration at which it reached its budget: a row
  run twice in one chunk, or skipped while active, would get there at another), and the rows
  done early stop costing work: the total is below the plain loop's B x steps."""
  budget = np.random.default_rng(0).integers(0, 40, size=batch)
  plain = _count_rows(budget, micro=batch, chunk=5, steps=40)
  compacted = _count_rows(budget, micro=8, chunk=5, steps=40)
  np.testing.assert_array_equal(plain["stopped"], np.where(budget > 0, budget - 1, -1))
  np.testing.assert_array_equal(compacted["stopped"], plain["stopped"])
  np.testing.assert_array_equal(compacted["count"], plain["count"])
  assert compacted["touched"].sum() < 0.75 * plain["touched"].sum()


def test_micro_batch_sizes():
  """About half the batch (a quarter when asked), a multiple of 8, never above the batch."""
  assert compaction.micro_batch(360) == 184
  assert compaction.micro_batch(360, fraction=4) == 96
  assert compaction.micro_batch(48) == 24
  assert compaction.micro_batch(8) == 8
  assert compaction.micro_batch(5) == 5
