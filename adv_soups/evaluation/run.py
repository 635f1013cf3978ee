"""Running a request: the main dataset (clean + attacks), the shifts, the alpha selection, the
gradient-masking checks, and the report, written under a name that states its settings.

`run_request(request)` is what `evaluate`, `sweep`, the demo and the experiments call. A report
lands in `out_dir/<name>.json` (sweeps also `.csv` and `.png`), with the per-example results in
`<name>.npz`; while it runs, finished chunks of the main dataset are kept in `<name>.partial/`,
so relaunching the same command continues where an interrupted one stopped.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Iterable, Iterator

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from adv_soups import data as data_lib
from adv_soups.attacks import suites
from adv_soups.evaluation import engine, reports
from adv_soups.evaluation.requests import SHIFT_FAMILIES, Request


class Progress:
  """One tqdm bar (stderr, with ETA) over the data batches of every dataset a request reads."""

  def __init__(self, total: int | None, enabled: bool = True, desc: str = "evaluating"):
    from tqdm import tqdm
    self.bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=not enabled,
                    dynamic_ncols=True)

  def wrap(self, batches: Iterable[dict], name: str) -> Iterator[dict]:
    for batch in batches:
      self.bar.set_postfix_str(name, refresh=False)
      self.bar.update(1)
      yield batch

  def close(self) -> None:
    self.bar.close()


def _corruption(name: str) -> str:
  return name.partition("/")[2].rpartition("_")[0]


def batch_rows(request: Request, name: str, split: str | None, num_examples: int | None,
                columns: int) -> int:
  """Rows per compiled call for this dataset: the request's batch size, or the smallest
  multiple of the device count that holds the whole (smaller) evaluation."""
  size = request.size(name, split, num_examples)
  rows = None if size is None else -(-size // jax.process_count()) * columns
  return engine.smallest_batch(request.batch_size, rows, jax.local_device_count())


def run_request(request: Request, *, kind: str = "eval", out_dir: str | None = None,
                progress: bool = True, write: bool = True, chunk_batches: int = 32,
                run_checks: bool = True, eps_grid: list[float] | None = None) -> dict:
  """Evaluates `request`; returns the report (a JSON-compatible dict, see `reports`).

  kind: 'eval' or 'sweep' (names the files; a sweep also writes .csv and .png).
  out_dir: where reports go (default WORKDIR/eval or WORKDIR/sweep); write: False keeps
  everything in memory (no partial results either).
  chunk_batches: data batches of the main dataset per saved chunk (resumable granularity).
  eps_grid: opt-in check: the suite's robust accuracy at each of these eps too (same examples),
  with a warning when it rises with eps (recorded in the report as 'eps_grid').
  """
  start = time.time()
  loaded = request.loaded
  out_dir = out_dir or os.path.join(loaded.workdir, kind)
  name = request.name(kind)
  partial = partial_root = os.path.join(out_dir, name + ".partial")
  if jax.process_count() > 1:  # each process keeps its own chunks: no global call while it runs
    partial = os.path.join(partial, f"process_{jax.process_index()}")
  store = engine.ChunkStore(partial) if write else None
  resumed = len(store.load()) if store else 0
  if resumed:
    print(f"resuming {name}: {resumed} chunk(s) already evaluated", file=sys.stderr)
  bar = Progress(request.total_batches(), enabled=progress and jax.process_index() == 0,
                 desc="sweep" if kind == "sweep" else "evaluating")
  model, params = loaded.model, loaded.params
  spec = data_lib.get_spec(request.dataset)
  columns = request.columns
  try:
    warnings = []
    if run_checks and request.attacks:
      warnings = _masking_checks(request, spec)
    main = engine.evaluate_columns(
        model, params, bar.wrap(request.batches(request.dataset, request.split,
                                                request.num_examples), request.dataset),
        columns, attacks=request.attacks, budgets=request.budgets, eps=request.eps,
        norm=request.norm, class_subset=spec.class_subset, seed=request.seed,
        batch_size=batch_rows(request, request.dataset, request.split, request.num_examples,
                               len(columns)),
        store=store, chunk_batches=chunk_batches,
        index_offset=request.offset(request.dataset, request.split, request.num_examples),
        attack_settings=request.attack_settings, dropout=request.dropout)
    main = engine.gather(main)
    if run_checks and "square" in request.attacks:
      warnings += _square_check(request, main)
    shifts = _shifts(request, bar)
    selection = _select_alpha(request, bar) if request.selection else None
  finally:
    bar.close()
  grid = None
  if eps_grid and request.attacks:
    grid = eps_grid_check(request, eps_grid, progress=progress)
    warnings += grid.pop("warnings")
  for w in warnings if jax.process_index() == 0 else ():
    logging.warning("%s", w)
    print(f"warning: {w}", file=sys.stderr)
  report = reports.build(request, kind, main, shifts, selection, warnings,
                         wall_time_s=time.time() - start)
  if grid:
    report["eps_grid"] = grid
  if write:
    if jax.process_index() == 0:  # one copy of every report
      report["files"] = reports.write(report, main, out_dir, name, sweep=kind == "sweep")
    store.clear()
    if jax.process_count() > 1:  # every process has cleared its chunks: drop their parent
      from adv_soups import parallel
      parallel.barrier(f"adv_soups.evaluation {name} done")
      if jax.process_index() == 0 and tf.io.gfile.isdir(partial_root):
        tf.io.gfile.rmtree(partial_root)
  return report


def _shifts(request: Request, bar: Progress) -> dict:
  """{group: {'mean' [A], 'per_dataset' {name: [A]}, 'num_examples' {name: n},
  'per_corruption' {corruption: [A]} for corrupted families}} (clean accuracy per column)."""
  out = {}
  model, params = request.loaded.model, request.loaded.params
  count = len(request.columns)
  for group, names in request.shifts:
    per_dataset, counts = {}, {}
    for name in names:
      spec = data_lib.get_spec(name)
      result = engine.gather(engine.evaluate_columns(
          model, params, bar.wrap(request.batches(name, None, request.num_examples), name),
          request.columns, class_subset=spec.class_subset,
          batch_size=batch_rows(request, name, None, request.num_examples, count),
          index_offset=request.offset(name, None, request.num_examples),
          dropout=request.dropout))
      per_dataset[name] = result.clean_correct.mean(0).tolist()
      counts[name] = result.num_examples
    entry = dict(mean=np.mean(list(per_dataset.values()), axis=0).tolist(),
                 per_dataset=per_dataset, num_examples=counts)
    if group in SHIFT_FAMILIES:
      corruptions = list(dict.fromkeys(_corruption(n) for n in names))  # in order, unique
      entry["per_corruption"] = {
          c: np.mean([per_dataset[n] for n in names if _corruption(n) == c], axis=0).tolist()
          for c in corruptions}
    out[group] = entry
  return out


def _select_alpha(request: Request, bar: Progress) -> dict:
  """Chooses alpha on split[:n] of the selection dataset and scores the chosen alpha, 0 and 1
  on split[n:] (disjoint examples)."""
  sel = request.selection
  model, params = request.loaded.model, request.loaded.params
  spec = data_lib.get_spec(sel.dataset)
  from adv_soups import soups
  choose = engine.gather(engine.evaluate_columns(
      model, params, bar.wrap(request.batches(sel.dataset, sel.selection_split), sel.dataset),
      request.columns, class_subset=spec.class_subset,
      batch_size=batch_rows(request, sel.dataset, sel.selection_split, None,
                             len(request.columns)), dropout=request.dropout))
  accuracy = choose.clean_correct.mean(0)
  best = int(np.argmax(accuracy))  # ties: the first (smallest) alpha
  chosen = request.alphas[best]
  scored = sorted({chosen, 0.0, 1.0})
  held = engine.gather(engine.evaluate_columns(
      model, params, bar.wrap(request.batches(sel.dataset, sel.heldout_split, columns=3),
                              sel.dataset),
      np.asarray(soups.mix_weights(scored), np.float32), class_subset=spec.class_subset,
      batch_size=batch_rows(request, sel.dataset, sel.heldout_split, None, len(scored)),
      dropout=request.dropout))
  held_acc = dict(zip(scored, held.clean_correct.mean(0).tolist()))
  return dict(dataset=sel.dataset, selection_split=sel.selection_split,
              heldout_split=sel.heldout_split, num_selection=choose.num_examples,
              num_heldout=held.num_examples, selection_accuracy=accuracy.tolist(),
              chosen_alpha=chosen, heldout_accuracy=dict(chosen=held_acc[chosen],
                                                         alpha_0=held_acc[0.0],
                                                         alpha_1=held_acc[1.0]))


def _first_batch(request: Request, limit: int = 64) -> dict | None:
  for batch in request.batches(request.dataset, request.split, min(
      limit, request.num_examples or limit), columns=1):
    keep = batch["mask"]
    return dict(image=batch["image"][keep], label=batch["label"][keep])
  return None


def _masking_checks(request: Request, spec) -> list[str]:
  """AutoAttack's checks for gradient masking on a few examples of the first column (warnings
  only: none changes a number)."""
  from adv_soups.attacks import checks
  batch = _first_batch(request)
  if batch is None or not len(batch["label"]):
    return []
  model, params = request.loaded.model, request.loaded.params
  logits_fn = engine.model_logits_fn(model, None if spec.class_subset is None
                                     else tuple(spec.class_subset))
  column = request.columns[0]
  domain = engine.per_example_domain(column, len(batch["label"]))
  labels = batch["label"]
  if spec.class_subset is not None:
    labels, inside = engine.remap_labels(labels, spec.class_subset)
    images, labels = batch["image"][inside], labels[inside]
    if not len(labels):
      return []
    batch = dict(image=images, label=labels)
    domain = engine.per_example_domain(column, len(labels))
  raw = lambda x: logits_fn(params, x, domain)
  jitted = _jitted(logits_fn)
  # compiled once per model and shape, across requests
  f = lambda x: jitted(params, x, engine.per_example_domain(column, len(x)))
  if request.dropout:  # a randomised model: each call of the check draws anew (keyed by calls)
    rand_fn = _jitted(engine.random_logits_fn(model, request.dropout, None if spec.class_subset
                                              is None else tuple(spec.class_subset)))
    calls = iter(range(1 << 30))
    f = lambda x: rand_fn(params, x, engine.per_example_domain(column, len(x)), jax.vmap(
        lambda i, c=next(calls): jax.random.fold_in(jax.random.PRNGKey(c), i))(
            np.arange(len(x))))
  images = batch["image"]
  logits = np.asarray(f(images))
  randomized = checks.check_randomized(f, images, labels)
  if request.version == "rand":  # the warning's advice is what runs
    randomized = None
  found = [checks.check_n_classes(logits.shape[-1], request.attacks, suites.NUM_TARGETS),
           randomized,
           checks.check_probabilities(logits),
           checks.check_dynamic(raw, images)]
  # Zero DLR gradients only on the points the attacks will see (the correctly classified ones):
  # on a misclassified point whose label is the third-highest logit the DLR is identically 1,
  # so its gradient is exactly 0 on any model (AutoAttack's check counts those too).
  correct = logits.argmax(-1) == labels
  if correct.any():
    found.append(checks.check_zero_gradients(f, images[correct], labels[correct],
                                             eps=request.eps, norm=request.norm))
  return [w for w in found if w]


@functools.lru_cache(maxsize=16)
def _jitted(logits_fn):
  return jax.jit(logits_fn)


def _square_check(request: Request, main: engine.ColumnResult) -> list[str]:
  """Square lowering what the white-box attacks left by more than AutoAttack's threshold."""
  from adv_soups.attacks import checks
  j = list(request.attacks).index("square")
  if j == 0:
    return []
  out = []
  before, after = main.accuracy_after(j - 1), main.accuracy_after(j)
  for label, b, a in zip(request.labels, before.tolist(), after.tolist()):
    w = checks.check_square_sr(b, a)
    if w:
      out.append(f"{label}: {w}")
  return out


