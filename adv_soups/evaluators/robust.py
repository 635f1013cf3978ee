"""The robust evaluator (the default `config.evals` type): clean and robust accuracy of the run's
models (domains or soups) under an attack suite, through the evaluation engine.

  config.evals.val = dict(type="robust", every=500, attack="pgd", steps=None,
                          domains="clean,adversarial", dataset=None, split=None,
                          num_examples=None, batch_size=None, eps=None, norm=None)

attack: a suite of `attacks.suites` ('pgd', 'apgd-ce', 'autoattack', 'apgd-ce,apgd-t', or
  'none' for clean accuracy only); steps: its budget (None: the table's default, PGD's from
  config.eval.attack_steps).
domains: the models to evaluate, a comma list of 'clean' (domain 0), 'adversarial' (domain 1) and
  numbers (the soup at that alpha); a single-domain run evaluates its one model ('model'). In a
  run with `config.threats` a threat's name is its domain, attacked with that threat's norm and
  eps (unless the entry sets `norm`); every other model with the first threat's.
dataset / split / num_examples / batch_size / eps: None = config.data.name, config.eval's,
  config.attack.eps (the first threat's). A num_examples larger than the split is clamped,
  with one note line.
norm: None = config.attack.norm (the threat's); 'l1' (evaluation only: training attacks are
  l_inf / l_2) needs its own eps.
Metrics: '<model>/clean_accuracy' and '<model>/robust_accuracy' (the caller prefixes the entry's
name). The engine and the data sets load TensorFlow: they are imported when an evaluation or a
dataset check runs, so the schema that lists these fields stays light.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np
from absl import logging
from ml_collections.config_dict import placeholder

from adv_soups import soups
from adv_soups import threats as threats_lib
from adv_soups.attacks import registry

_noted: set[tuple] = set()


def fields() -> dict[str, Any]:
  """The robust evaluator's fields and defaults (None fields are typed placeholders)."""
  return dict(attack="pgd", domains="clean,adversarial", steps=placeholder(int),
              dataset=placeholder(str), split=placeholder(str), num_examples=placeholder(int),
              batch_size=placeholder(int), eps=placeholder(float), norm=placeholder(str))


def parse_domains(text: str, num_domains: int, threat_names: Sequence[str] = ()
                  ) -> tuple[np.ndarray, list[str]]:
  """'clean,adversarial,0.5' -> (columns int [A] or weights [A, D], labels). ValueError for a
  bad token. A single-domain model has one column, domain 0, labelled 'model'. In a run with
  threats (`threat_names`, domain i + 1 is threat_names[i]) a threat's name is its domain."""
  tokens = [t.strip() for t in str(text).split(",") if t.strip()]
  allowed = ", ".join(["clean", "adversarial"] + list(threat_names)) + " or an alpha in [0, 1]"
  if not tokens:
    raise ValueError(f"domains={text!r} is empty: allowed a comma list of {allowed}")
  width = max(num_domains, 2)
  rows, labels = [], []
  for t in tokens:
    if t in ("clean", "adversarial") or t in threat_names:
      domain = 0 if t == "clean" else 1 if t == "adversarial" else \
          list(threat_names).index(t) + 1
      row = np.eye(width, dtype=np.float32)[min(domain, width - 1)]
    else:
      try:
        alpha = float(t)
      except ValueError:
        raise ValueError(f"domains={text!r}: unknown model {t!r}; allowed {allowed}") from None
      if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"domains={text!r}: alpha {t} is outside [0, 1]")
      t = f"alpha{alpha:g}"
      row = np.pad(np.asarray(soups.mix_weights([alpha])[0], np.float32), (0, width - 2))
    if t not in labels:
      rows.append(row)
      labels.append(t)
  if num_domains == 1:
    return np.zeros([1], np.int32), ["model"]
  mix = np.stack(rows)
  if all(lab in ("clean", "adversarial") or lab in threat_names for lab in labels):
    return np.argmax(mix, axis=1).astype(np.int32), labels
  return mix, labels


def _threat_names(config: ml_collections.ConfigDict) -> list[str]:
  """The names of the run's threats when it lists them (config.threats), else none."""
  return threats_lib.names(config) if threats_lib.has_threats(config) else []


def check(where: str, entry: Any, config: ml_collections.ConfigDict) -> None:
  """ValueError (one line starting with `where`) for a bad field of a robust entry."""
  from adv_soups.evaluation import requests as requests_lib  # TFDS
  try:
    names = registry.parse_suite(entry.get("attack", "none"))
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
    if spec.num_classes < registry.ATTACKS[n].min_classes:
      raise ValueError(f"{where}.attack: {n} needs >= {registry.ATTACKS[n].min_classes} "
                       f"classes, {dataset!r} has {spec.num_classes}")
  eps = entry.get("eps", None)
  # Without `norm`, each threat's own domain is attacked with its norm, the rest with the first's.
  norms = ([entry["norm"]] if entry.get("norm", None) else
           list(dict.fromkeys(t["norm"] for t in threats_lib.normalise(config).values())))
  for norm in norms:
    if norm not in ("linf", "l2", "l1"):
      raise ValueError(f"{where}.norm={norm!r}: allowed linf, l2, l1")
    try:
      registry.check_norm(names, norm)
    except ValueError as e:
      raise ValueError(f"{where}.attack: {e}") from None
    if norm == "l1" and eps is None and names:
      raise ValueError(f"{where}.norm=l1 needs its own {where}.eps (an l_1 radius in pixels)")
    if eps is not None and not (0 <= eps <= (1 if norm == "linf" else np.inf)):
      raise ValueError(f"{where}.eps={eps} is outside the allowed range for {norm}")


