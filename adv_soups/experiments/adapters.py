"""The paper's adapter comparison and soup curves as one command, over seeds.

  python -m adv_soups.experiments.adapters --config=configs/digits.py --workdir=DIR \
      [--adapters=token,norm] [--seeds=2] [--attack=apgd-ce,apgd-t] [--steps=N] \
      [--num_examples=N] [--only=RUN[,RUN]] [--config.x=...]

For each seed k (config.seed = k, so every run of a seed sees the same data order) and the
config's budget (train.steps, train.batch_size), it trains, each in its own ordinary workdir
DIR/<mode>-<adapter>-seed<k> (so `sweep`, `evaluate` and `loading.load` work on it):

  clean-none-seed<k>         clean-only training (train.mode=clean), a single-domain model
  adversarial-none-seed<k>   adversarial-only training (train.mode=adversarial), single-domain
  cotrain-<adapter>-seed<k>  co-training with each --adapters entry (model.adapter); `none`
                             co-trains one shared model on clean and adversarial examples (no
                             domain-specific parameters, so no soup curve)

Every run is evaluated on the held-out split by the evaluation engine: clean accuracy of the
clean domain (domain 0), robust accuracy under the --attack suite of the robust domain (domain
1; domain 0 for single-domain runs and for the shared `none` model), and for each co-trained
adapter the 11-alpha soup curve (one sweep: alpha 0 is domain 0, alpha 1 is domain 1). Writes
DIR/results.json, DIR/results.md and DIR/adapters.png. A finished run is not retrained and a
finished report (named by its settings) is read back instead of recomputed; an unfinished run
resumes from its checkpoint; --only=NAME[,NAME] runs a subset (one cluster job per run).

The stages, each callable alone: `plan` (the runs and their checked configs), `run` (train and
evaluate, resumable), `aggregate` (the numbers), `render` (results.json, results.md, the plot).
This module is the command line and `run_experiment`, which chains them.
"""
from __future__ import annotations

import sys
import time
from typing import Sequence

import jax
import ml_collections

from adv_soups import cli
from adv_soups import training_cli
from adv_soups.experiments import aggregate as aggregate_lib
from adv_soups.experiments import render as render_lib
from adv_soups.experiments import run as run_lib
from adv_soups.experiments.plan import (DEFAULT_ADAPTERS, DEFAULT_ATTACK, check_experiment,
                                        parse_adapters)
from adv_soups.models import ADAPTERS

EXTRA_FLAGS = (
    ("string", "adapters", DEFAULT_ADAPTERS, f"Comma list of co-training adapters, of "
     f"{', '.join(ADAPTERS)} (none: one shared model co-trained on both domains)."),
    ("integer", "seeds", 2, "Seeds per run: config.seed = 0 .. N-1."),
    ("string", "attack", DEFAULT_ATTACK, "Evaluation suite: apgd-ce,apgd-t (white-box core), "
     "autoattack (standard AutoAttack), pgd, ... (see adv_soups.attacks.suites)."),
    ("integer", "steps", None, "Iterations per gradient attack (default: 100 for APGD)."),
    ("integer", "num_examples", None, "Attack the first N held-out examples (default: "
     "config.eval.num_examples, or all)."),
    ("string", "only", "", "Comma list of run names to train and evaluate in this invocation "
     "(e.g. cotrain-token-seed1); the others are only collected when finished."),
)


def run_experiment(base: ml_collections.ConfigDict, workdir: str, *,
                   adapters: Sequence[str] = ("token", "norm"), seeds: int = 2,
                   attack: str = DEFAULT_ATTACK, steps: int | None = None,
                   num_examples: int | None = None, only: str = "",
                   argv: Sequence[str] | None = None) -> dict:
  """The four stages (plan, run, aggregate, render; see the module docstring): trains and
  evaluates the experiment's runs and writes results.json, results.md and adapters.png into
  `workdir`; returns the results dict."""
  start = time.time()
  runs, selected, configs = check_experiment(base, workdir, adapters, seeds, attack, steps,
                                             num_examples, only)
  records = run_lib.run_selected(selected, configs, workdir, attack, steps, num_examples)
  records = run_lib.collect(runs, records, workdir, attack, steps, num_examples)
  results = aggregate_lib.aggregate(
      runs, records, next(iter(configs.values())), seeds=seeds, adapters=adapters, attack=attack,
      steps=steps, num_examples=num_examples, argv=argv, wall_time_s=time.time() - start)
  if jax.process_index() > 0:  # process 0 writes the outputs
    return results
  render_lib.write_outputs(workdir, results)
  print(f"wrote {workdir}/results.json, results.md, adapters.png "
        f"({run_lib._duration(time.time() - start)})", file=sys.stderr, flush=True)
  return results


def main(argv: list[str] | None = None) -> dict:
  """Parses the flags (one line and exit 2 on bad input, nothing written), then runs."""
  argv = list(sys.argv if argv is None else argv)
  values, workdir = training_cli.parse_experiment_command(argv, EXTRA_FLAGS)
  try:
    adapters = parse_adapters(values.adapters)
    base = values.config
    runs, _, _ = check_experiment(base, workdir, adapters, values.seeds, values.attack,
                                  values.steps, values.num_examples, values.only)
  except ValueError as e:
    cli.fail(str(e))
  return training_cli.run_experiment_locked(workdir, values.verbose, lambda: run_experiment(
      base, workdir, adapters=adapters, seeds=values.seeds, attack=values.attack,
      steps=values.steps, num_examples=values.num_examples, only=values.only, argv=argv[1:]))


if __name__ == "__main__":
  main()
