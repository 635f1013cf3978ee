"""The evaluation engine: per-example clean and robust correctness for a grid of domain columns.

A *column* is one model of a two-domain network: a domain id (int; 0 = clean, 1 = adversarial)
or mixing weights [D] (the soup at alpha is [1 - alpha, alpha]: the adapters are affine in their
parameters, so calling the model with mixing weights *is* the soup). Every data batch is
expanded to (example x column) rows, each row carrying its own `domain`, so one compiled function
serves every column, and each row is attacked against its own column's model (a soup is attacked
in its own right, never through the adversarial adapter). The attacks run through
`attacks.robust_accuracy` (host-side compaction: an attack only sees the points every earlier one
failed on). Random starts are keyed by the example's global index, shared by its columns, so the
soup at alpha gets the same starts in a sweep as in a single evaluation.

Long evaluations are resumable: with a `store`, the results of every `chunk_batches` data
batches are saved as they complete, and a relaunch with the same settings skips the batches
already done (their examples keep their global indices, so the numbers equal an uninterrupted
run's).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from adv_soups import data as data_lib
from adv_soups import parallel
from adv_soups.attacks import registry, robust_accuracy


@functools.lru_cache(maxsize=16)
def model_logits_fn(model, class_subset: tuple[int, ...] | None = None) -> Any:
  """`fn(params, images [B,H,W,C], domain) -> logits [B, K]` of `model` (restricted to the
  classes `class_subset` when given), one object per (model, subset) so that compiled
  evaluations are cached across calls."""
  index = None if class_subset is None else np.asarray(class_subset, np.int32)

  def fn(params, images, domain):
    logits = model.apply({"params": params}, images, domain, train=False)
    return logits if index is None else jnp.take(logits, index, axis=-1)
  return fn


def expand(batch: dict, domains: np.ndarray) -> dict:
  """(example x column) rows of a batch, example-major: row i * A + a is example i, column a.

  Args:
    batch: {'image' [b, H, W, C], 'label' [b], optional 'mask' [b], optional 'key' [b]}.
    domains: the A columns: int [A] (domain ids) or float [A, D] (mixing weights).
  Returns:
    {'image' [b*A, H, W, C], 'label' [b*A], 'mask' [b*A], 'domain' [b*A] or [b*A, D],
     'key' [b*A] (when the batch has one)}.
  """
  domains = np.asarray(domains)
  count, size = len(domains), len(batch["label"])
  rows = {k: np.repeat(np.asarray(batch[k]), count, axis=0) for k in ("image", "label")}
  mask = batch.get("mask")
  rows["mask"] = np.repeat(np.ones(size, bool) if mask is None else np.asarray(mask, bool), count)
  rows["domain"] = np.tile(domains, (size,) + (1,) * (domains.ndim - 1))
  if "key" in batch:
    rows["key"] = np.repeat(np.asarray(batch["key"]), count)
  return rows


def per_example_domain(domain: Any, size: int) -> np.ndarray:
  """An int domain or mixing weights [D] broadcast to [size] / [size, D]."""
  domain = np.asarray(domain)
  if domain.ndim == 0:
    return np.full((size,), int(domain), np.int32)
  return np.broadcast_to(domain.astype(np.float32), (size,) + domain.shape).copy()


def remap_labels(labels: np.ndarray, class_subset: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Labels in the full label space -> (positions in `class_subset` (sorted) [b], inside [b]
  bool). A label outside the subset can never be predicted: its position is 0 and `inside`
  False (the engine counts such an example as a clean error)."""
  subset = np.asarray(class_subset)
  where = np.clip(np.searchsorted(subset, labels), 0, len(subset) - 1)
  inside = subset[where] == labels
  return np.where(inside, where, 0).astype(np.int32), inside


