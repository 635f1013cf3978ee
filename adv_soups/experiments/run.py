"""Stage 2 of the adapter experiment: train and evaluate each selected run, resumably. A finished
run is not retrained (an unfinished one resumes from its checkpoint; a preempted one exits 75 with
the programs' one line, `preemption.exit_preempted`) and a finished report of the same settings is
read back instead of recomputed. Returns per-run records {name: {figures, trained_now, ...}}."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from adv_soups import disk_space, evaluation, preemption, soups, training
from adv_soups.experiments.plan import SOUP_ALPHAS, Run

TIMING_FILE = "experiment_timing.json"


def _read_json(path: str) -> Any:
  with epath.Path(path).open() as f:
    return json.load(f)


def _write_text(path: str, text: str) -> None:
  with epath.Path(path).open("w") as f:
    f.write(text)


def train_run(run: Run, config: ml_collections.ConfigDict, workdir: str) -> float | None:
  """Trains `run` in `workdir` unless it is finished; returns the training wall time in seconds
  (None when it was already finished). A preempted run exits with status 75 (run it again), a
  full disk with 74."""
  if preemption.is_finished(workdir):
    return None
  start = time.time()
  try:
    result = training.train_and_evaluate(config, workdir, show_progress=True)
  except disk_space.DiskFull as e:  # exit 74, not the preemption status: a relaunch would loop
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(disk_space.EXIT_DISK_FULL)
  if result.preempted_at is not None:
    preemption.exit_preempted(workdir, result.preempted_at, config.train.steps,
                              jax.process_index())
  seconds = time.time() - start
  if jax.process_index() == 0:
    _write_text(os.path.join(workdir, TIMING_FILE), json.dumps(dict(train_wall_s=seconds)))
  return seconds


def evaluate_run(run: Run, workdir: str, attack: str, steps: int | None,
                 num_examples: int | None, compute: bool = True) -> dict | None:
  """The run's figures: clean accuracy of domain 0, robust accuracy of the robust domain, the
  soup curve (co-trained adapters) and the parameter counts. A finished report of the same
  settings is read back; otherwise it is computed (None when `compute` is False)."""
  kind = "sweep" if run.has_soup else "eval"
  request = evaluation.make_request(
      workdir, attack=attack, steps=steps, num_examples=num_examples,
      alphas=list(SOUP_ALPHAS) if run.has_soup else None,
      domain=None if run.has_soup else 0)
  path = os.path.join(workdir, kind, request.name(kind) + ".json")
  reused = epath.Path(path).exists()
  if reused:
    report = _read_json(path)
  elif compute:
    report = evaluation.run_request(request, kind=kind, progress=False)
  else:
    return None
  rows = report["results"]
  clean_row = rows[0]  # alpha 0 = domain 0, or the single domain-0 column
  robust_row = rows[-1]  # alpha 1 = domain 1, or the same single column
  total, per_domain = soups.count_params(request.loaded.params)
  out = dict(
      clean_accuracy=clean_row["clean_accuracy"], robust_accuracy=robust_row["robust_accuracy"],
      robust_accuracy_after=robust_row.get("robust_accuracy_after", {}),
      robust_domain=(1 if run.has_soup else 0), clean_of_robust_domain=robust_row["clean_accuracy"],
      total_params=total, per_domain_params=per_domain,
      num_examples=report["num_examples"], attack=report["attack"]["description"],
      attack_names=report["attack"]["names"], eps=report["eps"], norm=report["norm"],
      checkpoint_step=report["checkpoint_step"], report=path, report_reused=reused,
      eval_wall_s=report.get("wall_time_s"))
  if run.has_soup:
    out["soup"] = [dict(alpha=r["alpha"], clean_accuracy=r["clean_accuracy"],
                        robust_accuracy=r["robust_accuracy"]) for r in rows]
  return out


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def run_selected(selected: Sequence[Run], configs: dict[str, ml_collections.ConfigDict],
                 workdir: str, attack: str, steps: int | None,
                 num_examples: int | None) -> dict[str, dict]:
  """Trains and evaluates `selected` (one line of progress each, with an ETA); returns
  {run name: {figures, trained_now}}."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  records: dict[str, dict] = {}
  durations: list[float] = []  # runs that did work in this invocation (for the ETA)
  for k, run in enumerate(selected, 1):
    t0 = time.time()
    run_dir = os.path.join(workdir, run.name)
    trained = train_run(run, configs[run.name], run_dir)
    figures = evaluate_run(run, run_dir, attack, steps, num_examples)
    if trained is not None or not figures["report_reused"]:
      durations.append(time.time() - t0)
    records[run.name] = dict(figures=figures, trained_now=trained is not None)
    left = len(selected) - k
    eta = _duration(left * np.mean(durations)) if durations else "0m00s" if not left else "?"
    what = (f"trained in {trained:.0f} s" if trained is not None else "already trained")
    what += ", report reused" if figures["report_reused"] else (
        f", evaluated in {figures['eval_wall_s']:.0f} s")
    print(f"[{k}/{len(selected)}] run {run.name} done ({what}): clean "
          f"{100 * figures['clean_accuracy']:.1f}%, robust {100 * figures['robust_accuracy']:.1f}%"
          f"; ETA {eta}", file=sys.stderr, flush=True)
  return records


def collect(runs: Sequence[Run], records: dict[str, dict], workdir: str, attack: str,
            steps: int | None, num_examples: int | None) -> dict[str, dict]:
  """`records` completed for every run: the runs another invocation finished are read back
  (never computed here), the others are pending; each record gets its name, mode, adapter, seed,
  workdir, status and training wall time. Returns the records in plan order."""
  records = dict(records)
  for run in runs:  # the others: collected when another invocation finished them
    if run.name in records:
      continue
    run_dir = os.path.join(workdir, run.name)
    figures = None
    if preemption.is_finished(run_dir):
      figures = evaluate_run(run, run_dir, attack, steps, num_examples, compute=False)
    records[run.name] = dict(figures=figures, trained_now=False)
  for run in runs:
    rec = records[run.name]
    rec.update(name=run.name, mode=run.mode, adapter=run.adapter, seed=run.seed,
               workdir=os.path.join(workdir, run.name),
               status="done" if rec["figures"] else "pending")
    timing = os.path.join(workdir, run.name, TIMING_FILE)
    rec["train_wall_s"] = (_read_json(timing)["train_wall_s"] if epath.Path(timing).exists()
                           else None)
  return {run.name: records[run.name] for run in runs}
