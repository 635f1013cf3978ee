"""The command line of every program that trains from a config file: `python -m adv_soups.train`,
the demo and the experiments share these flags and checks (none of them imports another's).

  define_flags(extra)            --config (+ --config.a.b=value overrides), --workdir, --overwrite,
                                 the multi-process start flags, and a program's own `extra`
  parse_command_line(argv, ...)  -> (resolved config, workdir); every problem is one line, exit 2
  train_parsed(config, workdir)  trains as the program does (exit 75 when preempted)
"""
from __future__ import annotations

import os
import sys
import traceback

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from adv_soups import cli, parallel, preemption, training
from adv_soups import data as data_lib
from adv_soups.cli import fail


def define_flags(extra: tuple = ()) -> flags.FlagValues:
  """A fresh absl FlagValues with the training program's flags (--config and its overrides,
  --workdir, --overwrite, the multi-process start flags of `parallel.DISTRIBUTED_FLAGS`) plus
  `extra` ((kind, name, default, help) tuples, e.g. the demo's or the experiment's). Importing
  this module (or `adv_soups.train`) defines no flags, so main() can run twice in one process."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).",
                                  flag_values=values, lock_config=False)
  flags.DEFINE_string("workdir", None, "Directory for config.json, checkpoints, metrics.",
                      flag_values=values)
  flags.DEFINE_bool("overwrite", False,
                    "Start afresh: move an existing run aside into WORKDIR/previous_runs/.",
                    flag_values=values)
  parallel.define_distributed_flags(values)
  for kind, name, default, help_text in extra:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=values)
  return values


def quiet_logging() -> None:
  """INFO logs from us and clu; only warnings from the chatty libraries (orbax, TFDS, TF)."""
  import logging as py_logging
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  noisy = ("orbax", "tensorflow_datasets", "tensorflow/", "etils")
  quiet = lambda r: r.levelno >= py_logging.WARNING or not any(n in r.pathname for n in noisy)
  for handler in py_logging.getLogger().handlers:
    handler.addFilter(quiet)


def fractions_to_numbers(argv: list[str]) -> list[str]:
  """`--config.attack.eps=4/255` -> `--config.attack.eps=0.01568...` (absl parses floats only)."""
  out = []
  for arg in argv:
    name, sep, value = arg.partition("=")
    if sep and name.startswith("--config.") and "/" in value and not name.endswith("data_dir"):
      try:
        value = repr(cli.parse_number(value, name))
      except ValueError:
        pass  # not a fraction (e.g. a path): let the flag parser judge it
    out.append(name + sep + value if sep else arg)
  return out


def parse_command_line(argv: list[str], flag_values: flags.FlagValues | None = None
                       ) -> tuple[ml_collections.ConfigDict, str]:
  """Flags (`flag_values`, default `define_flags()`) -> (resolved config, workdir). Starts the
  multi-process runtime (`parallel.initialize`) right after parsing, before anything asks JAX
  for devices. Every problem is one line and exit 2, before anything is written or compiled:
  unknown or malformed flags and overrides, a missing config file, bad values, a data set that is
  not prepared."""
  values = define_flags() if flag_values is None else flag_values
  argv = fractions_to_numbers(argv)
  saved_argv, sys.argv = sys.argv, argv  # config_flags reads --config.x overrides from sys.argv
  try:
    extra = values(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except Exception as e:  # a typo'd override (AttributeError), an unreadable config file (OSError)
    fail(f"{type(e).__name__}: {e}")
  finally:
    sys.argv = saved_argv
  if len(extra) > 1:
    fail(f"unexpected arguments {extra[1:]}")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging's own flags keep their defaults
  try:
    parallel.initialize_from_flags(values)
  except ValueError as e:
    fail(str(e))
  raw_config = values.config  # a lazy proxy: a missing file raises OSError on first use
  if raw_config is None or not values.workdir:
    fail("both --config=configs/NAME.py and --workdir=DIR are required")
  try:
    config = training.resolve_config(raw_config)
    data_lib.check_available(config.data)
  except (ValueError, OSError) as e:  # OSError: a missing config file or data set
    fail(" ".join(str(e).split()))
  return config, values.workdir


def main(argv: list[str] | None = None, flag_values: flags.FlagValues | None = None) -> None:
  """Parses flags (`flag_values`, default `define_flags()`), starts the multi-process runtime,
  validates the config (one line and exit 2 on bad input), then trains. A run stopped by SIGTERM
  exits with status 75 (`preemption.EXIT_PREEMPTED`) after one line saying where it stopped."""
  values = define_flags() if flag_values is None else flag_values
  config, workdir = parse_command_line(list(sys.argv if argv is None else argv), values)
  result = train_parsed(config, workdir, overwrite=values.overwrite)
  print(" ".join(f"{k}={v:.4f}" for k, v in sorted(result.eval_metrics.items())))


def train_parsed(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False):
  """Trains a config that `parse_command_line` returned, as the program does: checks the
  workdir (one line, exit 2), quiets the chatty loggers, trains, and on SIGTERM exits 75 after
  one line saying where it stopped. Returns the `training.TrainResult` of a finished run."""
  try:
    training.prepare_workdir(config, workdir, overwrite=overwrite)
  except ValueError as e:
    fail(str(e))
  quiet_logging()
  try:
    result = training.train_and_evaluate(config, workdir)
  except Exception:  # pylint: disable=broad-except
    if jax.process_count() > 1:  # exiting normally waits minutes in jax's shutdown barrier for
      traceback.print_exc()      # the others, which wait in a collective for us: fail now
      sys.stderr.flush()
      os._exit(1)
    raise
  if result.preempted_at is not None:
    preemption.exit_preempted(workdir, result.preempted_at, config.train.steps,
                              jax.process_index())
  return result


if __name__ == "__main__":
  main()