@dataclasses.dataclass
class ColumnResult:
  """Per-example outcome for A columns (N unmasked examples, in stream order).

  clean_correct: [N, A] bool. broken_by: [N, A] int, the position in `attacks` of the attack
  that broke the point (-1: none did, also for clean errors). attacks: the settings of each
  attack that ran (dicts), in order.
  """
  clean_correct: np.ndarray
  broken_by: np.ndarray
  attacks: list[dict]

  @property
  def robust(self) -> np.ndarray:
    """[N, A] bool: correct and not broken by any attack."""
    return self.clean_correct & (self.broken_by < 0)

  def accuracy_after(self, j: int) -> np.ndarray:
    """[A] robust accuracy after the first j + 1 attacks."""
    return (self.clean_correct & ((self.broken_by < 0) | (self.broken_by > j))).mean(0)

  @property
  def num_examples(self) -> int:
    return int(self.clean_correct.shape[0])


class ChunkStore:
  """Per-chunk results of a long evaluation in `directory` (any tf.io.gfile path): chunk k is
  `chunk_<k>.npz` with the data batches it covered and its per-example arrays. Written through
  a temporary name and renamed, so a crash never leaves a half-written chunk."""

  def __init__(self, directory: str):
    self.directory = directory

  def load(self) -> list[dict]:
    """The saved chunks in order (stops at the first gap)."""
    if not tf.io.gfile.isdir(self.directory):
      return []
    chunks = []
    for k in itertools.count():
      path = os.path.join(self.directory, f"chunk_{k:05d}.npz")
      if not tf.io.gfile.exists(path):
        return chunks
      with tf.io.gfile.GFile(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        chunks.append({key: data[key] for key in data.files})

  def save(self, k: int, **arrays: np.ndarray) -> None:
    tf.io.gfile.makedirs(self.directory)
    path = os.path.join(self.directory, f"chunk_{k:05d}.npz")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
      f.write(buf.getvalue())
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)

  def clear(self) -> None:
    if tf.io.gfile.isdir(self.directory):
      tf.io.gfile.rmtree(self.directory)


