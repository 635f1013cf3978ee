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


batch_rows = engine.batch_rows  # (its old home)


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
  spec = data_lib.get_spec(request.dataset)
  try:
    warnings = []
    if run_checks and request.attacks:
      warnings = _masking_checks(request, spec)
    main = engine.evaluate_request(request, wrap=bar.wrap, store=store,
                                   chunk_batches=chunk_batches)
    if run_checks and _black_box(request):
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
  for group, names in request.shifts:
    per_dataset, counts = {}, {}
    for name in names:
      result = engine.evaluate_request(request, name, None, request.num_examples, attack=False,
                                       wrap=bar.wrap)
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
  from adv_soups import soups
  choose = engine.evaluate_request(request, sel.dataset, sel.selection_split, attack=False,
                                   wrap=bar.wrap)
  accuracy = choose.clean_correct.mean(0)
  best = int(np.argmax(accuracy))  # ties: the first (smallest) alpha
  chosen = request.alphas[best]
  scored = sorted({chosen, 0.0, 1.0})
  held = engine.evaluate_request(request, sel.dataset, sel.heldout_split, attack=False,
                                 columns=np.asarray(soups.mix_weights(scored), np.float32),
                                 wrap=bar.wrap, batch_columns=3)
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


def _restrict(batch: dict, spec, first_index: int = 0) -> dict:
  """The batch's unmasked rows, labels remapped to the dataset's class subset (rows whose label
  lies outside it dropped); 'key': each row's index in the stream of unmasked examples, counted
  from `first_index`."""
  keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
  images, labels = batch["image"][keep], batch["label"][keep]
  key = np.arange(first_index, first_index + len(labels), dtype=np.int32)
  if spec.class_subset is not None:
    labels, inside = engine.remap_labels(labels, spec.class_subset)
    images, labels, key = images[inside], labels[inside], key[inside]
  return dict(image=images, label=labels, key=key)


def _masking_checks(request: Request, spec) -> list[str]:
  """AutoAttack's checks for gradient masking on the first column (warnings only: none changes
  a number): classes, randomness, probabilities and a dynamic model on a few examples; zero
  gradients on every batch of the main dataset (`_zero_gradients`)."""
  from adv_soups.attacks import checks
  batch = _first_batch(request)
  if batch is None:
    return []
  batch = _restrict(batch, spec)
  if not len(batch["label"]):
    return []
  model, params = request.loaded.model, request.loaded.params
  logits_fn = engine.model_logits_fn(model, None if spec.class_subset is None
                                     else tuple(spec.class_subset))
  column = request.columns[0]
  domain = engine.per_example_domain(column, len(batch["label"]))
  raw = lambda x: logits_fn(params, x, domain)
  jitted = _jitted(logits_fn)
  # compiled once per model and shape, across requests
  f = lambda x: jitted(params, x, engine.per_example_domain(column, len(x)))
  images, labels = batch["image"], batch["label"]
  logits = np.asarray(f(images))
  found = [checks.check_n_classes(logits.shape[-1], request.attacks),
           checks.check_randomized(f, images, labels),
           checks.check_probabilities(logits),
           checks.check_dynamic(raw, images)]
  found.append(_zero_gradients(request, spec, logits_fn, column))
  return [w for w in found if w]


def _zero_gradients(request: Request, spec, logits_fn, column) -> str | None:
  """AutoAttack's zero-gradient check on every batch of the main dataset: the DLR loss at
  APGD's start and, when an attack of the suite uses the targeted DLR (APGD-T), that loss at
  its start for each of its targets, keyed as the runner keys them (same seed, attack
  position and example index). Only the correctly classified points count (those the attacks
  see; on the others the DLR can be constant by design)."""
  from adv_soups.attacks import checks, registry
  params = request.loaded.params
  targeted = [(j, registry.get(n)) for j, n in enumerate(request.attacks)
              if registry.get(n).settings_for(request.norm).get("loss") == "dlr-targeted"]
  num_targets = 0
  seed_key = jax.random.PRNGKey(request.seed)
  target_rng = seed_key
  if targeted:
    j, entry = targeted[0]
    num_targets = int(entry.settings_for(request.norm).get("targets", 1))
    target_rng = jax.random.fold_in(seed_key, j)
  rng = jax.random.fold_in(seed_key, 0)
  f = lambda x: logits_fn(params, x, engine.per_example_domain(column, x.shape[0]))
  masks = checks.zero_gradient_masks(f, norm=request.norm, num_targets=num_targets)
  predict = _jitted(logits_fn)
  index = request.offset(request.dataset, request.split, request.num_examples)
  zero = total = 0
  for batch in request.batches(request.dataset, request.split, request.num_examples, columns=1):
    rows = _restrict(batch, spec, index)
    n = len(rows["label"])
    index += int(np.sum(batch.get("mask", np.ones(len(batch["label"]), bool))))
    if not n:
      continue
    correct = np.asarray(predict(params, rows["image"], engine.per_example_domain(
        column, n))).argmax(-1) == rows["label"]
    if not correct.any():
      continue
    m = np.asarray(masks(rows["image"][correct], rows["label"][correct], rng,
                         np.float32(request.eps), rows["key"][correct], target_rng))
    zero += int(m.any(0).sum())
    total += int(correct.sum())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    zero, total = np.asarray(multihost_utils.process_allgather(
        np.asarray([zero, total], np.int64))).reshape(-1, 2).sum(0).tolist()
  return checks.zero_gradient_message(zero, total) if zero else None


@functools.lru_cache(maxsize=16)
def _jitted(logits_fn):
  return jax.jit(logits_fn)


def _black_box(request: Request) -> int | None:
  """The position of the suite's first score-based attack (budget in queries), if any."""
  from adv_soups.attacks import registry
  return next((j for j, n in enumerate(request.attacks)
               if registry.get(n).budget == "queries"), None)


def _square_check(request: Request, main: engine.ColumnResult) -> list[str]:
  """Square (the first score-based attack, one whose budget counts queries) lowering what the
  white-box attacks before it left by more than AutoAttack's threshold."""
  from adv_soups.attacks import checks
  j = _black_box(request)
  if not j:
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
