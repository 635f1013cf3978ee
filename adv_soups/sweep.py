"""The adversarial-soup sweep: clean, robust and shifted accuracy along an alpha grid.

  python -m adv_soups.sweep --workdir=DIR [--alphas=0:1:11 | --alphas=0,0.25,1]
      [--attack=pgd|apgd-ce|autoattack|apgd-ce,apgd-t|none] [--eps=4/255] [--steps=N]
      [--dataset=NAME --split=SPLIT] [--shifts=imagenet_v2,imagenet_r,imagenet2012_corrupted]
      [--num_examples=N] [--batch_size=N] [--step=CKPT] [--extrapolate]
      [--select_alpha_on=NAME:SPLIT[:N]]

Writes WORKDIR/sweep/<name stating the settings>.{json,csv,png,npz} and prints a table. The soup
at alpha is the two-domain model called with mixing weights [1 - alpha, alpha], so the whole grid
runs in one pass and one compilation, and every soup is attacked in its own right (never through
the adversarial adapter); an attacked sweep still costs about one evaluation per alpha.
Single-domain workdirs (modes clean / adversarial) are evaluated as one row.
`--select_alpha_on=NAME:SPLIT[:N]` picks the alpha with the best accuracy on SPLIT[:N] (default N
1000) and scores it on SPLIT[N:]: the selection never sees the examples it is reported on.
A thin shell over `adv_soups.evaluation`; a relaunch of an interrupted sweep resumes it.

Soups over every domain of a run trained against several threats (`config.threats`; any run):

  python -m adv_soups.sweep --workdir=DIR --weights=simplex:0.1 | --weights=0.2,0.3,0.5;0,0,1
      [--extrapolate] [--select_on=union|clean|THREAT|NAME:SPLIT[:N]] [--attack=...]

evaluates each soup against each threat of the run (its own norm and eps) and their union
(`evaluation/threat_sweep.py`). A run with more than one threat sweeps `simplex:0.1` when neither
--weights nor --alphas is given.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from adv_soups import cli, parallel, threats
from adv_soups import workdir as workdir_lib
from adv_soups.evaluation import reports, requests, run, threat_sweep
from adv_soups.evaluation.requests import PRECISION_FLAG

DEFAULT_ALPHAS = "0:1:11"
DEFAULT_ATTACK = "pgd"


def plan_sweep(workdir: str, alphas: str | Sequence[float] | None = None,
               attack: str = DEFAULT_ATTACK, extrapolate: bool = False,
               select_alpha_on: str | None = None, **request_kwargs) -> requests.Request:
  """Checks every argument of `run_sweep` and restores the model; compiles and writes nothing.
  ValueError / FileNotFoundError with one line naming the bad value and what is allowed."""
  if alphas is None or isinstance(alphas, str):
    alphas = cli.parse_alphas(DEFAULT_ALPHAS if alphas is None else alphas, extrapolate)
  else:
    alphas = cli.parse_alphas(",".join(repr(float(a)) for a in alphas), extrapolate)
  return requests.make_request(workdir, attack=attack, alphas=alphas,
                               select_alpha_on=select_alpha_on, **request_kwargs)


def run_sweep(workdir: str, alphas: str | Sequence[float] | None = None,
              attack: str = DEFAULT_ATTACK, out_dir: str | None = None, progress: bool = True,
              write: bool = True, save_every: int = 32, checks: bool = True,
              **kwargs: Any) -> dict:
  """Clean / robust / shifted accuracy of the soups of `workdir` along `alphas` (one pass).

  Args:
    workdir: a training workdir (config.json + checkpoints), any etils.epath path.
    alphas: '0:1:11' (NUM evenly spaced, ends included), '0,0.5,1' or a list of floats; in [0, 1]
      unless `extrapolate=True`. Default 0:1:11.
    attack: a suite of `attacks.suites` ('pgd', 'apgd-ce', 'autoattack', 'apgd-ce,apgd-t',
      'none', ...).
    out_dir: default WORKDIR/sweep; write: write the report files there.
    checks: run AutoAttack's gradient-masking checks (warnings in the report) when attacking.
    kwargs: extrapolate, select_alpha_on ('NAME:SPLIT[:N]') and the `make_request` arguments
      (eps, norm, steps, square_queries, dataset, split, num_examples, batch_size, shifts, step,
      data_dir).
  Returns:
    the report (also <name>.json): settings, `results` (one row per alpha: clean_accuracy,
    robust_accuracy, robust_accuracy_after {attack: acc}, shifts {group: acc}), `selection`,
    `warnings`, `wall_time_s`, `files`.
  """
  request = plan_sweep(workdir, alphas, attack=attack, **kwargs)
  return run.run_request(request, kind="sweep", out_dir=out_dir, progress=progress, write=write,
                         chunk_batches=save_every, run_checks=checks)


def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.sweep`: checks everything (one line, exit 2 on bad input), then runs."""
  v = cli.define_flags(cli.EVAL_FLAGS + parallel.DISTRIBUTED_FLAGS + (
      ("string", "alphas", None,
       f"START:STOP:NUM (ends included) or a comma list (default {DEFAULT_ALPHAS})."),
      ("bool", "extrapolate", False, "Allow alphas outside [0, 1]."),
      ("string", "select_alpha_on", None,
       "NAME:SPLIT[:N]: choose alpha on SPLIT[:N] of NAME, report it on SPLIT[N:]."),
      ("string", "weights", None, "Soups over all domains (clean + each threat): simplex:STEP or "
       "vectors such as 0.2,0.3,0.5;0,0,1 (each summing to 1)."),
      ("string", "select_on", None, "With --weights: choose the soup by union, clean, a threat's "
       "name (on half the examples, reported on the other half) or NAME:SPLIT[:N] (a shift)."),
      PRECISION_FLAG,
  ))
  cli.parse_flags(argv, v)
  try:
    parallel.initialize_from_flags(v)  # first: before anything asks JAX for devices
  except ValueError as e:
    cli.fail(str(e))
  if not v.workdir:
    cli.fail("--workdir=DIR is required")
  kwargs = cli.request_kwargs(v)
  kwargs["precision"] = v.precision
  kwargs.setdefault("attack", DEFAULT_ATTACK)
  try:
    by_weights = _by_weights(v)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  if by_weights:
    try:
      sweep = threat_sweep.plan(v.workdir, v.weights, extrapolate=v.extrapolate,
                                select_on=v.select_on, **kwargs)
    except (ValueError, FileNotFoundError) as e:
      cli.fail(str(e))
    for note in sweep.notes if parallel.is_primary() else ():
      print(f"note: {note}", file=sys.stderr)
    report = threat_sweep.run(sweep, kind="sweep", out_dir=v.out_dir)
    if parallel.is_primary():
      print(threat_sweep.format_table(report))
    return
  try:
    request = plan_sweep(v.workdir, v.alphas, extrapolate=v.extrapolate,
                         select_alpha_on=v.select_alpha_on, **kwargs)
    run.check_memory(request)  # memory.DoesNotFit is a ValueError: one line, exit 2
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  primary = parallel.is_primary()  # one copy of the notes and the table on a multi-process run
  for note in request.notes if primary else ():
    print(f"note: {note}", file=sys.stderr)
  cli.start_screen(v, "sweep")
  report = run.run_request(request, kind="sweep", out_dir=v.out_dir, chunk_batches=v.save_every)
  if primary:
    print(reports.format_table(report))


def _by_weights(v) -> bool:
  """Whether the flags ask for a sweep over weights (--weights or --select_on, or a run with
  several threats and no --alphas); ValueError for flags of both kinds."""
  if v.alphas is not None and (v.weights is not None or v.select_on is not None):
    raise ValueError("--alphas (two domains) and --weights / --select_on (soups over every "
                     "domain) exclude each other: give one")
  if v.select_alpha_on is not None and (v.weights is not None or v.select_on is not None):
    raise ValueError("--select_alpha_on goes with --alphas; with --weights use --select_on")
  if v.weights is not None or v.select_on is not None:
    return True
  if v.alphas is not None or v.select_alpha_on is not None:
    return False
  return len(threats.normalise(workdir_lib.load_config(v.workdir))) > 1


if __name__ == "__main__":
  main()
