"""Small command-line helpers shared by the programs (train, evaluate, sweep).

Bad input ends the program with one line `error: ...` on stderr and exit code 2, before any
compilation (absl alone would exit 1 on a flag error and print its usage).
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn, Sequence

from absl import flags

from adv_soups import compile_cache
from adv_soups.numbers import parse_alphas, parse_eps, parse_number  # noqa: F401 (re-exported)


def fail(message: str) -> NoReturn:
  """Prints `error: message` (one line) to stderr and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


HELP_ARGS = ("--help", "-help", "-h", "--helpfull", "--helpshort")


def exit_with_help_if_asked(argv: Sequence[str], flag_values: flags.FlagValues) -> None:
  """`--help` (or -h, --helpfull) anywhere in argv[1:]: prints the program's flags with their
  help and defaults to stdout and exits 0 (nothing else runs)."""
  if any(a in HELP_ARGS for a in list(argv)[1:]):
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = (f"python -m {spec.name}" if spec is not None and spec.name
               else os.path.basename(sys.argv[0] if sys.argv else "") or "program")
    try:
      print(f"usage: {program} [--flag=value ...]\n{flag_values.get_help()}", flush=True)
    except BrokenPipeError:  # `--help | head`: the reader left; no traceback
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)


def parse_flags(argv: Sequence[str] | None, flag_values: flags.FlagValues | None = None
                ) -> list[str]:
  """Parses absl flags (default: the global FLAGS) from `argv` (default sys.argv); a bad flag or
  an extra argument fails (exit 2); --help prints the flags (exit 0)."""
  argv = list(sys.argv if argv is None else argv)
  exit_with_help_if_asked(argv, flags.FLAGS if flag_values is None else flag_values)
  try:
    extra = (flags.FLAGS if flag_values is None else flag_values)(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if len(extra) > 1:
    fail(f"unexpected arguments {extra[1:]}")
  compile_cache.enable()  # after the flags: bad input writes nothing
  return extra


def define_flags(specs) -> flags.FlagValues:
  """A fresh absl FlagValues holding `specs` ((kind, name, default, help) tuples), so that a
  program's main() can run more than once in one process (tests)."""
  values = flags.FlagValues()
  for kind, name, default, help_text in specs:
    getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=values)
  return values


# The flags `evaluate` and `sweep` share: (kind, name, default, help).
EVAL_FLAGS = (
    ("string", "workdir", None, "Training workdir (config.json + checkpoints)."),
    ("string", "attack", None, "pgd, apgd-ce, apgd-dlr, apgd-t, fab-t, square, autoattack (the "
     "standard version: APGD-CE, APGD-T, FAB-T, Square; at --norm=l1 with AutoAttack's l_1 "
     "settings: APGD-CE 5 restarts, APGD-T 5 targets, both with the 3/2/1 eps schedule), "
     "autoattack-rand (the version for randomised defences, e.g. dropout at evaluation: APGD-CE "
     "and APGD-DLR with EOT, --eot_draws draws per gradient), none, or a comma list such as "
     "apgd-ce,apgd-t (AutoAttack's white-box core)."),
    ("string", "eps", None, "Attack radius in pixels, e.g. 0.1 or 4/255 (default: the config's; "
     "required with --norm=l1)."),
    ("string", "norm", None, "linf, l2 or l1 (default: config.attack.norm; l1: every attack but "
     "pgd)."),
    ("integer", "eot_draws", None, "Draws of the model's randomness per gradient for APGD-CE / "
     "APGD-DLR (EOT; >= 1; autoattack-rand's default 20)."),
    ("float", "eval_dropout", None, "Evaluate a randomised model: dropout at this rate (in "
     "(0, 1)) on at evaluation, drawn per example from its key (default off: training-time "
     "dropout is off in evaluation)."),
    ("integer", "steps", None, "Iterations of the gradient attacks (default: "
     "config.eval.attack_steps for PGD, 100 for APGD and FAB)."),
    ("integer", "square_queries", None, "Queries of the Square attack (default 5000)."),
    ("string", "dataset", None, "Dataset (default: the run's)."),
    ("string", "split", None, "Split (default: config.eval.split or the dataset's eval split)."),
    ("string", "shifts", "", "Comma-separated shifted datasets, e.g. imagenet_v2,imagenet_r,"
     "imagenet2012_corrupted (= the mean over its 75 corruption x severity sets)."),
    ("integer", "num_examples", None, "Examples per dataset (default: config.eval's, or all)."),
    ("integer", "batch_size", None, "Rows per compiled call (default: config.eval.batch_size)."),
    ("integer", "step", None, "Checkpoint step (default: the latest)."),
    ("string", "data_dir", None, "TFDS data_dir (default: the run's config.data.data_dir)."),
    ("string", "out_dir", None, "Where reports go (default: WORKDIR/eval or WORKDIR/sweep)."),
    ("integer", "save_every", 32, "Data batches per saved chunk of results (a relaunch of the "
     "same command resumes after the last saved chunk)."),
    ("bool", "verbose", False, "Also show the absl log on the screen (it always goes to "
     "OUT_DIR/<evaluate|sweep>.log)."),
)


def start_screen(values: flags.FlagValues, kind: str) -> None:
  """For `evaluate` / `sweep` (`kind`): TFDS's bars and banners off, the absl log to
  OUT_DIR/<kind>.log (OUT_DIR: --out_dir or WORKDIR/eval|sweep), on the screen only with
  --verbose. Call after the checks, before anything long."""
  from adv_soups import screen
  screen.quiet_libraries()
  out_dir = values.out_dir or os.path.join(values.workdir, "eval" if kind == "evaluate"
                                           else kind)
  import jax
  path = screen.log_path(out_dir, jax.process_index(), kind)
  if path is not None:
    os.makedirs(out_dir, exist_ok=True)
  screen.log_to_file(path, verbose=values.verbose)


def request_kwargs(values: flags.FlagValues) -> dict:
  """The `evaluation.make_request` keyword arguments of the EVAL_FLAGS in `values`."""
  names = ("attack", "eps", "norm", "steps", "square_queries", "dataset", "split", "shifts",
           "num_examples", "batch_size", "step", "data_dir", "eot_draws")
  out = {n: getattr(values, n) for n in names}
  out["dropout"] = values.eval_dropout
  if out["attack"] is None:
    del out["attack"]
  return out
