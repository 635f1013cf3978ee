"""Training as a library: the config (`config`), the train state and optimizer (`state`), the
train step (`step`) and the loop with its checkpoints (`loop`). `python -m adv_soups.train` is its
command line.

  from adv_soups import training
  config = training.resolve_config(my_config)       # every check; ValueError, one line
  result = training.train_and_evaluate(config, workdir)

Names are looked up lazily: `import adv_soups.training` (or its `config`) loads no TensorFlow;
the first use of a name from `state`, `step` or `loop` imports that module.
"""
from __future__ import annotations

import importlib

_NAMES = {
    "config": ("MODES", "OPTIMIZERS", "SCHEDULES", "NORMS", "CLEAN", "ADVERSARIAL",
               "ADAPTERS_REGEX", "HEAD_REGEX", "base_config", "eval_entry", "resolve_config",
               "adversarial_domain"),
    "state": ("TrainState", "weight_decay_mask", "trainable_mask", "stop_frozen_gradients",
              "learning_rate_schedule", "make_optimizer", "init_state"),
    "step": ("attack_schedule", "make_train_step"),
    "loop": ("TrainResult", "train_and_evaluate", "prepare_workdir", "save_checkpoint",
             "restore_checkpoint", "data_state_dir"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_WHERE) + sorted(_NAMES)


def __getattr__(name: str):
  if name in _NAMES:
    return importlib.import_module(f"{__name__}.{name}")
  if name not in _WHERE:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return __all__