def evaluate_columns(model, params: Any, batches: Iterable[dict], domains: np.ndarray, *,
                     attacks: Sequence[str] = (), budgets: dict[str, int] | None = None,
                     eps: float = 0.0, norm: str = "linf",
                     class_subset: Sequence[int] | None = None, mesh=None, seed: int = 0,
                     batch_size: int | None = None, index_offset: int = 0,
                     store: ChunkStore | None = None, chunk_batches: int = 32,
                     on_chunk=None) -> ColumnResult:
  """Clean and robust correctness of every example under each of the A columns.

  Args:
    model, params: a flax ViT and its parameters (any device; moved to `mesh`).
    batches: {'image' float32 [b, H, W, C] in [0, 1], 'label' [b], optional 'mask' [b]} numpy
      batches (process-local; b may vary).
    domains: int [A] (domain ids) or float [A, D] (mixing weights; the soup at alpha is
      [1 - alpha, alpha]).
    attacks: names of the attack registry, run in sequence on the survivors (empty: clean
      accuracy only); budgets: {name: iterations or queries} (an attack not named runs at its
      registry default; PGD has none).
    eps: pixel units; norm: 'linf' | 'l2'.
    class_subset: restrict predictions to these classes (e.g. ImageNet-R's 200); labels are
      remapped to the subset.
    mesh: default this process's devices. batch_size: rows per compiled call (default: the first
      expanded batch's size), rounded up to a multiple of the device count.
    index_offset: the global index of this stream's first example (keys its random starts).
    store / chunk_batches: resumable results (see `ChunkStore`), saved every `chunk_batches`
      data batches; `on_chunk(done_batches)` is called after each saved chunk.
  Returns:
    a `ColumnResult` ([N, A] arrays) of this process's examples (see `gather`).
  """
  domains = np.asarray(domains)
  count = len(domains)
  params = host_local(params)
  subset = None if class_subset is None else tuple(int(c) for c in class_subset)
  logits_fn = model_logits_fn(model, subset)
  mesh = mesh or parallel.make_mesh(jax.local_devices())
  names = tuple(attacks)
  budgets = dict(budgets or {})
  chunks = store.load() if store else []
  done_batches = int(sum(int(c["batches"]) for c in chunks))
  done_examples = int(sum(len(c["clean_correct"]) for c in chunks))
  stream: Iterator[dict] = iter(batches)
  for _ in range(done_batches):  # already evaluated: skip (the data order is fixed)
    next(stream, None)
  clean = [c["clean_correct"] for c in chunks]
  broken = [c["broken_by"] for c in chunks]
  settings: list[dict] = []
  state = {"n": index_offset + done_examples}

  def rows(chunk: list[dict]) -> Iterator[dict]:
    for batch in chunk:
      mask = np.ones(len(batch["label"]), bool) if batch.get("mask") is None else np.asarray(
          batch["mask"], bool)
      key = np.zeros(len(mask), np.int32)
      key[mask] = np.arange(state["n"], state["n"] + int(mask.sum()))
      state["n"] += int(mask.sum())
      r = expand(dict(batch, key=key, mask=mask), domains)
      if subset is not None:
        r["label"], inside = remap_labels(r["label"], subset)
        outside.append(~inside[r["mask"]])
      yield r

  k = len(chunks)
  while True:
    outside: list[np.ndarray] = []  # per unmasked row: a label outside the class subset
    chunk = list(itertools.islice(stream, chunk_batches if store else None))
    if not chunk:
      break
    if not any(np.any(b.get("mask", True)) for b in chunk):  # padding only
      cc, bb = np.zeros((0, count), bool), np.zeros((0, count), np.int32)
    else:
      result = robust_accuracy(logits_fn, rows(chunk), eps=eps, norm=norm, attacks=names,
                               num_steps=budgets or None, params=params, mesh=mesh, seed=seed,
                               batch_size=batch_size)
      cc, bb = result.clean_correct, result.broken_by
      if outside:  # never right: a clean error, not attacked into one
        wrong = np.concatenate(outside)
        cc, bb = cc & ~wrong, np.where(wrong, -1, bb)
      cc, bb = cc.reshape(-1, count), bb.reshape(-1, count)
      settings = _accumulate(settings, result.attacks)
    clean.append(cc)
    broken.append(bb)
    if store:
      store.save(k, clean_correct=cc, broken_by=bb, batches=np.asarray(len(chunk)))
      k += 1
      done_batches += len(chunk)
      if on_chunk:
        on_chunk(done_batches)
    else:
      break  # without a store the whole stream is one chunk
  if not clean or sum(len(c) for c in clean) == 0:
    raise ValueError("no (unmasked) examples to evaluate")
  if not settings and names:
    settings = [dict(name=n, eps=eps, norm=norm, budget=b, num_steps=b) for n, b in
                registry.resolve_budgets(names, budgets or None).items()]
  return ColumnResult(clean_correct=np.concatenate(clean), broken_by=np.concatenate(broken),
                      attacks=settings)


