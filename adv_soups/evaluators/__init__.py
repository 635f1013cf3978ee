"""Evaluators chosen by type, as in big_vision's `evaluators/common.py`: each entry of
`config.evals` names its kind in `type` (default "robust"), and the kind is a module.

  config.evals.val = evaluators.entry("robust", every=500, attack="pgd")
  config.evals.norm = evaluators.entry("my_eval", every=100, scale=2.0)

`get(type)` finds the evaluator: one registered with `register(name, evaluator)` (any object with
the attributes below, e.g. from a test file), else the module `adv_soups.evaluators.<type>`, else
`type` taken as a dotted module path (your own package). An evaluator provides:

  fields() -> dict           its own fields and their defaults (fresh objects on every call;
                             `ml_collections` placeholders keep a None default overridable)
  check(where, entry, config) -> None     ValueError (one line, starting with `where`) for a bad
                             field; `config` is resolved except for `evals`
  evaluate(where, entry, config, model, params, step, workdir) -> iterable of (metric name,
                             value); `params` are host-local; the caller prefixes each name with
                             the entry's name
  describe(entry, config) -> str          one line: what it measures

Every entry also has the common fields of `COMMON_FIELDS` (`type`, `every`), handled by
`adv_soups.evaluation.periodic`. Adding an evaluator to training is one module here (or a
registered object) plus a config entry. This module imports no TensorFlow.
"""
from __future__ import annotations

import importlib
from typing import Any

import ml_collections

DEFAULT_TYPE = "robust"
COMMON_FIELDS = ("type", "every")
_REGISTERED: dict[str, Any] = {}
_REQUIRED = ("fields", "check", "evaluate", "describe")


def register(name: str, evaluator: Any) -> Any:
  """Makes `evaluator` (a module or any object with fields / check / evaluate / describe) the
  type `name`; ValueError if the name is taken or an attribute is missing. Returns it."""
  missing = [a for a in _REQUIRED if not callable(getattr(evaluator, a, None))]
  if missing:
    raise ValueError(f"evaluator {name!r} lacks {', '.join(missing)}")
  if name in _REGISTERED:
    raise ValueError(f"evaluator type {name!r} is already registered")
  _REGISTERED[name] = evaluator
  return evaluator


def unregister(name: str) -> None:
  """Removes a registered type (tests)."""
  _REGISTERED.pop(name, None)


def get(type_name: str) -> Any:
  """The evaluator of `type_name` (see the module docstring); ValueError naming the allowed."""
  if type_name in _REGISTERED:
    return _REGISTERED[type_name]
  if not isinstance(type_name, str) or not type_name:
    raise ValueError(f"evaluator type {type_name!r} must be a non-empty string")
  candidates = [f"{__name__}.{type_name}"] + ([type_name] if "." in type_name else [])
  for path in candidates:
    try:
      module = importlib.import_module(path)
    except ModuleNotFoundError as e:
      if e.name is not None and not path.startswith(e.name):  # the module exists, its import fails
        raise
      continue
    missing = [a for a in _REQUIRED if not callable(getattr(module, a, None))]
    if missing:
      raise ValueError(f"evaluator module {path} lacks {', '.join(missing)}")
    return module
  raise ValueError(f"unknown evaluator type {type_name!r}: allowed {', '.join(known_types())}, a "
                   "registered type, or a dotted module path")


def known_types() -> list[str]:
  """The registered types and the modules of this package."""
  import pkgutil
  import os
  here = os.path.dirname(__file__)
  return sorted(set(_REGISTERED) | {m.name for m in pkgutil.iter_modules([here])})


def entry(type: str = DEFAULT_TYPE, every: int = 500,  # pylint: disable=redefined-builtin
          **overrides: Any) -> ml_collections.ConfigDict:
  """One `config.evals` entry of `type` with every field present (the evaluator's defaults, then
  `overrides`), so each field can be overridden from the command line
  (--config.evals.val.num_examples=1000). ValueError for a field the type does not have."""
  fields = get(type).fields()
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"evaluator type {type!r} has no field(s) {', '.join(unknown)}: allowed "
                     f"{', '.join(sorted(fields))}")
  config = ml_collections.ConfigDict(dict(type=type, every=every, **fields))
  config.update(overrides)
  return config


def type_of(entry: Any) -> str:
  """The `type` of a `config.evals` entry (DEFAULT_TYPE when absent: configs written before types)."""
  return entry.get("type", None) or DEFAULT_TYPE


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every `config.evals` entry (ValueError: one line naming the bad field): its type,
  `every`, that it has only its type's fields, then the type's own checks."""
  evals = config.get("evals", None)
  if evals is None:
    return
  for name, entry in evals.items():
    where = f"config.evals.{name}"
    if not isinstance(entry, (dict, ml_collections.ConfigDict)):
      raise ValueError(f"{where} must be a dict of an evaluator's fields (type, every, ...)")
    try:
      kind = get(type_of(entry))
    except ValueError as e:
      raise ValueError(f"{where}.type: {e}") from None
    allowed = list(COMMON_FIELDS) + sorted(kind.fields())
    unknown = sorted(set(entry.keys()) - set(allowed))
    if unknown:
      raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)}: allowed "
                       f"{', '.join(allowed)}")
    every = entry.get("every", 0)
    if not isinstance(every, int) or every < 0:
      raise ValueError(f"{where}.every must be an integer >= 0, got {every!r}")
    kind.check(where, entry, config)
