"""Soups across threat models as one command: specialists against each threat, one model
co-trained against all of them, its soups, and robustness to each threat and to their union.

  python -m adv_soups.experiments.threats --config=configs/digits_threats.py --workdir=DIR \
      [--seeds=2] [--attack=apgd-ce] [--steps=N] [--num_examples=N] [--weights=simplex:0.2] \
      [--only=RUN[,RUN]] [--config.x=...]

The config lists the threats (`config.threats`, e.g. l_inf and l_2). For each seed k
(config.seed = k: every run of a seed sees the same data order) it trains, each in its own
ordinary workdir DIR/<run>-seed<k> (so `sweep`, `evaluate` and `loading.load` work on it):

  clean-seed<k>           clean-only training (train.mode=clean), a single-domain model
  <threat>-seed<k>        co-training against that threat alone (domains: clean, threat)
  all-seed<k>             co-training against every threat (domains: clean, threat 1, ...)

Every run is evaluated against every threat of the config (its own norm and eps, the --attack
suite) and their union (an example counts only if it resists every threat), soup by soup
(`--weights` over the run's domains; a single-domain run is one model). The held-out examples
are split in two halves: the soup of each co-trained run is *selected* by union robustness on
the first half, and every figure of the table is measured on the second half, so the selection
never sees the examples it is scored on. Rows: the clean-only model; each run's domains (a
specialist's robust mode is its threat's domain); each co-trained run's selected soup.
Writes DIR/results.json and DIR/results.md (mean +- sample std over seeds); the simplex plot of
each three-domain run is in its workdir's sweep/ folder. A finished run is not retrained; an
unfinished one resumes; --only=NAME[,NAME] runs a subset.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from adv_soups import cli, threats as threats_lib, training, training_cli
from adv_soups.attacks import suites
from adv_soups.experiments import aggregate as aggregate_lib
from adv_soups.experiments import plan as plan_lib
from adv_soups.experiments import run as run_lib

DEFAULT_ATTACK = "apgd-ce"
DEFAULT_WEIGHTS = "simplex:0.2"
EXTRA_FLAGS = (
    ("integer", "seeds", 2, "Seeds per run: config.seed = 0 .. N-1."),
    ("string", "attack", DEFAULT_ATTACK, "Evaluation suite per threat: apgd-ce (default), "
     "apgd-ce,apgd-t, autoattack, pgd, ... (see adv_soups.attacks)."),
    ("integer", "steps", None, "Iterations per gradient attack (default: the suite's own)."),
    ("integer", "num_examples", None, "Held-out examples (default: config.eval.num_examples, or "
     "all); half select the soups, the other half are reported."),
    ("string", "weights", DEFAULT_WEIGHTS, "Soups of each co-trained run over its domains."),
    ("string", "only", "", "Comma list of run names to train and evaluate now (e.g. all-seed1)."),
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: `threats` () for clean-only, one name for a specialist, all for `all`."""
  label: str
  threats: tuple[str, ...]
  seed: int

  @property
  def name(self) -> str:
    return f"{self.label}-seed{self.seed}"