def evaluate_request(request, dataset: str | None = None, split: str | None = None,
                     num_examples: int | None = None, *, columns: np.ndarray | None = None,
                     attack: bool = True, wrap=None, store: ChunkStore | None = None,
                     chunk_batches: int = 32, on_chunk=None,
                     batch_columns: int | None = None) -> ColumnResult:
  """The one entry point: per-example results of `request` (an `evaluation.Request`) on one
  dataset, gathered over every process (a global call when there are several).

  dataset / split / num_examples: what to read (default the request's main dataset, its split
  and num_examples; split None on another dataset is that dataset's evaluation split).
  columns: int [A] domain ids or float [A, D] mixing weights (default the request's).
  attack: run the request's attacks (False: clean accuracy only). wrap(batches, name): e.g. a
  progress bar around the data. store / chunk_batches / on_chunk: resumable results (see
  `evaluate_columns`). batch_columns: size the data batches for this many columns (default
  A; the progress total of a request counts the held-out selection as 3). Done here, once: the dataset's class subset, the rows per compiled call,
  this process's global example offset (keys the random starts) and the gather.
  """
  if dataset is None:  # the request's main dataset, as the request states it
    dataset, split = request.dataset, split or request.split
    num_examples = request.num_examples if num_examples is None else num_examples
  columns = request.columns if columns is None else np.asarray(columns)
  count = len(columns)
  spec = data_lib.get_spec(dataset)
  batches = request.batches(dataset, split, num_examples, columns=batch_columns or count)
  if wrap is not None:
    batches = wrap(batches, dataset)
  names = tuple(request.attacks) if attack else ()
  result = evaluate_columns(
      request.loaded.model, request.loaded.params, batches, columns, attacks=names,
      budgets={n: request.budgets[n] for n in names} or None, eps=request.eps if names else 0.0,
      norm=request.norm, class_subset=spec.class_subset, seed=request.seed,
      batch_size=batch_rows(request, dataset, split, num_examples, count),
      index_offset=request.offset(dataset, split, num_examples), store=store,
      chunk_batches=chunk_batches, on_chunk=on_chunk)
  return gather(result)


def _accumulate(total: list[dict], chunk: Sequence[dict]) -> list[dict]:
  """The attacks' settings, with their times and row counts summed over chunks."""
  out = [dict(s) for s in chunk]
  for mine, before in zip(out, total):
    for key in ("seconds", "compile_seconds", "rows_attacked", "rows_computed"):
      mine[key] = mine.get(key, 0) + before.get(key, 0)
  return out


def host_local(params: Any) -> Any:
  """`params` with every array that spans other processes (e.g. the replicated training state
  of a multi-host run) replaced by this process's copy as numpy: such arrays cannot be
  `device_put` onto a process-local mesh ("cross-host device transfers"), so they go through
  the host."""
  def local(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return x
  return jax.tree.map(local, params)


def gather(result: ColumnResult) -> ColumnResult:
  """The per-example results of every process, in process order (a global call: every process
  must make it, the same number of times); the identity on one process."""
  if jax.process_count() == 1:
    return result
  from jax.experimental import multihost_utils
  n = result.clean_correct.shape[0]
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([n], np.int64))).reshape(-1)
  width = int(counts.max())
  pad = lambda x, v: np.concatenate([x, np.full((width - n,) + x.shape[1:], v, x.dtype)])
  cc = np.asarray(multihost_utils.process_allgather(pad(result.clean_correct, False)))
  bb = np.asarray(multihost_utils.process_allgather(pad(result.broken_by, -1)))
  keep = lambda a: np.concatenate([a[p, :c] for p, c in enumerate(counts.tolist())])
  return ColumnResult(clean_correct=keep(cc), broken_by=keep(bb), attacks=result.attacks)


def batch_rows(request, name: str, split: str | None, num_examples: int | None,
               columns: int) -> int:
  """Rows per compiled call for dataset `name` of `request`: the request's batch size, or the
  smallest multiple of the device count that holds the whole (smaller) evaluation."""
  size = request.size(name, split, num_examples)
  rows = None if size is None else -(-size // jax.process_count()) * columns
  return smallest_batch(request.batch_size, rows, jax.local_device_count())


def smallest_batch(batch_size: int, num_rows: int | None, num_devices: int) -> int:
  """Rows per compiled call: `batch_size`, or fewer when the whole evaluation holds fewer rows
  (the smallest multiple of the device count that holds them), so a small evaluation does not
  pad every call up to the configured batch."""
  if num_rows is None or num_rows >= batch_size:
    return parallel.pad_to_multiple(batch_size, num_devices)
  return parallel.pad_to_multiple(max(num_rows, 1), num_devices)
