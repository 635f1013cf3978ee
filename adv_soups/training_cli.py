"""The command line of every program that trains from a config file: `python -m adv_soups.train`,
the demo and the experiments share these flags and checks (none of them imports another's).

  define_flags(extra)            --config (+ --config.a.b=value overrides), --workdir, --overwrite,
                                 the multi-process start flags, and a program's own `extra`
  parse_command_line(argv, ...)  -> (resolved config, workdir); every problem is one line, exit 2
  train_parsed(config, workdir)  trains as the program does: the workdir's lock (exit 75 when
                                 busy), the log in WORKDIR/train.log, a progress bar, exit 74 on
                                 a full disk, 75 when preempted
"""
from __future__ import annotations

import os
import sys
import traceback

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from adv_soups import compile_cache, disk_space, memory, parallel, preemption, screen, training
from adv_soups import host_devices, workdir_lock
from adv_soups import checkpoints as ckpt_lib
from adv_soups import data as data_lib
from adv_soups import cli
from adv_soups.cli import fail
from adv_soups.numbers import fractions_to_numbers


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
  flags.DEFINE_bool("verbose", False, "Also show the absl log on the screen (it always goes to "
                    "WORKDIR/train.log).", flag_values=values)
  parallel.define_distributed_flags(values)
  for kind, name, default, help_text in extra:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=values)
  return values




def parse_command_line(argv: list[str], flag_values: flags.FlagValues | None = None
                       ) -> tuple[ml_collections.ConfigDict, str]:
  """Flags (`flag_values`, default `define_flags()`) -> (resolved config, workdir). Starts the
  multi-process runtime (`parallel.initialize`) right after parsing, before anything asks JAX
  for devices. Every problem is one line and exit 2, before anything is written or compiled:
  unknown or malformed flags and overrides, a missing config file, bad values, a data set that is
  not prepared."""
  values = define_flags() if flag_values is None else flag_values
  screen.quiet_libraries()  # before TFDS prepares anything
  argv = fractions_to_numbers(argv)
  cli.exit_with_help_if_asked(argv, values)
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
  compile_cache.enable()  # after the flags: bad input writes nothing
  try:
    parallel.initialize_from_flags(values)
  except ValueError as e:
    fail(str(e))
  raw_config = values.config  # a lazy proxy: a missing file raises OSError on first use
  if raw_config is None or not values.workdir:
    fail("both --config=configs/NAME.py and --workdir=DIR are required")
  try:
    split_cpu_for(raw_config)  # before resolve_config asks JAX for its devices
    config = training.resolve_config(raw_config)
    data_lib.check_available(config.data)
  except (ValueError, OSError) as e:  # OSError: a missing config file or data set
    fail(" ".join(str(e).split()))
  return config, values.workdir


def split_cpu_for(raw_config: ml_collections.ConfigDict) -> int:
  """`host_devices.split_for_training` for the config's train batch (in pairs with mixup): on a
  CPU-only host, k CPU devices instead of one (the standard step ~12% faster on 2 cores).
  Returns k (1: jax left alone)."""
  from adv_soups.data import mixup as mixup_lib
  try:
    batch_size = raw_config.train.get("batch_size")
    pairs = mixup_lib.enabled(raw_config.get("data", {}).get("mixup"))
  except (AttributeError, TypeError):  # a malformed config: resolve_config says what is wrong
    return 1
  return host_devices.split_for_training(batch_size, multiple=2 if pairs else 1)


def main(argv: list[str] | None = None, flag_values: flags.FlagValues | None = None) -> None:
  """Parses flags (`flag_values`, default `define_flags()`), starts the multi-process runtime,
  validates the config (one line and exit 2 on bad input), then trains. A run stopped by SIGTERM
  exits with status 75 (`preemption.EXIT_PREEMPTED`) after one line saying where it stopped."""
  values = define_flags() if flag_values is None else flag_values
  config, workdir = parse_command_line(list(sys.argv if argv is None else argv), values)
  result = train_parsed(config, workdir, overwrite=values.overwrite, verbose=values.verbose)
  print(" ".join(f"{k}={v:.4f}" for k, v in sorted(result.eval_metrics.items())))


