"""Periodic evaluation during training, described in the config (`config.evals`, big_vision-style).

Each entry of `config.evals` is one evaluator, named by its key; its `type` picks the evaluator
(`adv_soups.evaluators`, default "robust"), e.g.

  config.evals.val = evaluators.entry("robust", every=500, attack="pgd",
                                      domains="clean,adversarial")

every: training steps between runs (0 = only at the end; the last step always runs).
The other fields are the type's own (see `adv_soups/evaluators/robust.py` for the default type).
Metrics are named '<entry>/<metric>' where the evaluator yields '<metric>' (the robust type:
'<entry>/<model>/clean_accuracy' and '<entry>/<model>/robust_accuracy').
These settings leave the training trajectory alone, so a resumed run may change them.
"""
from __future__ import annotations

import functools
from typing import Any

import ml_collections

from adv_soups import evaluators
from adv_soups.evaluation import engine
from adv_soups.evaluators.robust import parse_domains  # noqa: F401  (its earlier home)

evaluator = functools.partial(evaluators.entry, "robust")  # its earlier name: one robust entry
validate = evaluators.validate  # noqa: E305  (its earlier home)


def due(config: ml_collections.ConfigDict, step: int, last: bool) -> list[str]:
  """The entries that run at `step` (each at its `every`, and all at the last step)."""
  evals = config.get("evals", None) or {}
  return [name for name, e in evals.items()
          if last or (e.get("every", 0) and step % e["every"] == 0)]


def evaluate(config: ml_collections.ConfigDict, model, params: Any, step: int,
             names: list[str] | None = None, workdir: str = "") -> dict[str, float]:
  """Runs the `config.evals` entries `names` (default all) on `params`; returns
  {'<entry>/<metric>': value} over what each entry's evaluator yields."""
  params = engine.host_local(params)  # a multi-host state goes to each process's devices
  evals = config.get("evals", None) or {}
  metrics: dict[str, float] = {}
  for name in (list(evals) if names is None else names):
    entry = evals[name]
    kind = evaluators.get(evaluators.type_of(entry))
    for key, value in kind.evaluate(f"config.evals.{name}", entry, config, model, params, step,
                                    workdir):
      metrics[f"{name}/{key}"] = float(value)
  return metrics


def programs(config: ml_collections.ConfigDict, model, params: Any, resident: int = 0,
             workdir: str = "") -> list:
  """Every entry's evaluation programs compiled ahead of time (the runs that follow execute
  them), as `memory.Program`s, from the evaluators that offer `programs(where, entry, config,
  model, params, resident, workdir)`; `resident` = bytes that stay on the device meanwhile (the
  train state beyond these parameters)."""
  params = engine.host_local(params)
  out = []
  for name, entry in (config.get("evals", None) or {}).items():
    kind = evaluators.get(evaluators.type_of(entry))
    if callable(getattr(kind, "programs", None)):
      out.extend(kind.programs(f"config.evals.{name}", entry, config, model, params, resident,
                               workdir))
  return out


def describe(config: ml_collections.ConfigDict) -> list[str]:
  """One line per entry: what it measures and how often."""
  out = []
  for name, e in (config.get("evals", None) or {}).items():
    every = e.get("every", 0)
    text = evaluators.get(evaluators.type_of(e)).describe(e, config)
    out.append(f"{name}: {text}, " + (f"every {every} steps" if every else "at the end"))
  return out