def plan_runs(threat_names: Sequence[str], seeds: int) -> list[Run]:
  """Seed by seed: clean-only, each threat alone, then all threats together."""
  if int(seeds) != seeds or seeds < 1:
    raise ValueError(f"--seeds={seeds} must be an integer >= 1")
  if len(threat_names) < 2:
    raise ValueError(f"the config lists {len(threat_names)} threat(s) "
                     f"({', '.join(threat_names)}); the comparison needs at least 2 in "
                     "config.threats")
  runs = []
  for seed in range(seeds):
    runs.append(Run("clean", (), seed))
    runs += [Run(t, (t,), seed) for t in threat_names]
    runs.append(Run("all", tuple(threat_names), seed))
  return runs


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The resolved config of `run`: `base` (same budget and data) with its seed and threats."""
  all_threats = threats_lib.normalise(base)
  config = ml_collections.ConfigDict(base.to_dict())
  config.seed = int(run.seed)
  config.train.mode = "cotrain" if run.threats else "clean"
  kept = run.threats or tuple(all_threats)  # a clean-only run keeps them (nothing trains on them)
  config.threats = threats_lib.ordered({n: {k: v for k, v in all_threats[n].items()}
                                        for n in kept})
  config.model.num_domains = 1 + len(kept) if run.threats else 1
  domains = ",".join(("clean",) + run.threats) if run.threats else "clean"
  for entry in config.evals.values():
    entry.domains = domains
  return training.resolve_config(config)


def evaluate_run(run: Run, workdir: str, settings: dict[str, dict], *, attack: str,
                 steps: int | None, num_examples: int | None, weights: str,
                 compute: bool = True) -> dict | None:
  """The run's rows: accuracies on the reported half (clean, each threat, union) of each domain
  and, for co-trained runs, of the soup selected by union robustness on the other half. A
  finished report of the same settings is read back (None when missing and not `compute`)."""
  from adv_soups.evaluation import threat_sweep, union
  domains = 1 + len(run.threats) if run.threats else 1
  corners = np.eye(domains)
  grid = weights if run.threats else None
  plan = threat_sweep.plan(workdir, grid, attack=attack, steps=steps, num_examples=num_examples,
                           threat_settings=settings, select_on="union" if run.threats else None)
  if run.threats:  # make sure every corner (each domain alone) is on the grid
    missing = [c for c in corners if not any(np.allclose(c, w) for w in plan.weights)]
    if missing:
      plan = threat_sweep.plan(workdir, np.concatenate([plan.weights, missing]), attack=attack,
                               steps=steps, num_examples=num_examples, threat_settings=settings,
                               select_on="union")
  name = plan.name("sweep")
  path = os.path.join(workdir, "sweep", name + ".json")
  npz = os.path.join(workdir, "sweep", name + ".npz")
  if epath.Path(path).exists() and epath.Path(npz).exists():
    with epath.Path(path).open() as f:
      report = json.load(f)
    reused = True
  elif compute:
    report = threat_sweep.run(plan, kind="sweep")
    reused = False
  else:
    return None
  with epath.Path(npz).open("rb") as f:
    saved = np.load(f)
    clean = saved["clean_correct"]
    robust = {t: saved[f"robust_{t}"] for t in settings}
  heldout = union.first_half(len(clean))
  reported = union.accuracies(clean, robust, ~heldout)
  labels = ["clean"] + list(run.threats) if run.threats else ["model"]
  rows = {}
  for d, label in enumerate(labels):
    index = next(i for i, w in enumerate(plan.weights) if np.allclose(w, corners[d]))
    rows[f"domain {label}"] = {k: float(v[index]) for k, v in reported.items()}
  if run.threats:
    sel = report["selection"]
    rows["selected soup"] = dict(sel["reported"], weights=sel["column"])
  return dict(rows=rows, report=path, report_reused=reused, num_examples=int(len(clean)),
              reported_examples=int((~heldout).sum()), attack=report["attack"]["description"],
              eval_wall_s=report.get("wall_time_s"))


def summarize(runs: list[Run], records: dict[str, dict], threat_names: list[str]) -> list[dict]:
  """Rows per (run label, row), in plan order: mean and std over seeds of clean, each threat
  and union accuracy, and each seed's selected soup."""
  keys = ["clean"] + list(threat_names) + ["union"]
  groups: dict[tuple[str, str], list[dict]] = {}
  for run in runs:
    figures = records.get(run.name, {}).get("figures")
    if not figures:
      continue
    for row_name, values in figures["rows"].items():
      groups.setdefault((run.label, row_name), []).append(values)
  out = []
  for (label, row_name), values in groups.items():
    row = dict(run=label, row=row_name, seeds=len(values))
    for k in keys:
      row[k + "_mean"], row[k + "_std"] = aggregate_lib._mean_std([v[k] for v in values])
    if row_name == "selected soup":
      row["weights"] = [v["weights"] for v in values]
    out.append(row)
  return out