def train_parsed(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False,
                 verbose: bool = False):
  """Trains a config that `parse_command_line` returned, as the program does. In order: takes
  the workdir's lock (`hold_workdir`: exit 75 when another run holds it, nothing written); checks
  the workdir (one line, exit 2) and its free space (one line, exit 74); removes partial saves a
  crash left; compiles the programs and checks they fit the device's memory (one line, exit 2,
  `memory.DoesNotFit`); sends the absl log to WORKDIR/train.log (the screen too with `verbose`);
  trains with a progress bar; exits 74 with one line when a save fails for lack of space, 75 after one line
  on SIGTERM. Returns the `training.TrainResult` of a finished run; the lock is released on return
  and on every exit."""
  lock = hold_workdir(workdir)
  try:
    try:
      training.prepare_workdir(config, workdir, overwrite=overwrite)
    except ValueError as e:
      fail(str(e))
    check_room(config, workdir)
    if jax.process_index() == 0:  # the lock holder: what an earlier crash left half written
      disk_space.remove_partial_saves(ckpt_lib.checkpoint_dir(workdir))
    def start_log():  # after the memory check: a refused run leaves no log behind
      screen.log_to_file(screen.log_path(workdir, jax.process_index()), verbose=verbose)
    try:
      result = training.train_and_evaluate(config, workdir, show_progress=True,
                                           on_checked=start_log)
    except memory.DoesNotFit as e:  # refused before the first step, nothing written
      fail(str(e))
    except disk_space.DiskFull as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(disk_space.EXIT_DISK_FULL)
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
  finally:
    if lock is not None:
      lock.release()


def parse_experiment_command(argv: list[str], extra_flags: tuple):
  """An experiment program's flags: the training flags plus `extra_flags`, parsed (one line and
  exit 2 on bad input); `--overwrite` is refused (an experiment resumes in place). Returns
  (flag values, workdir)."""
  values = define_flags(extra_flags)
  _, workdir = parse_command_line(argv, values)
  if values.overwrite:
    fail("--overwrite is not supported by the experiment: use a new --workdir")
  return values, workdir


def run_experiment_locked(workdir: str, verbose: bool, run):
  """`run()` as the experiment programs run it: one experiment per directory (`hold_workdir`:
  exit 75 when another holds it), the absl log to WORKDIR/train.log (the screen too with
  `verbose`); the lock is released however it ends. Returns what `run()` returns."""
  lock = hold_workdir(workdir)
  try:
    screen.log_to_file(screen.log_path(workdir, jax.process_index()), verbose=verbose)
    return run()
  finally:
    if lock is not None:
      lock.release()


def hold_workdir(workdir: str) -> workdir_lock.WorkdirLock | None:
  """Takes `workdir`'s lock (process 0 decides for all, `workdir_lock.acquire_all`); prints one
  line when it takes over a stale one. Another live holder: one line naming it, exit 75 (busy,
  retry later), nothing written. Returns the lock on process 0, None elsewhere."""
  try:
    lock, note = workdir_lock.acquire_all(workdir)
  except workdir_lock.WorkdirBusy as e:
    if jax.process_index() == 0:
      print(f"busy: {e}", file=sys.stderr, flush=True)
    sys.exit(workdir_lock.EXIT_BUSY)
  if note:
    print(note, file=sys.stderr, flush=True)
  return lock


def checkpoint_bytes(config: ml_collections.ConfigDict, workdir: str) -> int:
  """About what one checkpoint of `config` needs on disk (bytes): the newest saved step with
  its input-pipeline state where one exists, else the parameters x 3 (AdamW's two moments;
  x 4 with EMA)."""
  from adv_soups.models import create_model, init_params
  model = create_model(config.model)
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0), config.model.channels))
  copies = 3 + (1 if config.optimizer.get("ema_decay") else 0)
  estimate = copies * disk_space.tree_bytes(params)
  return max(estimate, disk_space.saved_step_bytes(ckpt_lib.checkpoint_dir(workdir),
                                                   os.path.join(workdir, "data_state")))


def check_room(config: ml_collections.ConfigDict, workdir: str) -> None:
  """One line and exit 74 when the workdir's filesystem (on any process) has less free space
  than one checkpoint needs (`checkpoint_bytes`)."""
  message = None
  try:
    disk_space.check_room(workdir, checkpoint_bytes(config, workdir))
  except disk_space.DiskFull as e:
    message = str(e)
  if parallel.any_process(message is not None):
    if message:
      print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(disk_space.EXIT_DISK_FULL)


if __name__ == "__main__":
  main()
