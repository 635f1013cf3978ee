"""Periodic evaluation during training, described in the config (`config.evals`, big_vision-style).

Each entry of `config.evals` is one evaluator, named by its key, e.g.

  config.evals.val = dict(every=500, attack="pgd", steps=None, domains="clean,adversarial",
                          dataset=None, split=None, num_examples=None, batch_size=None, eps=None)

every: training steps between runs (0 = only at the end; the last step always runs).
attack: a suite of `attacks.suites` ('pgd', 'apgd-ce', 'autoattack', 'apgd-ce,apgd-t', or
  'none' for clean accuracy only); steps: its budget (None: the table's default, PGD's from
  config.eval.attack_steps).
domains: the models to evaluate, a comma list of 'clean' (domain 0), 'adversarial' (domain 1) and
  numbers (the soup at that alpha); a single-domain run evaluates its one model ('model').
dataset / split / num_examples / batch_size / eps: None = config.data.name, config.eval's,
  config.attack.eps. A num_examples larger than the split is clamped, with one note line.
Metrics are named '<entry>/<model>/clean_accuracy' and '<entry>/<model>/robust_accuracy'.
These settings leave the training trajectory alone, so a resumed run may change them.
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging

from adv_soups import data as data_lib
from adv_soups import soups
from adv_soups import threats as threats_lib
from adv_soups.attacks import suites
from adv_soups.evaluation import engine
from adv_soups.evaluation import requests as requests_lib
from adv_soups.evaluation import run as run_lib
from adv_soups.training.config import eval_entry as evaluator  # one entry with every field

FIELDS = ("every", "attack", "steps", "domains", "dataset", "split", "num_examples",
          "batch_size", "eps")
_noted: set[tuple] = set()


def parse_domains(text: str, num_domains: int, threat_names: Sequence[str] = ()
                  ) -> tuple[np.ndarray, list[str]]:
  """'clean,adversarial,0.5' -> (columns int [A] or weights [A, D], labels). ValueError for a
  bad token. A single-domain model has one column, domain 0, labelled 'model'. In a run with
  threats (`threat_names`, domain i + 1 is threat_names[i]) a threat's name is its domain."""
  tokens = [t.strip() for t in str(text).split(",") if t.strip()]
  allowed = ", ".join(["clean", "adversarial"] + list(threat_names)) + " or an alpha in [0, 1]"
  if not tokens:
    raise ValueError(f"domains={text!r} is empty: allowed a comma list of {allowed}")
  rows, labels = [], []
  for t in tokens:
    if t in ("clean", "adversarial") or t in threat_names:
      domain = 0 if t == "clean" else 1 if t == "adversarial" else \
          list(threat_names).index(t) + 1
      row = np.eye(max(num_domains, 2), dtype=np.float32)[min(domain, max(num_domains, 2) - 1)]
    else:
      try:
        alpha = float(t)
      except ValueError:
        raise ValueError(f"domains={text!r}: unknown model {t!r}; allowed {allowed}") from None
      if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"domains={text!r}: alpha {t} is outside [0, 1]")
      t = f"alpha{alpha:g}"
      row = np.pad(np.asarray(soups.mix_weights([alpha])[0], np.float32),
                   (0, max(num_domains, 2) - 2))
    if t not in labels:
      rows.append(row)
      labels.append(t)
  if num_domains == 1:
    return np.zeros([1], np.int32), ["model"]
  mix = np.stack(rows)
  if all(lab == "clean" or lab == "adversarial" or lab in threat_names for lab in labels):
    return np.argmax(mix, axis=1).astype(np.int32), labels
  return mix, labels