def best_union(summary: list[dict]) -> dict:
  """The best specialist (a single-threat run's domain or soup) and the best row of the
  all-threat run, by mean union accuracy."""
  specialists = [r for r in summary if r["run"] not in ("clean", "all")]
  together = [r for r in summary if r["run"] == "all"]
  pick = lambda rows: max(rows, key=lambda r: r["union_mean"]) if rows else None
  return dict(best_specialist=pick(specialists), best_all=pick(together))


def format_markdown(summary: list[dict], settings: dict) -> str:
  """results.md: the table over seeds and the union comparison."""
  names = settings["threat_names"]
  pct = lambda r, k: f"{100 * r[k + '_mean']:.1f} +- {100 * r[k + '_std']:.1f}"
  lines = [f"# Soups across threats: {settings['dataset']}, {settings['train_steps']} steps of "
           f"{settings['batch_size']}, seeds 0..{settings['seeds'] - 1}", "",
           f"Threats: " + ", ".join(f"{n} ({t['norm']}, eps {t['eps']:g})"
                                    for n, t in settings["threats"].items())
           + f". Attack per threat: {settings['attack']}. Figures on {settings['reported_text']}"
           " (the other half selects each co-trained run's soup by union robustness). Mean +- "
           "sample std over seeds.", "",
           "| run | model | clean % | " + " | ".join(f"{n} %" for n in names) + " | union % | n |",
           "| --- | --- | ---: |" + " ---: |" * len(names) + " ---: | ---: |"]
  for r in summary:
    lines.append(f"| {r['run']} | {r['row']} | {pct(r, 'clean')} | "
                 + " | ".join(pct(r, n) for n in names) + f" | {pct(r, 'union')} | {r['seeds']} |")
  best = best_union(summary)
  if best["best_specialist"] and best["best_all"]:
    s, a = best["best_specialist"], best["best_all"]
    lines += ["", f"Union robustness: best of the all-threat run ({a['row']}) "
              f"{pct(a, 'union')}% vs the best specialist ({s['run']}, {s['row']}) "
              f"{pct(s, 'union')}%."]
  return "\n".join(lines) + "\n"


def check_experiment(base: ml_collections.ConfigDict, workdir: str, seeds: int, attack: str,
                     steps: int | None, num_examples: int | None, weights: str, only: str = ""
                     ) -> tuple[list[Run], list[Run], dict[str, Any]]:
  """Validates everything before anything is written or compiled: (all runs, selected runs,
  {run name: resolved config}). ValueError with one line naming the bad value."""
  from adv_soups import soup_weights
  names = threats_lib.names(base)
  runs = plan_runs(names, seeds)
  selected = plan_lib.select_runs(runs, only)
  if not suites.parse_suite(attack):
    raise ValueError(f"--attack={attack!r}: the experiment needs an attack")
  for flag, value in (("steps", steps), ("num_examples", num_examples)):
    if value is not None and (int(value) != value or value < 2):
      raise ValueError(f"--{flag}={value} must be an integer >= 2")
  for count in {2, 1 + len(names)}:
    soup_weights.parse_weights(weights, count)
  configs = {}
  for run in runs:
    configs[run.name] = run_config(base, run)
    training.prepare_workdir(configs[run.name], os.path.join(workdir, run.name), overwrite=False)
  return runs, selected, configs


