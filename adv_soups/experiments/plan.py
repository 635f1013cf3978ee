"""Stage 1 of the adapter experiment: which runs, and their configs (all checked before anything
is written or compiled). A run is (train.mode, model.adapter, seed), trained in its own workdir
DIR/<mode>-<adapter>-seed<k>."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import ml_collections

from adv_soups import training
from adv_soups.attacks import registry
from adv_soups.models import ADAPTERS

SOUP_ALPHAS = tuple(round(i / 10, 10) for i in range(11))
DEFAULT_ADAPTERS = "token,norm"
DEFAULT_ATTACK = "apgd-ce,apgd-t"  # AutoAttack's white-box core; --attack=autoattack: the full
SINGLE_DOMAIN_MODES = ("clean", "adversarial")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the experiment: train.mode, model.adapter and seed."""
  mode: str
  adapter: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.mode}-{self.adapter}-seed{self.seed}"

  @property
  def has_soup(self) -> bool:
    return self.mode == "cotrain" and self.adapter != "none"


def parse_adapters(text: str) -> list[str]:
  """'token,norm' -> ['token', 'norm']; ValueError naming an unknown or repeated adapter."""
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  if not items:
    raise ValueError(f"--adapters={text!r} is empty: allowed a comma list of {', '.join(ADAPTERS)}")
  for item in items:
    if item not in ADAPTERS:
      raise ValueError(f"unknown adapter {item!r} in --adapters: allowed {', '.join(ADAPTERS)}")
  if len(set(items)) != len(items):
    raise ValueError(f"--adapters={text!r} names an adapter twice")
  return items


def plan_runs(adapters: Sequence[str], seeds: int) -> list[Run]:
  """The runs, seed by seed: clean-only, adversarial-only, then co-training per adapter."""
  if int(seeds) != seeds or seeds < 1:
    raise ValueError(f"--seeds={seeds} must be an integer >= 1")
  runs = []
  for seed in range(seeds):
    runs += [Run(mode, "none", seed) for mode in SINGLE_DOMAIN_MODES]
    runs += [Run("cotrain", adapter, seed) for adapter in adapters]
  return runs


def select_runs(runs: list[Run], only: str) -> list[Run]:
  """The runs named in `only` ('' = all); ValueError naming an unknown name and the allowed."""
  names = [t.strip() for t in str(only or "").split(",") if t.strip()]
  if not names:
    return list(runs)
  known = {r.name: r for r in runs}
  for n in names:
    if n not in known:
      raise ValueError(f"unknown run {n!r} in --only: allowed {', '.join(known)}")
  return [r for r in runs if r.name in names]


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The resolved config of `run`: `base` (same budget and data) with its seed, mode, adapter."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.seed = int(run.seed)
  config.train.mode = run.mode
  config.model.adapter = run.adapter
  config.model.num_domains = 2 if run.mode == "cotrain" else 1
  return training.resolve_config(config)


def check_experiment(base: ml_collections.ConfigDict, workdir: str, adapters: Sequence[str],
                     seeds: int, attack: str, steps: int | None, num_examples: int | None,
                     only: str = "") -> tuple[list[Run], list[Run], dict[str, Any]]:
  """Validates everything before anything is written or compiled: (all runs, selected runs,
  {run name: resolved config}). ValueError with one line naming the bad value."""
  runs = plan_runs(list(adapters), seeds)
  selected = select_runs(runs, only)
  names = registry.parse_suite(attack)
  if not names:
    raise ValueError(f"--attack={attack!r}: the experiment needs an attack; allowed "
                     f"{registry.allowed_text()}")
  for flag, value in (("steps", steps), ("num_examples", num_examples)):
    if value is not None and (int(value) != value or value < 1):
      raise ValueError(f"--{flag}={value} must be an integer >= 1")
  configs = {}
  for run in runs:
    configs[run.name] = run_config(base, run)
    training.prepare_workdir(configs[run.name], os.path.join(workdir, run.name), overwrite=False)
  return runs, selected, configs