def _threat_names(config: ml_collections.ConfigDict) -> list[str]:
  """The names of the run's threats when it lists them (config.threats), else none."""
  return threats_lib.names(config) if threats_lib.has_threats(config) else []


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every `config.evals` entry (ValueError: one line naming the bad field)."""
  evals = config.get("evals", None)
  if evals is None:
    return
  for name, entry in evals.items():
    where = f"config.evals.{name}"
    if not isinstance(entry, (dict, ml_collections.ConfigDict)):
      raise ValueError(f"{where} must be a dict of {', '.join(FIELDS)}")
    unknown = sorted(set(entry.keys()) - set(FIELDS))
    if unknown:
      raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)}: allowed "
                       f"{', '.join(FIELDS)}")
    every = entry.get("every", 0)
    if not isinstance(every, int) or every < 0:
      raise ValueError(f"{where}.every must be an integer >= 0, got {every!r}")
    try:
      names = suites.parse_suite(entry.get("attack", "none"))
    except ValueError as e:
      raise ValueError(f"{where}.attack: {e}") from None
    for field in ("steps", "num_examples", "batch_size"):
      value = entry.get(field, None)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{where}.{field} must be an integer >= 1 (or None), got {value!r}")
    try:
      parse_domains(entry.get("domains", "clean"), int(config.model.num_domains),
                    _threat_names(config))
    except ValueError as e:
      raise ValueError(f"{where}.{e}") from None
    dataset = entry.get("dataset", None) or config.data.name
    try:
      spec = requests_lib.check_dataset(dataset, config)  # classes and channels
    except ValueError as e:
      raise ValueError(f"{where}.dataset: {e}") from None
    for n in names:
      if spec.num_classes < suites.ATTACKS[n].min_classes:
        raise ValueError(f"{where}.attack: {n} needs >= {suites.ATTACKS[n].min_classes} "
                         f"classes, {dataset!r} has {spec.num_classes}")
    eps = entry.get("eps", None)
    norms = {t["norm"] for t in threats_lib.normalise(config).values()}
    if eps is not None and not all(0 <= eps <= (1 if n == "linf" else np.inf) for n in norms):
      raise ValueError(f"{where}.eps={eps} is outside the allowed range for "
                       f"{', '.join(sorted(norms))}")


def due(config: ml_collections.ConfigDict, step: int, last: bool) -> list[str]:
  """The entries that run at `step` (each at its `every`, and all at the last step)."""
  evals = config.get("evals", None) or {}
  return [name for name, e in evals.items()
          if last or (e.get("every", 0) and step % e["every"] == 0)]


def evaluate(config: ml_collections.ConfigDict, model, params: Any, step: int,
             names: list[str] | None = None, workdir: str = "") -> dict[str, float]:
  """Runs the `config.evals` entries `names` (default all) on `params`; returns the metrics
  {'<entry>/<model>/clean_accuracy': fraction, '<entry>/<model>/robust_accuracy': fraction}."""
  from adv_soups import loading
  params = engine.host_local(params)  # a multi-host state goes to each process's devices
  loaded = loading.LoadedModel(config=config, model=model, params=params, step=step,
                               workdir=workdir)
  evals = config.get("evals", None) or {}
  metrics: dict[str, float] = {}
  run_threats = threats_lib.normalise(config)
  first = next(iter(run_threats))
  for name in (list(evals) if names is None else names):
    entry = evals[name]
    columns, labels = parse_domains(entry.get("domains", "clean"), int(config.model.num_domains),
                                    _threat_names(config))
    # A threat's own domain is attacked with that threat (its norm, and its eps unless the entry
    # sets one); every other column (clean, adversarial, soups) with the run's first threat.
    groups: dict[str, list[int]] = {}
    for a, label in enumerate(labels):
      groups.setdefault(label if label in run_threats else first, []).append(a)
    for threat, indices in groups.items():
      request = requests_lib.make_request(
          workdir, attack=entry.get("attack", "none"), norm=run_threats[threat]["norm"],
          eps=run_threats[threat]["eps"] if entry.get("eps", None) is None else entry["eps"],
          steps=entry.get("steps", None), dataset=entry.get("dataset", None),
          split=entry.get("split", None), num_examples=entry.get("num_examples", None),
          batch_size=entry.get("batch_size", None), alphas=[0.0], loaded=loaded)
      request.columns, request.labels = columns[indices], [labels[a] for a in indices]
      _note_clamp(name, request)
      spec = data_lib.get_spec(request.dataset)
      rows = run_lib.batch_rows(request, request.dataset, request.split, request.num_examples,
                                len(indices))
      result = engine.gather(engine.evaluate_columns(
          model, params, request.batches(request.dataset, request.split, request.num_examples),
          request.columns, attacks=request.attacks, budgets=request.budgets, eps=request.eps,
          norm=request.norm, class_subset=spec.class_subset, seed=request.seed, batch_size=rows,
          index_offset=request.offset(request.dataset, request.split, request.num_examples)))
      for a, label in enumerate(request.labels):
        metrics[f"{name}/{label}/clean_accuracy"] = float(result.clean_correct[:, a].mean())
        if request.attacks:
          metrics[f"{name}/{label}/robust_accuracy"] = float(result.robust[:, a].mean())
  return metrics


def describe(config: ml_collections.ConfigDict) -> list[str]:
  """One line per entry: what it measures and how often."""
  out = []
  for name, e in (config.get("evals", None) or {}).items():
    names = suites.parse_suite(e.get("attack", "none"))
    budgets = suites.resolve_steps(names, e.get("steps", None), int(config.eval.attack_steps))
    every = e.get("every", 0)
    out.append(f"{name}: {e.get('domains')} on {e.get('dataset', None) or config.data.name}, "
               f"{suites.describe(names, budgets)}, "
               + (f"every {every} steps" if every else "at the end"))
  return out


def _note_clamp(name: str, request) -> None:
  """One note line (once per entry and split) when num_examples exceeds the split."""
  if request.num_examples is None:
    return
  size = requests_lib.split_size(request.dataset, request.split, request.data_dir)
  key = (name, request.dataset, request.split, request.num_examples)
  if size is not None and request.num_examples > size and key not in _noted:
    _noted.add(key)
    logging.warning("config.evals.%s: num_examples=%d exceeds the %d examples of %s %r: "
                    "evaluating all %d", name, request.num_examples, size, request.dataset,
                    request.split, size)