def run_experiment(base: ml_collections.ConfigDict, workdir: str, *, seeds: int = 2,
                   attack: str = DEFAULT_ATTACK, steps: int | None = None,
                   num_examples: int | None = None, weights: str = DEFAULT_WEIGHTS,
                   only: str = "", argv: Sequence[str] | None = None) -> dict:
  """Trains and evaluates the runs (see the module docstring); writes results.json and
  results.md into `workdir`; returns the results dict."""
  start = time.time()
  runs, selected, configs = check_experiment(base, workdir, seeds, attack, steps, num_examples,
                                             weights, only)
  settings_by_threat = {n: dict(norm=t["norm"], eps=t["eps"])
                        for n, t in threats_lib.normalise(base).items()}
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  records: dict[str, dict] = {}
  for k, run in enumerate(runs, 1):
    run_dir = os.path.join(workdir, run.name)
    now = run in selected
    trained = run_lib.train_run(run, configs[run.name], run_dir) if now else None
    from adv_soups import preemption
    figures = None
    if now or preemption.is_finished(run_dir):
      figures = evaluate_run(run, run_dir, settings_by_threat, attack=attack, steps=steps,
                             num_examples=num_examples, weights=weights, compute=now)
    records[run.name] = dict(name=run.name, label=run.label, threats=list(run.threats),
                             seed=run.seed, workdir=run_dir, figures=figures,
                             status="done" if figures else "pending")
    timing = os.path.join(run_dir, run_lib.TIMING_FILE)
    records[run.name]["train_wall_s"] = (run_lib._read_json(timing)["train_wall_s"]
                                         if epath.Path(timing).exists() else None)
    if now and figures:
      union_text = ", ".join(f"{row} union {100 * v['union']:.1f}%"
                             for row, v in figures["rows"].items())
      print(f"[{k}/{len(runs)}] {run.name}: {union_text}", file=sys.stderr, flush=True)
  summary = summarize(runs, records, list(settings_by_threat))
  done = [r["figures"] for r in records.values() if r["figures"]]
  first = next(iter(configs.values()))
  reported = sorted({f["reported_examples"] for f in done})
  settings = dict(
      dataset=first.data.name, train_steps=int(first.train.steps),
      batch_size=int(first.train.batch_size), seeds=int(seeds), attack=(done[0]["attack"] if done
                                                                          else attack),
      attack_flag=attack, attack_steps=steps, weights=weights, threats=settings_by_threat,
      threat_names=list(settings_by_threat), num_examples_flag=num_examples,
      reported_text=(f"the second half of the held-out examples ({reported[0]})"
                     if len(reported) == 1 else f"the second halves {reported}"),
      argv=list(argv) if argv else None)
  results = dict(settings=settings, versions=aggregate_lib._versions(),
                 runs=[records[r.name] for r in runs], summary=summary,
                 union_comparison=best_union(summary), wall_time_s=time.time() - start,
                 train_wall_s_total=sum(r["train_wall_s"] or 0 for r in records.values()),
                 eval_wall_s_total=sum(f["eval_wall_s"] or 0 for f in done))
  if jax.process_index() > 0:
    return results
  run_lib._write_text(os.path.join(workdir, "results.json"),
                           json.dumps(results, indent=1) + "\n")
  run_lib._write_text(os.path.join(workdir, "results.md"),
                           format_markdown(summary, settings))
  print(f"wrote {workdir}/results.json, results.md ({run_lib._duration(time.time() - start)})",
        file=sys.stderr, flush=True)
  return results


def main(argv: list[str] | None = None) -> dict:
  """Parses the flags (one line and exit 2 on bad input, nothing written), then runs."""
  argv = list(sys.argv if argv is None else argv)
  values, workdir = training_cli.parse_experiment_command(argv, EXTRA_FLAGS)
  try:
    check_experiment(values.config, workdir, values.seeds, values.attack, values.steps,
                     values.num_examples, values.weights, values.only)
  except ValueError as e:
    cli.fail(str(e))
  return training_cli.run_experiment_locked(workdir, values.verbose, lambda: run_experiment(
      values.config, workdir, seeds=values.seeds, attack=values.attack, steps=values.steps,
      num_examples=values.num_examples, weights=values.weights, only=values.only,
      argv=argv[1:]))


if __name__ == "__main__":
  main()
