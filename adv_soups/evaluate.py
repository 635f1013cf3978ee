"""Clean, robust and distribution-shift accuracy of a trained model.

  python -m adv_soups.evaluate --workdir=DIR (--alpha=A | --domain=D) [--attack=pgd|apgd-ce|
      autoattack|none] [--eps=4/255] [--steps=N] [--shifts=imagenet_r,imagenet2012_corrupted]
      [--num_examples=N] [--step=CKPT]

Library part: `model_logits_fn`, `clean_accuracy`, `evaluate_during_training` (used by training);
then *grid evaluation*: several domain columns at once (e.g. the soups of an alpha grid, as mixing
weights [1 - a, a]): every batch is expanded to (example x column) rows, each row carrying its own
`domain`, so one compiled function serves every column and attacks run against each row's own
model (`grid_clean_correct`, `grid_robust`); then `make_plan` (every check of a request, before
any compilation) and `run_evaluation`, which `adv_soups.sweep` builds on; the command line last.

`--attack=autoattack` runs APGD-CE then APGD-T: AutoAttack's white-box core, not the full
AutoAttack (which adds FAB-T and Square); reports always name the attacks that ran.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ INFO lines

import dataclasses
import functools
import json
import sys
import time
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from adv_soups import data as data_lib
from adv_soups import parallel
from adv_soups import workdir as workdir_lib
from adv_soups.attacks import robust_accuracy


@functools.lru_cache(maxsize=16)
def model_logits_fn(model) -> Any:
  """`fn(params, images [B,H,W,C], domain) -> logits [B, K]` for `model`, one object per model so
  that compiled attacks and evaluations are cached across calls."""
  def fn(params, images, domain):
    return model.apply({"params": params}, images, domain, train=False)
  return fn


@functools.lru_cache(maxsize=16)
def _compiled_correct(model, mesh):
  logits_fn = model_logits_fn(model)
  batch = parallel.batch_sharding(mesh)

  def correct(params, images, labels, domain):
    return jnp.argmax(logits_fn(params, images, domain), -1) == labels

  return jax.jit(correct, in_shardings=(parallel.replicated(mesh), batch, batch, batch),
                 out_shardings=batch)


def clean_accuracy(model, params: Any, batches: Iterable[dict], domain: Any, mesh=None) -> float:
  """Top-1 accuracy (fraction) over `batches` ({'image', 'label', 'mask'} numpy dicts, b a
  multiple of the device count) with `domain`: an int or float mixing weights [num_domains]."""
  mesh = mesh or parallel.make_mesh()
  correct_fn = _compiled_correct(model, mesh)
  params = jax.device_put(params, parallel.replicated(mesh))
  hits = total = 0
  for batch in batches:
    size = len(batch["label"])
    dom = _per_example_domain(domain, size)
    correct = correct_fn(params, *parallel.shard_batch(mesh, (batch["image"], batch["label"], dom)))
    mask = batch.get("mask", np.ones(size, bool))
    hits += int(np.sum(np.asarray(correct) & mask))
    total += int(np.sum(mask))
  return hits / max(total, 1)


def _per_example_domain(domain: Any, size: int) -> np.ndarray:
  domain = np.asarray(domain)
  if domain.ndim == 0:
    return np.full((size,), int(domain), np.int32)
  return np.broadcast_to(domain.astype(np.float32), (size,) + domain.shape).copy()


def with_domain(batches: Iterable[dict], domain: Any) -> Iterable[dict]:
  """Adds a per-example 'domain' (an int, or mixing weights [D] for every example) to batches."""
  for batch in batches:
    yield dict(batch, domain=_per_example_domain(domain, len(batch["label"])))


def evaluate_during_training(config: ml_collections.ConfigDict, model, params: Any,
                             mesh=None) -> dict[str, float]:
  """The periodic evaluation on the held-out split: clean accuracy of domain 0 (the clean mode)
  and PGD-k robust accuracy (k = config.eval.attack_steps) of the adversarial domain."""
  if jax.process_count() > 1:
    # robust_accuracy compacts survivors on one host; multi-host runs evaluate afterwards with
    # `python -m adv_soups.evaluate` / `sweep` on the workdir.
    logging.warning("periodic evaluation is single-process; skipped on %d processes",
                    jax.process_count())
    return {}
  adv_domain = 1 if config.model.num_domains > 1 else 0
  batches = lambda: data_lib.eval_batches(
      config.data, split=config.eval.split, batch_size=config.eval.batch_size,
      num_examples=config.eval.num_examples)
  metrics = {"clean_accuracy": clean_accuracy(model, params, batches(), 0, mesh)}
  steps = config.eval.attack_steps
  result = robust_accuracy(
      model_logits_fn(model), with_domain(batches(), adv_domain), params=params,
      eps=config.attack.eps, norm=config.attack.norm, attacks=("pgd",), num_steps=steps,
      mesh=mesh, seed=config.seed)
  if adv_domain:
    metrics["adv_clean_accuracy"] = result.clean_accuracy
  metrics[f"robust_accuracy_pgd{steps}"] = result.robust_accuracy
  return metrics


# ------------------------------------------------------------------------------------------------
# Grid evaluation: several domain columns (e.g. soups) in one pass.

def expand(batch: dict, domains: np.ndarray) -> dict:
  """(example x column) rows of a batch, example-major: row i * A + a is example i under column a.

  Args:
    batch: {'image' [b, H, W, C], 'label' [b], optional 'mask' [b]} numpy arrays.
    domains: the A columns' domains: int [A] (domain ids) or float [A, D] (mixing weights).
  Returns:
    {'image' [b*A, H, W, C], 'label' [b*A], 'mask' [b*A], 'domain' [b*A] or [b*A, D]}.
  """
  domains = np.asarray(domains)
  count, size = len(domains), len(batch["label"])
  rows = {k: np.repeat(np.asarray(batch[k]), count, axis=0) for k in ("image", "label")}
  mask = batch.get("mask")
  rows["mask"] = np.repeat(np.ones(size, bool) if mask is None else np.asarray(mask, bool), count)
  rows["domain"] = np.tile(domains, (size,) + (1,) * (domains.ndim - 1))
  return rows


@functools.lru_cache(maxsize=16)
def _compiled_predictions(model, mesh, class_subset):
  logits_fn = model_logits_fn(model)
  batch = parallel.batch_sharding(mesh)

  def predict(params, images, domain):
    return data_lib.subset_predictions(logits_fn(params, images, domain), class_subset)

  return jax.jit(predict, in_shardings=(parallel.replicated(mesh), batch, batch),
                 out_shardings=batch)


def grid_clean_correct(model, params: Any, batches: Iterable[dict], domains: np.ndarray, *,
                       class_subset: Sequence[int] | None = None, mesh=None,
                       batch_size: int | None = None) -> np.ndarray:
  """Clean correctness [N, A] (bool) of every unmasked example under each of the A columns.

  `domains`: int [A] or mixing weights [A, D] (see `expand`). Predictions are restricted to
  `class_subset` (1000-way indices, e.g. ImageNet-R's 200) when given. Rows are buffered across
  batches and run in calls of exactly `batch_size` rows (default: the first expanded batch's
  size; rounded up to a multiple of the device count), the last one padded: one compilation
  serves every column.
  """
  mesh = mesh or parallel.make_mesh()
  n_dev = mesh.devices.size
  subset = None if class_subset is None else tuple(int(c) for c in class_subset)
  predict = _compiled_predictions(model, mesh, subset)
  params = jax.device_put(params, parallel.replicated(mesh))
  count = len(np.asarray(domains))
  labels, masks, dispatched = [], [], []  # dispatched: (rows used, device predictions)
  buffer: dict[str, list] = {"image": [], "domain": []}
  state = {"chunk": None, "buffered": 0}

  def run(flush: bool) -> None:
    chunk = state["chunk"]
    while state["buffered"] >= chunk or (flush and state["buffered"]):
      images, domain = (np.concatenate(buffer[k]) for k in ("image", "domain"))
      n = min(chunk, len(images))
      rest = {"image": images[n:], "domain": domain[n:]}
      images, domain = images[:n], domain[:n]
      if n < chunk:
        images = np.concatenate([images, np.zeros((chunk - n,) + images.shape[1:], images.dtype)])
        domain = np.concatenate([domain, np.repeat(domain[:1], chunk - n, axis=0)])
      dispatched.append((n, predict(params, *parallel.shard_batch(mesh, (images, domain)))))
      buffer["image"], buffer["domain"] = [rest["image"]], [rest["domain"]]
      state["buffered"] -= n

  for batch in batches:
    rows = expand(batch, domains)
    if state["chunk"] is None:
      state["chunk"] = parallel.pad_to_multiple(int(batch_size or len(rows["label"])), n_dev)
    labels.append(rows["label"])
    masks.append(rows["mask"])
    buffer["image"].append(rows["image"])
    buffer["domain"].append(rows["domain"])
    state["buffered"] += len(rows["label"])
    run(flush=False)
  if state["chunk"] is None:
    raise ValueError("no batches to evaluate")
  run(flush=True)
  preds = np.concatenate([np.asarray(p)[:n] for n, p in dispatched])
  mask = np.concatenate(masks)
  return (preds == np.concatenate(labels))[mask].reshape(-1, count)


@functools.lru_cache(maxsize=16)
def _subset_logits_fn(model, class_subset):
  base = model_logits_fn(model)
  index = np.asarray(class_subset, np.int32)

  def fn(params, images, domain):
    return jnp.take(base(params, images, domain), index, axis=-1)
  return fn


def grid_robust(model, params: Any, batches: Iterable[dict], domains: np.ndarray, *,
                attack: str, eps: float, norm: str, num_steps: int,
                class_subset: Sequence[int] | None = None, mesh=None, seed: int = 0,
                batch_size: int | None = None) -> dict:
  """Clean and robust correctness of every example under each column, each row attacked against
  its own column's model (for soups: the soup itself, not the adversarial adapter).

  Args:
    domains: int [A] or mixing weights [A, D] (see `expand`).
    attack: one of ATTACK_CHOICES except 'none'.
    eps: pixel units; norm: 'linf' | 'l2'; num_steps: iterations of each attack.
    class_subset: restrict logits to these classes (labels are remapped to the subset).
    batch_size: rows per compiled call (default: the first expanded batch's size).
  Returns:
    {'clean_correct' [N, A], 'robust' [N, A], 'broken_by' [N, A] (index into `attacks`, -1 none),
     'attacks': the attacks' settings (dicts)}.
  """
  count = len(np.asarray(domains))
  subset = None if class_subset is None else tuple(int(c) for c in class_subset)
  logits_fn = model_logits_fn(model) if subset is None else _subset_logits_fn(model, subset)

  def rows() -> Iterator[dict]:
    for batch in batches:
      r = expand(batch, domains)
      if subset is not None:
        where = np.clip(np.searchsorted(subset, r["label"]), 0, len(subset) - 1)
        if np.any((np.asarray(subset)[where] != r["label"]) & r["mask"]):
          raise ValueError("labels outside the dataset's class subset")
        r["label"] = where.astype(np.int32)
      yield r

  result = robust_accuracy(logits_fn, rows(), eps=eps, norm=norm, attacks=attack_names(attack),
                           num_steps=num_steps, params=params, mesh=mesh, seed=seed,
                           batch_size=batch_size)
  clean = result.clean_correct.reshape(-1, count)
  broken = result.broken_by.reshape(-1, count)
  return dict(clean_correct=clean, robust=clean & (broken < 0), broken_by=broken,
              attacks=list(result.attacks))


# ------------------------------------------------------------------------------------------------
# Requests: attacks, datasets and shifts by name, all checked before any compilation.

ATTACK_CHOICES = ("pgd", "apgd-ce", "autoattack", "none")
APGD_STEPS = 100  # AutoAttack's default number of APGD iterations
_ATTACK_NAMES = {"pgd": ("pgd",), "apgd-ce": ("apgd-ce",), "autoattack": ("apgd-ce", "apgd-t"),
                 "none": ()}
_PRETTY = {"pgd": "PGD", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T"}
SHIFT_FAMILIES = {"imagenet2012_corrupted": "imagenet2012", "cifar10_corrupted": "cifar10"}


def attack_names(attack: str) -> tuple[str, ...]:
  """The attacks `attack` runs, in order ('autoattack' -> ('apgd-ce', 'apgd-t'); 'none' -> ())."""
  if attack not in _ATTACK_NAMES:
    raise ValueError(f"unknown attack {attack!r}: allowed {', '.join(ATTACK_CHOICES)} "
                     "(autoattack = APGD-CE + APGD-T, AutoAttack's white-box core)")
  return _ATTACK_NAMES[attack]


def pretty_attack(name: str) -> str:
  """'apgd-ce' -> 'APGD-CE'."""
  return _PRETTY.get(name, name.upper())


def describe_attack(attack: str, num_steps: int) -> str:
  """A human name that says which attacks ran, e.g. 'PGD-20' or
  'APGD-CE + APGD-T (100 steps each; AutoAttack's white-box core, not the full AutoAttack)'."""
  names = attack_names(attack)
  if not names:
    return "none (clean accuracy only)"
  if names == ("pgd",):
    return f"PGD-{num_steps}"
  text = " + ".join(pretty_attack(n) for n in names) + f" ({num_steps} steps"
  if attack == "autoattack":
    return text + " each; AutoAttack's white-box core, not the full AutoAttack)"
  return text + ")"


def default_steps(config: ml_collections.ConfigDict, attack: str) -> int:
  """config.eval.attack_steps for PGD, 100 for APGD (AutoAttack's default)."""
  return int(config.eval.attack_steps) if attack == "pgd" else APGD_STEPS


def parse_shifts(shifts: str | Sequence[str] | None) -> list[tuple[str, list[str]]]:
  """Shift groups [(group name, [dataset names])] from 'imagenet_r,imagenet2012_corrupted/*,...'.

  A corrupted family ('imagenet2012_corrupted', 'imagenet2012_corrupted/*', same for cifar10)
  expands to its 75 standard corruption x severity sets (reported as their mean); a specific
  set ('imagenet2012_corrupted/fog_3') or any other registered name is one dataset. ValueError
  for an unknown name (the message lists the allowed ones).
  """
  if shifts is None:
    return []
  items = shifts.split(",") if isinstance(shifts, str) else list(shifts)
  groups, seen = [], set()
  for item in (i.strip() for i in items):
    if not item or item in seen:
      continue
    seen.add(item)
    family = item[:-2] if item.endswith("/*") else item
    if family in SHIFT_FAMILIES:
      groups.append((family, data_lib.corrupted_datasets(SHIFT_FAMILIES[family])))
    else:
      data_lib.get_spec(item)
      groups.append((item, [item]))
  return groups


def check_dataset(name: str, config: ml_collections.ConfigDict) -> data_lib.DatasetSpec:
  """The spec of dataset `name` after checking the workdir's model can read it (classes and
  channels); ValueError naming the mismatch otherwise."""
  spec = data_lib.get_spec(name)
  if spec.num_classes != config.model.num_classes:
    raise ValueError(f"dataset {name!r} has {spec.num_classes} classes but the model in the "
                     f"workdir has {config.model.num_classes}")
  channels = config.model.get("channels", None)
  if channels and spec.channels != channels:
    raise ValueError(f"dataset {name!r} has {spec.channels}-channel images but the model takes "
                     f"{channels}")
  return spec


def split_size(name: str, split: str, data_dir: str | None) -> int | None:
  """Examples in `split` of dataset `name` when TFDS knows it (else None)."""
  try:
    builder = data_lib.get_builder(data_lib.get_spec(name), data_dir)
    return int(builder.info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except (unknown sizes only cost the progress total)
    return None


@dataclasses.dataclass
class Plan:
  """A validated evaluation request (see `make_plan`); `loaded` holds the restored model."""
  loaded: Any
  attack: str
  eps: float
  norm: str
  steps: int
  dataset: str
  split: str
  num_examples: int | None
  batch_size: int
  shifts: list[tuple[str, list[str]]]
  data_dir: str | None
  seed: int = 0

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.loaded.config

  def data_batch_size(self, columns: int) -> int:
    """Examples per data batch when each is expanded to `columns` rows: ceil(batch_size / A),
    so an expanded batch holds about `batch_size` rows (host memory does not grow with A)."""
    return max(1, -(-self.batch_size // max(columns, 1)))

  def batches(self, name: str, split: str | None = None, num_examples: int | None = None,
              columns: int = 1):
    """eval_batches of dataset `name` at the model's image size (None: the plan's own split and
    number of examples for the main dataset, the dataset's eval split for others), in batches of
    `data_batch_size(columns)` examples."""
    spec = data_lib.get_spec(name)
    if split is None:
      split = self.split if name == self.dataset else spec.eval_split
    if num_examples is not None:
      size = split_size(name, split, self.data_dir)
      if size is not None and num_examples >= size:
        num_examples = None  # the whole split (TFDS rejects a slice past its end)
    return data_lib.eval_batches(name, split=split, batch_size=self.data_batch_size(columns),
                                 num_examples=num_examples, data_dir=self.data_dir,
                                 image_size=self.config.model.image_size)

  def num_batches(self, name: str, split: str | None = None, num_examples: int | None = None,
                  columns: int = 1) -> int | None:
    """How many data batches `batches` yields (None when the split's size is unknown)."""
    size = split_size(name, split or data_lib.get_spec(name).eval_split, self.data_dir)
    if num_examples is not None:
      size = num_examples if size is None else min(size, num_examples)
    if size is None:
      return None
    return data_lib.num_eval_batches(size, self.data_batch_size(columns), 1)


def probe(plan_data_dir: str | None, name: str, split: str, image_size: int) -> None:
  """Opens dataset `name` / `split` (one example) so a missing dataset or a bad split fails now,
  before any compilation: ValueError with one line saying what is wrong and how to fix it."""
  try:
    data_lib.eval_batches(name, split=split, batch_size=1, num_examples=1,
                          data_dir=plan_data_dir, image_size=image_size)
  except data_lib.DatasetNotFoundError as e:
    raise ValueError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except (TFDS split errors vary by version)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f"cannot read split {split!r} of dataset {name!r}: {first}") from None


def make_plan(workdir: str, *, attack: str = "pgd", eps: float | str | None = None,
              norm: str | None = None, steps: int | None = None, dataset: str | None = None,
              split: str | None = None, num_examples: int | None = None,
              batch_size: int | None = None, shifts: Any = (), step: int | None = None,
              data_dir: str | None = None) -> Plan:
  """Checks a request and restores the model, compiling nothing.

  Defaults come from the workdir's config: eps / norm from config.attack, steps from
  `default_steps`, dataset from config.data (split: config.eval.split or the dataset's evaluation
  split), num_examples / batch_size from config.eval, data_dir from config.data. Raises
  ValueError or FileNotFoundError with one line naming the bad value and what is allowed.
  """
  from adv_soups import cli, loading  # loading builds on this module
  attack_names(attack)
  config = workdir_lib.load_config(workdir)
  loading.checkpoint_step(workdir, step)
  norm = norm or config.attack.norm
  if norm not in ("linf", "l2"):
    raise ValueError(f"unknown norm {norm!r}: allowed linf, l2")
  eps = cli.parse_eps(config.attack.eps if eps is None else eps, norm)
  steps = default_steps(config, attack) if steps is None else steps
  if int(steps) != steps or steps < 1:
    raise ValueError(f"--steps={steps} must be an integer >= 1")
  for name, value in (("num_examples", num_examples), ("batch_size", batch_size)):
    if value is not None and (int(value) != value or value < 1):
      raise ValueError(f"--{name}={value} must be an integer >= 1")
  dataset = dataset or config.data.name
  spec = check_dataset(dataset, config)
  split = split or config.eval.get("split", None) or spec.eval_split
  if num_examples is None and dataset == config.data.name:
    num_examples = config.eval.get("num_examples", None)
  groups = parse_shifts(shifts)
  for _, names in groups:
    check_dataset(names[0], config)
  data_dir = data_dir if data_dir is not None else config.data.get("data_dir", None)
  size = config.model.image_size
  probe(data_dir, dataset, split, size)
  for _, names in groups:
    for name in names:
      probe(data_dir, name, data_lib.get_spec(name).eval_split, size)
  loaded = loading.load(workdir, step)
  return Plan(loaded=loaded, attack=attack, eps=eps, norm=norm, steps=int(steps),
              dataset=dataset, split=split, num_examples=num_examples,
              batch_size=int(batch_size or config.eval.batch_size), shifts=groups,
              data_dir=data_dir, seed=int(config.get("seed", 0)))


class Progress:
  """One tqdm bar (stderr, with ETA) over the data batches of every dataset an evaluation reads."""

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


def run_evaluation(plan: Plan, domains: np.ndarray, *, progress: Progress | None = None,
                   mesh=None) -> dict:
  """Evaluates the plan for each of the A domain columns (int [A] or mixing weights [A, D]).

  Returns per-column lists: {'num_examples', 'clean_accuracy' [A], 'robust_accuracy' [A] or None,
  'accuracy_after' {attack: [A]} (robust accuracy after each attack in turn), 'attacks' (their
  settings), 'shifts' {group: {'mean' [A], 'per_dataset' {name: [A]}, 'num_examples' {name: n},
  'per_corruption' {corruption: [A]} for corrupted families}}, 'clean_correct' [N, A] (numpy)}.
  """
  mesh = mesh or parallel.make_mesh()
  model, params = plan.loaded.model, plan.loaded.params
  domains = np.asarray(domains)
  main_spec = data_lib.get_spec(plan.dataset)
  wrap = (lambda b, name: progress.wrap(b, name)) if progress else (lambda b, name: b)
  columns = len(domains)
  batches = wrap(plan.batches(plan.dataset, plan.split, plan.num_examples, columns), plan.dataset)
  out: dict[str, Any] = dict(accuracy_after={}, attacks=[], robust_accuracy=None)
  if plan.attack == "none":
    clean = grid_clean_correct(model, params, batches, domains, class_subset=main_spec.class_subset,
                               mesh=mesh, batch_size=plan.batch_size)
  else:
    grid = grid_robust(model, params, batches, domains, attack=plan.attack, eps=plan.eps,
                       norm=plan.norm, num_steps=plan.steps, class_subset=main_spec.class_subset,
                       mesh=mesh, seed=plan.seed, batch_size=plan.batch_size)
    clean, broken = grid["clean_correct"], grid["broken_by"]
    out["robust_accuracy"] = grid["robust"].mean(0).tolist()
    out["attacks"] = grid["attacks"]
    for j, name in enumerate(attack_names(plan.attack)):
      out["accuracy_after"][name] = (clean & ((broken < 0) | (broken > j))).mean(0).tolist()
  out["num_examples"] = int(clean.shape[0])
  out["clean_accuracy"] = clean.mean(0).tolist()
  out["clean_correct"] = clean
  out["shifts"] = {}
  for group, names in plan.shifts:
    per_dataset, counts = {}, {}
    for name in names:
      spec = data_lib.get_spec(name)
      correct = grid_clean_correct(
          model, params, wrap(plan.batches(name, None, plan.num_examples, columns), name), domains,
          class_subset=spec.class_subset, mesh=mesh, batch_size=plan.batch_size)
      per_dataset[name], counts[name] = correct.mean(0).tolist(), int(correct.shape[0])
    entry = dict(mean=np.mean(list(per_dataset.values()), axis=0).tolist(),
                 per_dataset=per_dataset, num_examples=counts)
    if group in SHIFT_FAMILIES:
      corruptions = list(dict.fromkeys(_corruption(n) for n in names))  # in order, unique
      entry["per_corruption"] = {
          c: np.mean([per_dataset[n] for n in names if _corruption(n) == c], axis=0).tolist()
          for c in corruptions}
    out["shifts"][group] = entry
  return out


def total_batches(plan: Plan, columns: int = 1) -> int | None:
  """Data batches `run_evaluation` reads for `columns` domain columns (None when a split size is
  unknown): the progress bar's total."""
  counts = [plan.num_batches(plan.dataset, plan.split, plan.num_examples, columns)]
  counts += [plan.num_batches(n, None, plan.num_examples, columns) for _, names in plan.shifts
             for n in names]
  return None if any(c is None for c in counts) else sum(counts)


# ------------------------------------------------------------------------------------------------
# One model: `python -m adv_soups.evaluate`.

def _percent(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.2f}%"


def evaluate_one(workdir: str, *, alpha: float | None = None, domain: int | None = None,
                 attack: str = "autoattack", out_dir: str | None = None, progress: bool = True,
                 write: bool = True, **plan_kwargs) -> dict:
  """Full report of one model of a workdir: the soup at `alpha` or domain `domain` (exactly one).

  `plan_kwargs` go to `make_plan` (eps, norm, steps, dataset, split, num_examples, batch_size,
  shifts, step, data_dir). Writes `<workdir>/eval/eval_alpha<A>.json` (or `eval_domain<D>`)
  unless `write` is False; returns the report (a JSON-compatible dict).
  """
  plan, domains, label = plan_one(workdir, alpha=alpha, domain=domain, attack=attack,
                                  **plan_kwargs)
  return execute_one(plan, domains, label, out_dir=out_dir, progress=progress, write=write)


def plan_one(workdir: str, *, alpha: float | str | None = None, domain: int | None = None,
             attack: str = "autoattack", **plan_kwargs) -> tuple[Plan, np.ndarray, str]:
  """(plan, domains [1] or [1, D], label) for `evaluate_one`; all checks, nothing compiled."""
  from adv_soups import cli
  if (alpha is None) == (domain is None):
    raise ValueError("give exactly one of --alpha=A (a soup, 0 = clean mode, 1 = robust mode) "
                     "or --domain=D (a domain id)")
  if alpha is not None:
    alpha = cli.parse_number(alpha, "--alpha") if isinstance(alpha, str) else float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
      raise ValueError(f"--alpha={alpha} is outside [0, 1] (0 = clean mode, 1 = robust mode)")
  plan = make_plan(workdir, attack=attack, **plan_kwargs)
  num_domains = plan.loaded.num_domains
  if domain is not None:
    if int(domain) != domain or not 0 <= domain < num_domains:
      raise ValueError(f"--domain={domain} is out of range: the model has {num_domains} "
                       f"domain(s), allowed 0..{num_domains - 1}")
    return plan, np.asarray([int(domain)], np.int32), f"domain{int(domain)}"
  if num_domains == 1:
    if alpha != 0:
      raise ValueError(f"--alpha={alpha}: the workdir holds a single-domain model (no soups); "
                       "allowed --alpha=0 or --domain=0")
    return plan, np.zeros([1], np.int32), "alpha0"
  weights = np.zeros((1, num_domains), np.float32)
  weights[0, 0], weights[0, 1] = 1.0 - alpha, alpha
  return plan, weights, f"alpha{alpha:g}"


def execute_one(plan: Plan, domains: np.ndarray, label: str, *, out_dir: str | None = None,
                progress: bool = True, write: bool = True) -> dict:
  """Runs `plan` for one domain column; the report dict (written as JSON unless `write` False)."""
  start = time.time()
  bar = Progress(total_batches(plan), enabled=progress)
  try:
    result = run_evaluation(plan, domains, progress=bar)
  finally:
    bar.close()
  loaded = plan.loaded
  names = attack_names(plan.attack)
  report = dict(
      workdir=loaded.workdir, model=label, checkpoint_step=loaded.step,
      params_item=loaded.params_item, domain=np.asarray(domains)[0].tolist(),
      dataset=plan.dataset, split=plan.split, num_examples=result["num_examples"],
      attack=dict(requested=plan.attack, description=describe_attack(plan.attack, plan.steps),
                  attacks=result["attacks"]),
      eps=plan.eps, norm=plan.norm, steps=plan.steps,
      clean_accuracy=result["clean_accuracy"][0],
      robust_accuracy=None if result["robust_accuracy"] is None else result["robust_accuracy"][0],
      robust_accuracy_after={pretty_attack(n): result["accuracy_after"][n][0] for n in names},
      shifts={g: dict(mean=e["mean"][0], datasets=len(e["per_dataset"]),
                      per_dataset={k: v[0] for k, v in e["per_dataset"].items()},
                      **({"per_corruption": {k: v[0] for k, v in e["per_corruption"].items()}}
                         if "per_corruption" in e else {}),
                      num_examples=e["num_examples"])
              for g, e in result["shifts"].items()},
      wall_time_s=time.time() - start)
  if write:
    out_dir = out_dir or os.path.join(loaded.workdir, "eval")
    tf.io.gfile.makedirs(out_dir)
    path = os.path.join(out_dir, f"eval_{label}.json")
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(report, f, indent=2)
    report["path"] = path
  return report


def format_report(report: dict) -> str:
  """The one-model report as a small two-column table."""
  lines = [f"{report['workdir']} (checkpoint step {report['checkpoint_step']}, "
           f"{report['params_item']}), model {report['model']}",
           f"{report['dataset']} {report['split']}, {report['num_examples']} examples; attack: "
           f"{report['attack']['description']}, {report['norm']} eps={report['eps']:.6g}"]
  rows = [("clean accuracy", _percent(report["clean_accuracy"]))]
  after = list(report["robust_accuracy_after"].items())
  for i, (name, value) in enumerate(after):
    prefix = "robust accuracy after " + ("" if i == 0 else "+ ") + name
    rows.append((prefix + (" (final)" if i == len(after) - 1 and i else ""), _percent(value)))
  for group, entry in report["shifts"].items():
    suffix = f" (mean of {entry['datasets']})" if entry["datasets"] > 1 else ""
    rows.append((f"{group}{suffix}", _percent(entry["mean"])))
  width = max(len(r[0]) for r in rows)
  lines += [f"  {name:<{width}}  {value:>8}" for name, value in rows]
  if "path" in report:
    lines.append(f"written to {report['path']}")
  return "\n".join(lines)


COMMON_FLAGS = (
    ("string", "workdir", None, "Training workdir (config.json + checkpoints)."),
    ("string", "eps", None, "Attack radius in pixels, e.g. 0.1 or 4/255 (default: the config's)."),
    ("string", "norm", None, "linf or l2 (default: config.attack.norm)."),
    ("integer", "steps", None,
     "Attack iterations (default: config.eval.attack_steps for PGD, 100 for APGD)."),
    ("string", "dataset", None, "Dataset (default: the run's)."),
    ("string", "split", None, "Split (default: config.eval.split or the dataset's eval split)."),
    ("string", "shifts", "", "Comma-separated shifted datasets, e.g. imagenet_v2,imagenet_r,"
     "imagenet2012_corrupted (= the mean over its 75 corruption x severity sets)."),
    ("integer", "num_examples", None, "Examples per dataset (default: config.eval's, or all)."),
    ("integer", "batch_size", None, "Examples per batch (default: config.eval.batch_size)."),
    ("integer", "step", None, "Checkpoint step (default: the latest)."),
    ("string", "data_dir", None, "TFDS data_dir (default: the run's config.data.data_dir)."),
)


def define_flags(specs) -> Any:
  """A fresh absl FlagValues holding `specs` ((kind, name, default, help) tuples), so that a
  program's main() can run more than once in one process (tests)."""
  from absl import flags
  values = flags.FlagValues()
  for kind, name, default, help_text in specs:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=values)
  return values


def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.evaluate`: checks everything (one line, exit 2 on bad input), runs."""
  from adv_soups import cli
  v = define_flags(COMMON_FLAGS + (
      ("string", "alpha", None, "Soup coefficient: 0 = clean mode, 1 = robust mode (e.g. 0.5)."),
      ("integer", "domain", None, "Domain id instead of --alpha (0 = clean, 1 = adversarial)."),
      ("string", "attack", "autoattack", f"One of {', '.join(ATTACK_CHOICES)}; autoattack = "
       "APGD-CE + APGD-T (AutoAttack's white-box core)."),
  ))
  cli.parse_flags(argv, v)
  if not v.workdir:
    cli.fail("--workdir=DIR is required")
  try:
    plan, domains, label = plan_one(
        v.workdir, alpha=v.alpha, domain=v.domain, attack=v.attack, eps=v.eps, norm=v.norm,
        steps=v.steps, dataset=v.dataset, split=v.split, num_examples=v.num_examples,
        batch_size=v.batch_size, shifts=v.shifts, step=v.step, data_dir=v.data_dir)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  print(format_report(execute_one(plan, domains, label)))


if __name__ == "__main__":
  main()
