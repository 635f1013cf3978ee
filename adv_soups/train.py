"""Clean/adversarial co-training of a ViT with domain adapters (the paper's method).

  python -m adv_soups.train --config=configs/digits.py --workdir=workdirs/digits \
      [--config.train.steps=100 ...] [--overwrite]

Re-running the same command on an existing workdir resumes from its latest checkpoint. On SIGTERM
every process saves one checkpoint at the same step and the program exits with status 75 (resume
me); a finished run leaves WORKDIR/FINISHED. Multi-process runs start through
`parallel.initialize` (--coordinator_address / --num_processes / --process_id, ADV_SOUPS_* or
auto-detected; see launch/). This is the command line only: the library is `adv_soups.training`
(config, state, step, loop); the flags and checks it shares with the demo and the experiments are
`adv_soups.training_cli`.
"""
from __future__ import annotations

from adv_soups import training, training_cli


def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.train`: see `training_cli.main` (flags, checks, exit codes)."""
  training_cli.main(argv)


def __getattr__(name: str):
  """The library's names under their pre-`training/` path (`train.resolve_config`, ...), for
  code written before the split; new code imports `adv_soups.training`."""
  if name in training.__all__:
    return getattr(training, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
  main()