def eps_grid_check(request: Request, eps_values: list[float], progress: bool = True) -> dict:
  """The request's suite at each eps of `eps_values` on the same examples (no files): {'eps':
  [E], 'robust_accuracy': {column: [E]}, 'warnings': [...]} with a warning per column whose
  robust accuracy rises with eps by more than the check's tolerance."""
  import dataclasses
  from adv_soups.attacks import checks
  accs = {label: [] for label in request.labels}
  for eps in eps_values:
    r = dataclasses.replace(request, eps=float(eps), shifts=[], selection=None)
    out = run_request(r, write=False, progress=progress, run_checks=False)
    for row in out["results"]:
      accs[row["column"]].append(row["robust_accuracy"])
  warnings = []
  for label, values in accs.items():
    w = checks.check_eps_grid(eps_values, values)
    if w:
      warnings.append(f"{label}: {w}")
  return dict(eps=list(eps_values), robust_accuracy=accs, warnings=warnings)


def format_eps_grid(grid: dict) -> str:
  """The eps-grid check as lines: 'eps grid: 0.01 -> 80.00%, ...' per column."""
  lines = []
  for label, values in grid["robust_accuracy"].items():
    pairs = ", ".join(f"{e:.4g} -> {100 * v:.2f}%" for e, v in zip(grid["eps"], values))
    lines.append(f"eps grid ({label}): {pairs}")
  return "\n".join(lines)