def _requests(where: str, entry: Any, config: ml_collections.ConfigDict, model, params: Any,
              step: int, workdir: str) -> list[tuple[Any, list[str], int, Any]]:
  """[(request, row labels, rows per compiled call, data spec)] of one entry: one request, or in
  a run with threats one per threat attacking: a threat's own domain is attacked with that threat
  (its norm, and its eps unless the entry sets them); every other column (clean, soups) with the
  run's first threat."""
  from adv_soups import data as data_lib
  from adv_soups import loading
  from adv_soups.evaluation import requests as requests_lib
  from adv_soups.evaluation import run as run_lib
  loaded = loading.LoadedModel(config=config, model=model, params=params, step=step,
                               workdir=workdir)
  columns, labels = parse_domains(entry.get("domains", "clean"), int(config.model.num_domains),
                                  _threat_names(config))
  run_threats = threats_lib.normalise(config) if threats_lib.has_threats(config) else {}
  first = next(iter(run_threats), None)
  groups: dict[str | None, list[int]] = {}
  for a, label in enumerate(labels):
    groups.setdefault(label if label in run_threats else first, []).append(a)
  out = []
  for threat, indices in groups.items():
    norm, eps = entry.get("norm", None), entry.get("eps", None)
    if threat is not None and norm is None:
      norm = run_threats[threat]["norm"]
      eps = run_threats[threat]["eps"] if eps is None else eps
    request = requests_lib.make_request(
        workdir, attack=entry.get("attack", "none"), eps=eps, norm=norm,
        steps=entry.get("steps", None), dataset=entry.get("dataset", None),
        split=entry.get("split", None), num_examples=entry.get("num_examples", None),
        batch_size=entry.get("batch_size", None), alphas=[0.0], loaded=loaded)
    request.columns, request.labels = columns[indices], [labels[a] for a in indices]
    rows = run_lib.batch_rows(request, request.dataset, request.split, request.num_examples,
                              len(indices))
    out.append((request, request.labels, rows, data_lib.get_spec(request.dataset)))
  return out


def evaluate(where: str, entry: Any, config: ml_collections.ConfigDict, model, params: Any,
             step: int, workdir: str = "") -> Iterator[tuple[str, float]]:
  """Yields ('<model>/clean_accuracy', fraction) and, with an attack, ('<model>/robust_accuracy',
  fraction) for each model of `entry.domains`, on host-local `params`."""
  from adv_soups.evaluation import engine
  for request, labels, rows, spec in _requests(where, entry, config, model, params, step,
                                               workdir):
    _note_clamp(where, request)
    result = engine.gather(engine.evaluate_columns(  # float32 compute unless the entry says not
        request.loaded.model, params,
        request.batches(request.dataset, request.split, request.num_examples),
        request.columns, attacks=request.attacks, budgets=request.budgets, eps=request.eps,
        norm=request.norm, class_subset=spec.class_subset, seed=request.seed, batch_size=rows,
        version=request.version, eot_draws=request.eot_draws,
        index_offset=request.offset(request.dataset, request.split, request.num_examples)))
    for a, label in enumerate(labels):
      yield f"{label}/clean_accuracy", float(result.clean_correct[:, a].mean())
      if request.attacks:
        yield f"{label}/robust_accuracy", float(result.robust[:, a].mean())


def programs(where: str, entry: Any, config: ml_collections.ConfigDict, model, params: Any,
             resident: int = 0, workdir: str = "") -> list:
  """This entry's stage programs compiled ahead of time for full batches, as `memory.Program`s
  (the memory check; the evaluation then executes these very objects from the runner's cache)."""
  import jax
  from adv_soups import memory
  from adv_soups.evaluation import engine
  field = f"{where}.batch_size" if entry.get("batch_size", None) else "config.eval.batch_size"
  size = config.model.image_size
  fixed = memory.tree_bytes(params)
  out = []
  for request, _, rows, spec in _requests(where, entry, config, model, params, 0, workdir):
    what = registry.describe(request.attacks, request.budgets)
    out += [memory.Program(
        name=f"periodic evaluation {where!r} ({what} at {size} px; stage {stage})",
        compiled=compiled, field=field, value=request.batch_size, units=rows, fixed=fixed,
        resident=resident, multiple=jax.local_device_count())
        for stage, compiled in engine.column_programs(
            request.loaded.model, params, (size, size, int(config.model.channels)),
            request.columns, attacks=request.attacks, budgets=request.budgets, eps=request.eps,
            norm=request.norm, class_subset=spec.class_subset, seed=request.seed,
            batch_size=rows, version=request.version, eot_draws=request.eot_draws)]
  return out


def describe(entry: Any, config: ml_collections.ConfigDict) -> str:
  """'<domains> on <dataset>, <attacks and budgets>'."""
  names = registry.parse_suite(entry.get("attack", "none"))
  budgets = registry.resolve_steps(names, entry.get("steps", None), int(config.eval.attack_steps))
  norm = entry.get("norm", None) or next(iter(threats_lib.normalise(config).values()))["norm"]
  return (f"{entry.get('domains')} on {entry.get('dataset', None) or config.data.name}, "
          f"{registry.describe(names, budgets, registry.version_of(entry.get('attack')), norm)}")


def _note_clamp(where: str, request) -> None:
  """One note line (once per entry and split) when num_examples exceeds the split."""
  if request.num_examples is None:
    return
  from adv_soups.evaluation import requests as requests_lib
  size = requests_lib.split_size(request.dataset, request.split, request.data_dir)
  key = (where, request.dataset, request.split, request.num_examples)
  if size is not None and request.num_examples > size and key not in _noted:
    _noted.add(key)
    logging.warning("%s: num_examples=%d exceeds the %d examples of %s %r: "
                    "evaluating all %d", where, request.num_examples, size, request.dataset,
                    request.split, size)
