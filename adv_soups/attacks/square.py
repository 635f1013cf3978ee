"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020), l_inf and l_2, untargeted.

A score-based random search: it only evaluates `logits_fn` (no gradient is ever taken), so a model
that hides its gradients (quantised inputs, zero or noisy gradients) cannot fool it. AutoAttack's
standard version: 5,000 queries, p_init = 0.8, one restart, the CW margin loss.

  - Start: l_inf, vertical stripes (one sign per column and channel, constant down each column)
    of +-eps; l_2, a grid of s x s tiles (s = H // 5) each holding a signed "meta pseudo-gaussian"
    `meta_pseudo_gaussian(s)`, the whole scaled to l_2 norm eps. Then clipped to [0, 1].
  - Iteration i changes one square of side s_i at a uniformly random position (every valid
    position, 0 .. H - s_i). l_inf: each channel of the square is set to x +- eps (random sign per
    channel). l_2: the perturbation of a second random window is removed and its mass, with the
    budget left, is put into the first window together with a new signed meta pseudo-gaussian;
    the whole perturbation is then rescaled to l_2 norm eps (as AutoAttack does), so it stays in
    the eps ball. Both are then clipped to [0, 1].
  - The candidate replaces the current point only when the margin loss max_{j != y} z_j - z_y
    increases strictly, or when the candidate is misclassified.
  - An example stops changing once its current point is misclassified (a mask), and every
    `compact_every` (100) queries the examples not yet broken are gathered to the front and run
    in micro-batches of about half the batch, only as many as hold them, so broken ones
    stop costing forward passes (`compaction`; the per-example random streams make the results
    the same as without it).
  - Side length: s_i = round(sqrt(p_i H W)) (at least 1; l_2: at least 3 and odd), at most
    min(H, W), where p_i = p_init / 2^k halves after iterations 10, 50, 200, 500, 1000, 2000,
    4000, 6000 and 8000 (`p_schedule`). AutoAttack's standard version uses this schedule as it
    stands for its 5,000 queries (`resc_schedule=False`); `rescale_schedule=True` stretches it to
    the query budget (iteration i counts as int(i / num_queries * 10000)), the Square Attack
    class's own default and the paper's setting for 10,000 queries.

Since s_i changes only at those fixed iterations, the iterations form at most 10 phases of one side
each (`phases`); the update is a `lax.switch` over one branch per phase, each with a static square
size (static `dynamic_slice` sizes), inside one `lax.fori_loop`, so the model itself is compiled
once (not once per phase).

Queries: one forward pass for the start and one per iteration, as AutoAttack counts them
(num_queries iterations), plus one on the clean images (points misclassified there are returned
unchanged and not attacked).

Randomness is keyed per example: example i uses k_i = fold_in(rng, example_index[i]), its start
fold_in(k_i, 0) and iteration t (0-based) fold_in(k_i, t + 1) (window positions drawn as uniforms
scaled to the phase's range of positions). Unlike AutoAttack, which draws one
square position (and, in l_inf, one set of signs) per iteration for the whole batch, every example
draws its own, so a result depends neither on the batch it sits in nor on the sharding.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adv_soups.attacks import compaction
from adv_soups.attacks import square_shapes as shapes
from adv_soups.attacks import losses as losses_lib

from adv_soups.attacks import pgd as pgd_lib

NUM_QUERIES = 5000
P_INIT = 0.8
# p halves after each of these iteration counts (of a 10,000-query schedule).
P_HALVING_ITERATIONS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_TINY = 1e-12
COMPACT_EVERY = 100  # queries between two compactions of the rows not yet broken


# ---------------------------------------------------------------------------------------------
# Static schedule
# ---------------------------------------------------------------------------------------------
def p_schedule(num_queries: int, p_init: float = P_INIT, rescale: bool = False) -> np.ndarray:
  """Fraction of pixels p_i changed at iteration i = 0 .. num_queries - 1: [num_queries] float.

  p_i = p_init / 2^(number of halving iterations strictly below i'), where i' = i, or
  int(i / num_queries * 10000) with `rescale`.
  """
  it = np.arange(num_queries)
  if rescale:
    it = (it / num_queries * 10000).astype(np.int64)
  halvings = np.sum(it[:, None] > np.asarray(P_HALVING_ITERATIONS)[None, :], axis=1)
  return p_init / 2.0 ** halvings


def side_length(p: float, height: int, width: int, norm: str) -> int:
  """Side (pixels) of the square changed when a fraction p of the H x W pixels is to change."""
  s = int(round(math.sqrt(p * height * width)))
  if norm == "linf":
    s = max(s, 1)
  else:
    s = max(s, 3)
    s += 1 - s % 2  # odd
  return min(s, height, width)


def phases(num_queries: int, height: int, width: int, norm: str, p_init: float = P_INIT,
           rescale: bool = False) -> list[tuple[int, int, int]]:
  """The iterations grouped by square side: [(first, end (exclusive), side)], in order."""
  sides = [side_length(float(p), height, width, norm)
           for p in p_schedule(num_queries, p_init, rescale)]
  out = []
  for i, s in enumerate(sides):
    if out and out[-1][2] == s:
      out[-1] = (out[-1][0], i + 1, s)
    else:
      out.append((i, i + 1, s))
  return out


# ---------------------------------------------------------------------------------------------
# Starts and updates (one example: x [H, W, C])
# ---------------------------------------------------------------------------------------------
def _l2_normalize(d: jax.Array) -> jax.Array:
  return d / (jnp.sqrt(jnp.sum(d * d)) + _TINY)


def _linf_start(key, x, eps):
  _, w, c = x.shape
  stripes = jax.random.rademacher(key, (1, w, c), jnp.float32)
  return jnp.clip(x + eps * stripes, 0.0, 1.0)


def _l2_start(key, x, eps):
  delta = shapes.tiled_start(key, *x.shape)
  return jnp.clip(x + eps * _l2_normalize(delta), 0.0, 1.0)


def _draws(key, channels: int) -> dict:
  """One iteration's random numbers for one example, independent of the square's side: window
  positions as uniforms [4] in [0, 1), a sign per channel [C], a transpose flip."""
  k_u, k_s, k_t = jax.random.split(key, 3)
  return dict(u=jax.random.uniform(k_u, (4,)),
              signs=jax.random.rademacher(k_s, (channels,), jnp.float32),
              flip=jax.random.bernoulli(k_t))


def _linf_update(draws, x, x_cur, eps, s):
  """x_cur with one s x s square (all channels) set to clip(x +- eps) (sign per channel)."""
  h, w, c = x.shape
  r, col = shapes.position(draws["u"][0], h, s), shapes.position(draws["u"][1], w, s)
  window = lax.dynamic_slice(x, (r, col, 0), (s, s, c))
  new = jnp.clip(window + eps * draws["signs"], 0.0, 1.0)
  return lax.dynamic_update_slice(x_cur, new, (r, col, 0))


def _l2_update(draws, x, x_cur, eps, s):
  """x_cur with mass moved from a random window 2 into window 1 (see the module docstring)."""
  h, w, c = x.shape
  u = draws["u"]
  r1, c1 = shapes.position(u[0], h, s), shapes.position(u[1], w, s)
  r2, c2 = shapes.position(u[2], h, s), shapes.position(u[3], w, s)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  in_1 = (rows >= r1) & (rows < r1 + s) & (cols >= c1) & (cols < c1 + s)
  in_2 = (rows >= r2) & (rows < r2 + s) & (cols >= c2) & (cols < c2 + s)
  delta = x_cur - x
  old = lax.dynamic_slice(delta, (r1, c1, 0), (s, s, c))
  old_norm = jnp.sqrt(jnp.sum(old * old, axis=(0, 1)))  # [C]
  norm_all = jnp.sqrt(jnp.sum(delta * delta))
  norm_windows = jnp.sqrt(jnp.sum(jnp.where((in_1 | in_2)[..., None], delta, 0.0) ** 2))
  eta = shapes.meta_pseudo_gaussian(s)
  eta = jnp.where(draws["flip"], eta.T, eta)
  new = eta[..., None] * draws["signs"] + old / (old_norm + _TINY)
  new_norm = jnp.sqrt(jnp.sum(new * new, axis=(0, 1)))  # [C]
  budget = jnp.sqrt(jnp.maximum(eps * eps - norm_all * norm_all, 0.0) / c + norm_windows ** 2)
  new = new / (new_norm + _TINY) * budget
  delta = jnp.where(in_2[..., None], 0.0, delta)
  delta = lax.dynamic_update_slice(delta, new, (r1, c1, 0))
  return jnp.clip(x + eps * _l2_normalize(delta), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------
def check_square_settings(*, eps, norm: str, num_queries: int, p_init: float) -> None:
  """Raises ValueError for a bad eps / norm / num_queries / p_init (data-free checks)."""
  if isinstance(num_queries, bool) or int(num_queries) != num_queries or num_queries < 1:
    raise ValueError(f"num_queries must be an integer >= 1, got num_queries={num_queries}")
  if not 0 < float(p_init) <= 1:
    raise ValueError(f"p_init must be in (0, 1], got p_init={p_init}")
  pgd_lib.check_settings(eps=eps, norm=norm, num_steps=int(num_queries),
                         norms=pgd_lib.ALL_NORMS)


def square_run(logits_fn, images, labels, rng, *, eps: float, num_queries: int = NUM_QUERIES,
               norm: str = "linf", p_init: float = P_INIT, rescale_schedule: bool = False,
               example_index=None, row_args: tuple = (), compact: bool = True,
               compact_every: int = COMPACT_EVERY):
  """Square Attack, returning (x_adv [B, H, W, C], wrong [B] bool, queries [B] int32).

  Args as `square`. `wrong`: x_adv is misclassified (argmax != label; also for clean errors);
  `queries`: forward passes spent on the example (the start counts one; 0 for clean errors),
  as AutoAttack counts them.
  """
  check_square_settings(eps=eps, norm=norm, num_queries=num_queries, p_init=p_init)
  if jnp.ndim(images) != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {jnp.shape(images)}")
  if isinstance(compact_every, bool) or int(compact_every) != compact_every or compact_every < 1:
    raise ValueError(f"compact_every must be an integer >= 1, got compact_every={compact_every}")
  row_args = tuple(row_args)
  pgd_lib.validate(lambda z: logits_fn(z, *row_args), images, labels, None, eps=eps, norm=norm,
                   num_steps=num_queries, restarts=1, loss="margin",
                   norms=pgd_lib.ALL_NORMS)
  x = lax.stop_gradient(jnp.asarray(images, jnp.float32))
  labels = jnp.asarray(labels)
  eps = jnp.asarray(eps, jnp.float32)
  bsz, h, w, _ = x.shape
  index = pgd_lib._default_index(x, example_index)  # pylint: disable=protected-access
  keys = pgd_lib.example_keys(rng, index)
  bc = pgd_lib._bcast  # pylint: disable=protected-access
  start = _linf_start if norm == "linf" else _l2_start
  update = _linf_update if norm == "linf" else _l2_update
  if norm == "l1":  # the l_1 form (its own module; imported here: it builds on this one)
    from adv_soups.attacks import square_l1
    start, update = square_l1.l1_start, square_l1.l1_update

  def evaluate(xa, y, args):
    logits = logits_fn(xa, *args)
    return losses_lib.margin_loss(logits, y), jnp.argmax(logits, axis=-1) != y

  _, clean_wrong = evaluate(x, labels, row_args)
  x0 = jax.vmap(lambda k, xi: start(jax.random.fold_in(k, 0), xi, eps))(keys, x)
  x0 = jnp.where(bc(clean_wrong, x), x, x0)
  loss0, wrong0 = evaluate(x0, labels, row_args)

  schedule = phases(int(num_queries), h, w, norm, float(p_init), rescale_schedule)
  firsts = np.asarray([first for first, _, _ in schedule])
  # One branch per side length (static slice sizes); the model is called once, after them.
  branches = [jax.vmap(functools.partial(update, eps=eps, s=s)) for _, _, s in schedule]

  def body(i, r):
    # Everything per row comes from r (compaction gathers rows); randomness from the row's key
    # and the global query number i.
    x_cur, loss_cur, wrong_cur = r["x_cur"], r["loss"], r["wrong"]
    it_keys = jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(r["keys"])
    draws = jax.vmap(lambda k: _draws(k, x.shape[-1]))(it_keys)
    if len(branches) == 1:
      x_new = branches[0](draws, r["x"], x_cur)
    else:
      x_new = lax.switch(jnp.sum(i >= firsts) - 1, branches, draws, r["x"], x_cur)
    loss_new, wrong_new = evaluate(x_new, r["y"], r["args"])
    active = ~wrong_cur
    accept = active & ((loss_new > loss_cur) | wrong_new)
    return dict(r, x_cur=jnp.where(bc(accept, x_cur), x_new, x_cur),
                loss=jnp.where(accept, loss_new, loss_cur),
                wrong=wrong_cur | (active & wrong_new),
                queries=r["queries"] + active.astype(jnp.int32))

  rows = dict(x=x, y=labels, keys=keys, args=row_args, x_cur=x0, loss=loss0,
              wrong=wrong0 | clean_wrong,
              queries=jnp.where(clean_wrong, 0, 1).astype(jnp.int32))
  micro = compaction.micro_batch(bsz) if compact else bsz
  rows = compaction.compacted_loop(body, rows, lambda r: ~r["wrong"], 0, int(num_queries),
                                   chunk=int(compact_every), micro=micro)
  return rows["x_cur"], rows["wrong"], rows["queries"]


def square(logits_fn, images, labels, rng, *, eps: float, num_queries: int = NUM_QUERIES,
           norm: str = "linf", p_init: float = P_INIT, rescale_schedule: bool = False,
           example_index=None, row_args: tuple = (), compact: bool = True,
           compact_every: int = COMPACT_EVERY) -> jax.Array:
  """Square Attack adversarial examples (untargeted, margin loss, one restart).

  Args:
    logits_fn: `logits_fn(images [b, H, W, C] float32, *row_args)` -> logits [b, K]; only
      evaluated, never differentiated. Rows must be independent (compaction calls it on subsets
      of the rows): per-row model inputs go in `row_args`, never in its closure.
    images: [B, H, W, C] float32 in [0, 1].
    labels: [B] int in [0, K).
    rng: PRNG key; example i draws from fold_in(rng, example_index[i]).
    eps: threat-model radius in pixel units (l_inf: [0, 1]; l_2: >= 0).
    num_queries: iterations (one forward pass each; AutoAttack: 5,000); the start costs one more.
    norm: "linf", "l2" or "l1" (the l_1 form: `attacks.square_l1`).
    p_init: initial fraction of pixels changed per iteration, in (0, 1] (AutoAttack: 0.8).
    rescale_schedule: stretch the p schedule (made for 10,000 queries) to num_queries; False, as
      AutoAttack's standard version, applies it to the raw iteration count.
    example_index: optional [B] int global example index (default arange(B)), for shard_map.
    row_args: per-row arrays [B, ...] passed to logits_fn after the images (e.g. soup mixing
      weights), gathered with their rows.
    compact: every `compact_every` queries, run only the rows not yet broken (in as many
      micro-batches of ~B/2 rows as hold them; `compaction`). Same results as False.
    compact_every: queries between two compactions.

  Returns:
    [B, H, W, C] float32 inside the eps ball and [0, 1]: the first misclassified point found,
    else the point of lowest margin found; the clean image where it is already misclassified.
  """
  return square_run(logits_fn, images, labels, rng, eps=eps, num_queries=num_queries, norm=norm,
                    p_init=p_init, rescale_schedule=rescale_schedule,
                    example_index=example_index, row_args=row_args, compact=compact,
                    compact_every=compact_every)[0]


meta_pseudo_gaussian = shapes.meta_pseudo_gaussian  # its earlier home (tests, notebooks)
