"""Clean, robust and distribution-shift accuracy of one model of a trained workdir.

  python -m adv_soups.evaluate --workdir=DIR (--alpha=A | --domain=D) [--attack=autoattack]
      [--eps=4/255] [--steps=N] [--shifts=imagenet_r,imagenet2012_corrupted] [--num_examples=N]
      [--step=CKPT] [--eps_grid=1/255,2/255,4/255]

`--attack=autoattack` (the default) is AutoAttack's standard version: APGD-CE, APGD-T, FAB-T and
Square, each on the points every earlier one failed on; `apgd-ce,apgd-t` is its white-box core.
The report (WORKDIR/eval/<name stating the settings>.json, per-example results beside it) names
the attacks that ran, the accuracy after each, and any gradient-masking warning. A relaunch of an
interrupted command resumes it. A thin shell over `adv_soups.evaluation`.
`--weights=0.2,0.3,0.5` evaluates that soup over every domain (clean + each threat of a run
trained with `config.threats`) against each threat and their union (`evaluation/threat_sweep.py`).
"""
from __future__ import annotations

from typing import Any

from adv_soups import cli, parallel
from adv_soups.evaluation import reports, requests, run, threat_sweep
from adv_soups.evaluation.requests import PRECISION_FLAG

DEFAULT_ATTACK = "autoattack"


def evaluate_one(workdir: str, *, alpha: float | str | None = None, domain: int | None = None,
                 attack: str = DEFAULT_ATTACK, out_dir: str | None = None,
                 progress: bool = True, write: bool = True, save_every: int = 32,
                 eps_grid: Any = None, **request_kwargs) -> dict:
  """The report of one model of `workdir`: the soup at `alpha` or domain `domain` (exactly one).

  `request_kwargs` go to `evaluation.make_request` (eps, norm, steps, square_queries, dataset,
  split, num_examples, batch_size, shifts, step, data_dir). `eps_grid` (values or a comma
  list): also the robust accuracy at each eps, with a warning when it rises with eps. Writes
  WORKDIR/eval/<name>.json unless `write` is False. ValueError / FileNotFoundError (one line)
  for a bad request, before anything is compiled or written.
  """
  request = plan_one(workdir, alpha=alpha, domain=domain, attack=attack, **request_kwargs)
  grid = parse_eps_grid(eps_grid, request.norm)
  return reports.one_model(run.run_request(request, kind="eval", out_dir=out_dir,
                                           progress=progress, write=write,
                                           chunk_batches=save_every, eps_grid=grid))


def plan_one(workdir: str, *, alpha=None, domain=None, attack: str = DEFAULT_ATTACK,
             **request_kwargs) -> requests.Request:
  """The validated request of `evaluate_one` (all checks, nothing compiled)."""
  if alpha is not None:
    alpha = cli.parse_number(alpha, "--alpha") if isinstance(alpha, str) else float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
      raise ValueError(f"--alpha={alpha} is outside [0, 1] (0 = clean mode, 1 = robust mode)")
  return requests.make_request(workdir, attack=attack, domain=domain,
                               alphas=None if alpha is None else [alpha], **request_kwargs)


def parse_eps_grid(text: Any, norm: str) -> list[float]:
  """'1/255,2/255,4/255' (or a list) -> sorted eps values; ValueError for a bad value."""
  if not text:
    return []
  items = text.split(",") if isinstance(text, str) else list(text)
  values = sorted({cli.parse_eps(str(v).strip(), norm) for v in items if str(v).strip()})
  if len(values) < 2:
    raise ValueError(f"--eps_grid={text}: give at least two eps values, e.g. 1/255,2/255,4/255")
  return values


def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.evaluate`: checks everything (one line, exit 2 on bad input), runs."""
  v = cli.define_flags(cli.EVAL_FLAGS + parallel.DISTRIBUTED_FLAGS + (
      ("string", "alpha", None, "Soup coefficient: 0 = clean mode, 1 = robust mode (e.g. 0.5)."),
      ("integer", "domain", None, "Domain id instead of --alpha (0 = clean, 1 = adversarial)."),
      ("string", "eps_grid", None, "Opt-in check: robust accuracy at each of these eps (comma "
       "list); warns when it rises with eps."),
      ("string", "weights", None, "One soup over all domains, e.g. 0.2,0.3,0.5 (summing to 1), "
       "evaluated against each threat of the run and their union."),
      ("bool", "extrapolate", False, "Allow --weights outside [0, 1] (an affine soup)."),
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
  if v.weights is not None:
    try:
      if v.alpha is not None or v.domain is not None or v.eps_grid:
        raise ValueError("--weights names the soup: leave out --alpha, --domain and --eps_grid")
      sweep = threat_sweep.plan(v.workdir, v.weights, extrapolate=v.extrapolate, **kwargs)
      if len(sweep.weights) != 1:
        raise ValueError(f"--weights={v.weights} names {len(sweep.weights)} soups; evaluate takes "
                         "one (sweep takes a grid)")
    except (ValueError, FileNotFoundError) as e:
      cli.fail(str(e))
    report = threat_sweep.run(sweep, kind="eval", out_dir=v.out_dir)
    if parallel.is_primary():
      print(threat_sweep.format_table(report))
    return
  try:
    request = plan_one(v.workdir, alpha=v.alpha, domain=v.domain, **kwargs)
    grid = parse_eps_grid(v.eps_grid, request.norm)
    run.check_memory(request)  # memory.DoesNotFit is a ValueError: one line, exit 2
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  cli.start_screen(v, "evaluate")
  report = run.run_request(request, kind="eval", out_dir=v.out_dir, chunk_batches=v.save_every,
                           eps_grid=grid)
  if parallel.is_primary():  # one copy of the table on a multi-process run
    print(reports.format_table(report))
    if grid:
      print(run.format_eps_grid(report["eps_grid"]))


if __name__ == "__main__":
  main()
