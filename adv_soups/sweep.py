"""The adversarial-soup sweep: clean, robust and shifted accuracy along an alpha grid.

  python -m adv_soups.sweep --workdir=DIR [--alphas=0:1:11 | --alphas=0,0.25,1]
      [--attack=pgd|apgd-ce|autoattack|none] [--eps=4/255] [--steps=N] [--dataset=NAME
      --split=SPLIT] [--shifts=imagenet_v2,imagenet_r,imagenet2012_corrupted] [--num_examples=N]
      [--batch_size=N] [--step=CKPT] [--extrapolate] [--select_alpha_on=NAME:SPLIT[:N]]

Writes DIR/sweep/sweep.csv, sweep.json and sweep.png and prints a table. The soup at alpha is
the two-domain model called with mixing weights [1 - alpha, alpha] (the adapters are affine in
their parameters), so the whole grid runs in one pass: every batch is expanded to (example x
alpha) rows, each with its own weights, and every row is attacked against its own soup (never the
adversarial adapter). One compilation serves every alpha; an attacked sweep still costs about one
single-alpha evaluation per alpha, since each soup has to be attacked in its own right.
Single-domain workdirs (modes clean / adversarial) have no alpha: they are evaluated as one row.

`--attack=autoattack` runs APGD-CE then APGD-T (AutoAttack's white-box core, not the full
AutoAttack). `--select_alpha_on=NAME:SPLIT[:N]` picks the alpha with the best accuracy on the first
N examples of that split (`SPLIT[:N]`, default N 1000) and scores it on the rest (`SPLIT[N:]`), so
the selection never sees the examples it is reported on.
"""
from __future__ import annotations

import os

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: no C++ INFO lines

import csv
import dataclasses
import io
import json
import sys
import time
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from adv_soups import cli
from adv_soups import data as data_lib
from adv_soups import evaluate
from adv_soups import soups

DEFAULT_ALPHAS = "0:1:11"
DEFAULT_SELECTION_EXAMPLES = 1000
SUBDIR = "sweep"


@dataclasses.dataclass
class Selection:
  """Alpha selection on a shift: choose on `dataset` split[:n], score on split[n:] (or
  split[n:n + num_heldout])."""
  dataset: str
  split: str
  n: int
  num_heldout: int | None = None

  @property
  def selection_split(self) -> str:
    return f"{self.split}[:{self.n}]"

  @property
  def heldout_split(self) -> str:
    end = "" if self.num_heldout is None else str(self.n + self.num_heldout)
    return f"{self.split}[{self.n}:{end}]"


def parse_selection(text: str) -> tuple[str, str, int]:
  """'NAME:SPLIT[:N]' -> (name, split, N); N defaults to 1000."""
  parts = str(text).split(":")
  if len(parts) not in (2, 3) or not all(parts[:2]):
    raise ValueError(f"malformed --select_alpha_on={text!r}: expected NAME:SPLIT[:N], e.g. "
                     "imagenet_r:test:1000")
  n = DEFAULT_SELECTION_EXAMPLES
  if len(parts) == 3:
    try:
      n = int(parts[2])
      if n < 1:
        raise ValueError
    except ValueError:
      raise ValueError(f"malformed --select_alpha_on={text!r}: N must be an integer >= 1") from None
  return parts[0], parts[1], n


@dataclasses.dataclass
class SweepPlan:
  """A validated sweep: the evaluation plan, the alphas (None: single-domain model) and more."""
  plan: evaluate.Plan
  alphas: list[float] | None
  selection: Selection | None
  out_dir: str
  notes: list[str]


def plan_sweep(workdir: str, alphas: str | Sequence[float] | None = None, attack: str = "pgd",
               eps: float | str | None = None, steps: int | None = None,
               num_examples: int | None = None, batch_size: int | None = None,
               shifts: Any = (), step: int | None = None, out_dir: str | None = None,
               dataset: str | None = None, split: str | None = None, norm: str | None = None,
               extrapolate: bool = False, select_alpha_on: str | None = None,
               data_dir: str | None = None) -> SweepPlan:
  """Checks every argument of `run_sweep` and restores the model; compiles and writes nothing.
  Raises ValueError / FileNotFoundError with one line naming the bad value and what is allowed."""
  explicit = alphas is not None
  if alphas is None or isinstance(alphas, str):
    alphas = cli.parse_alphas(DEFAULT_ALPHAS if alphas is None else alphas, extrapolate)
  else:
    alphas = cli.parse_alphas(",".join(repr(float(a)) for a in alphas), extrapolate)
  selection = parse_selection(select_alpha_on) if select_alpha_on else None
  plan = evaluate.make_plan(workdir, attack=attack, eps=eps, norm=norm, steps=steps,
                            dataset=dataset, split=split, num_examples=num_examples,
                            batch_size=batch_size, shifts=shifts, step=step, data_dir=data_dir)
  notes = []
  if plan.loaded.num_domains == 1:
    if selection:
      raise ValueError(f"--select_alpha_on: {workdir!r} holds a single-domain model "
                       f"(train.mode={plan.config.train.get('mode')!r}): there is no alpha to "
                       "select")
    notes.append(f"single-domain model (train.mode={plan.config.train.get('mode')!r}): no soups, "
                 "evaluated alpha-free as one row" + (" (--alphas ignored)" if explicit else ""))
    alphas = None
  sel = None
  if selection:
    name, sel_split, n = selection
    evaluate.check_dataset(name, plan.config)
    evaluate.probe(plan.data_dir, name, sel_split, plan.config.model.image_size)
    size = evaluate.split_size(name, sel_split, plan.data_dir)
    if size is not None and size <= n:
      raise ValueError(f"--select_alpha_on={select_alpha_on}: split {sel_split!r} of {name!r} has "
                       f"{size} examples, so none would be left to score after selecting on {n}")
    heldout = plan.num_examples
    if size is not None and (heldout is None or n + heldout > size):
      heldout = size - n  # TFDS rejects a slice past the split's end
    sel = Selection(name, sel_split, n, heldout)
  out_dir = out_dir or os.path.join(plan.loaded.workdir, SUBDIR)
  return SweepPlan(plan=plan, alphas=alphas, selection=sel, out_dir=out_dir, notes=notes)


def _domains(sweep: SweepPlan, alphas: Sequence[float] | None = None) -> np.ndarray:
  """Mixing weights [A, 2] of the alphas, or int zeros [1] for a single-domain model."""
  alphas = sweep.alphas if alphas is None else alphas
  if alphas is None:
    return np.zeros([1], np.int32)
  return np.asarray(soups.mix_weights(alphas))


def execute_sweep(sweep: SweepPlan, progress: bool = True, write: bool = True) -> dict:
  """Runs a planned sweep; returns the result dict (also written as sweep.json, sweep.csv and
  sweep.png under `sweep.out_dir` unless `write` is False)."""
  start = time.time()
  plan, loaded = sweep.plan, sweep.plan.loaded
  sel = sweep.selection
  columns = 1 if sweep.alphas is None else len(sweep.alphas)
  total = evaluate.total_batches(plan, columns)
  if sel and total is not None:
    extra = [plan.num_batches(sel.dataset, sel.selection_split, None, columns),
             plan.num_batches(sel.dataset, sel.heldout_split, None, 3)]  # chosen, 0, 1
    total = None if None in extra else total + sum(extra)
  bar = evaluate.Progress(total, enabled=progress, desc="sweep")
  try:
    grid = evaluate.run_evaluation(plan, _domains(sweep), progress=bar)
    selection = _select_alpha(sweep, bar) if sel else None
  finally:
    bar.close()
  names = evaluate.attack_names(plan.attack)
  rows = []
  for a in range(len(grid["clean_accuracy"])):
    row = dict(alpha=None if sweep.alphas is None else sweep.alphas[a],
               clean_accuracy=grid["clean_accuracy"][a])
    if grid["robust_accuracy"] is not None:
      row["robust_accuracy"] = grid["robust_accuracy"][a]
      row["robust_accuracy_after"] = {evaluate.pretty_attack(n): grid["accuracy_after"][n][a]
                                      for n in names}
    row["shifts"] = {g: e["mean"][a] for g, e in grid["shifts"].items()}
    rows.append(row)
  result = dict(
      workdir=loaded.workdir, checkpoint_step=loaded.step, params_item=loaded.params_item,
      model=dict(adapter=loaded.config.model.get("adapter"), num_domains=loaded.num_domains,
                 mode=loaded.config.train.get("mode")),
      dataset=plan.dataset, split=plan.split, num_examples=grid["num_examples"],
      attack=dict(requested=plan.attack, description=evaluate.describe_attack(plan.attack,
                                                                              plan.steps),
                  names=[evaluate.pretty_attack(n) for n in names], attacks=grid["attacks"]),
      eps=plan.eps, norm=plan.norm, steps=plan.steps, alphas=sweep.alphas,
      single_domain=sweep.alphas is None, notes=sweep.notes, results=rows,
      shifts={g: {k: v for k, v in e.items()} for g, e in grid["shifts"].items()},
      selection=selection, wall_time_s=time.time() - start)
  if write:
    write_outputs(result, sweep.out_dir)
  return result


def _select_alpha(sweep: SweepPlan, bar: evaluate.Progress) -> dict:
  """Chooses alpha on split[:n] of the selection dataset, scores chosen / 0 / 1 on split[n:]."""
  plan, sel = sweep.plan, sweep.selection
  model, params = plan.loaded.model, plan.loaded.params
  spec = data_lib.get_spec(sel.dataset)
  choose = evaluate.grid_clean_correct(
      model, params,
      bar.wrap(plan.batches(sel.dataset, sel.selection_split, columns=len(sweep.alphas)),
               sel.dataset),
      _domains(sweep), class_subset=spec.class_subset, batch_size=plan.batch_size)
  accuracy = choose.mean(0)
  best = int(np.argmax(accuracy))  # ties: the smallest alpha
  chosen = sweep.alphas[best]
  scored = sorted({chosen, 0.0, 1.0})
  held = evaluate.grid_clean_correct(
      model, params,
      bar.wrap(plan.batches(sel.dataset, sel.heldout_split, columns=len(scored)), sel.dataset),
      _domains(sweep, scored), class_subset=spec.class_subset, batch_size=plan.batch_size)
  held_acc = dict(zip(scored, held.mean(0).tolist()))
  return dict(dataset=sel.dataset, selection_split=sel.selection_split,
              heldout_split=sel.heldout_split, num_selection=int(choose.shape[0]),
              num_heldout=int(held.shape[0]), selection_accuracy=accuracy.tolist(),
              chosen_alpha=chosen, heldout_accuracy=dict(chosen=held_acc[chosen],
                                                         alpha_0=held_acc[0.0],
                                                         alpha_1=held_acc[1.0]))


# ------------------------------------------------------------------------------------------------
# Reports: table, csv, json, png.

def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def _columns(result: dict) -> list[tuple[str, Any]]:
  """(header, row -> value) for the table and the csv."""
  cols = [("alpha", lambda r: "-" if r["alpha"] is None else f"{r['alpha']:.3g}"),
          ("clean %", lambda r: _pct(r["clean_accuracy"]))]
  names = result["attack"]["names"]
  if names:
    if len(names) > 1:
      for i, n in enumerate(names[:-1]):
        cols.append((f"after {n} %", lambda r, n=n: _pct(r["robust_accuracy_after"][n])))
    cols.append(("robust %", lambda r: _pct(r["robust_accuracy"])))
  for group, entry in result["shifts"].items():
    label = group + (f" (mean of {len(entry['per_dataset'])})" if len(entry["per_dataset"]) > 1
                     else "")
    cols.append((f"{label} %", lambda r, g=group: _pct(r["shifts"][g])))
  return cols


def format_table(result: dict) -> str:
  """The sweep as a text table (accuracies in %), with a header naming the attacks that ran."""
  eps = result["eps"]
  lines = [f"Soup sweep of {result['workdir']} (checkpoint step {result['checkpoint_step']}, "
           f"{result['params_item']}): {result['dataset']} {result['split']}, "
           f"{result['num_examples']} examples",
           f"Attack: {result['attack']['description']}, {result['norm']} eps={eps:.6g}"
           + (" (each soup attacked in its own right)" if result["attack"]["names"] else "")]
  lines += [f"Note: {n}" for n in result["notes"]]
  cols = _columns(result)
  cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in result["results"]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  for row in cells:
    lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
  sel = result.get("selection")
  if sel:
    h = sel["heldout_accuracy"]
    lines.append(
        f"Alpha selected on {sel['dataset']} {sel['selection_split']} ({sel['num_selection']} "
        f"examples): {sel['chosen_alpha']:.3g}; held-out {sel['heldout_split']} "
        f"({sel['num_heldout']} examples): {_pct(h['chosen'])}% at alpha="
        f"{sel['chosen_alpha']:.3g} vs {_pct(h['alpha_0'])}% at 0 (clean mode) and "
        f"{_pct(h['alpha_1'])}% at 1 (robust mode)")
  lines.append(f"Wall time {result['wall_time_s']:.1f} s")
  return "\n".join(lines)


def _csv(result: dict) -> str:
  names = result["attack"]["names"]
  header = ["alpha", "clean_accuracy"]
  if names:
    header += [f"robust_accuracy_after_{n}" for n in names] + ["robust_accuracy"]
  header += [f"shift_{g}" for g in result["shifts"]]
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(header)
  for r in result["results"]:
    row = ["" if r["alpha"] is None else r["alpha"], r["clean_accuracy"]]
    if names:
      row += [r["robust_accuracy_after"][n] for n in names] + [r["robust_accuracy"]]
    row += [r["shifts"][g] for g in result["shifts"]]
    writer.writerow(row)
  return buf.getvalue()


def _png(result: dict) -> bytes:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  rows = result["results"]
  alphas = [0.0 if r["alpha"] is None else r["alpha"] for r in rows]
  clean = [100 * r["clean_accuracy"] for r in rows]
  robust = [100 * r["robust_accuracy"] for r in rows] if result["attack"]["names"] else None
  fig, axes = plt.subplots(1, 2 if robust else 1, figsize=(11 if robust else 5.5, 4.2),
                           squeeze=False)
  ax = axes[0, 0]
  ax.plot(alphas, clean, "o-", label="clean")
  if robust:
    ax.plot(alphas, robust, "s-", label=f"robust ({result['attack']['description']})")
  for group in result["shifts"]:
    ax.plot(alphas, [100 * r["shifts"][group] for r in rows], "^--", label=group)
  ax.set_xlabel("alpha (0 = clean mode, 1 = robust mode)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{result['dataset']}, {result['norm']} eps={result['eps']:.4g}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  if robust:
    ax = axes[0, 1]
    ax.plot(clean, robust, "o-")
    for a, x, y in zip(alphas, clean, robust):
      ax.annotate(f"{a:.2g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("trade-off (labels: alpha)")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  return buf.getvalue()


def write_outputs(result: dict, out_dir: str) -> dict[str, str]:
  """Writes sweep.json, sweep.csv and sweep.png into `out_dir` (any tf.io.gfile path)."""
  tf.io.gfile.makedirs(out_dir)
  paths = {ext: os.path.join(out_dir, f"sweep.{ext}") for ext in ("json", "csv", "png")}
  result["outputs"] = paths
  contents = {"json": json.dumps(result, indent=2), "csv": _csv(result), "png": _png(result)}
  for ext, path in paths.items():
    with tf.io.gfile.GFile(path, "wb" if ext == "png" else "w") as f:
      f.write(contents[ext])
  return paths


def run_sweep(workdir: str, alphas: str | Sequence[float] | None = None, attack: str = "pgd",
              eps: float | str | None = None, steps: int | None = None,
              num_examples: int | None = None, batch_size: int | None = None, shifts: Any = (),
              step: int | None = None, out_dir: str | None = None, progress: bool = True,
              write: bool = True, **kwargs) -> dict:
  """Clean / robust / shifted accuracy of the soups of `workdir` along `alphas` (one pass).

  Args:
    workdir: a training workdir (config.json + checkpoints), any tf.io.gfile path.
    alphas: '0:1:11' (NUM evenly spaced, ends included), '0,0.5,1' or a list of floats; in [0, 1]
      unless `extrapolate=True`. Default 0:1:11.
    attack: 'pgd' | 'apgd-ce' | 'autoattack' (APGD-CE + APGD-T) | 'none' (clean only).
    eps: pixel units, a float or '4/255' (default config.attack.eps); steps: attack iterations
      (default config.eval.attack_steps for PGD, 100 for APGD).
    num_examples / batch_size: per dataset (default config.eval's); shifts: names or a comma list
      (see `evaluate.parse_shifts`); step: checkpoint (default latest).
    out_dir: default `<workdir>/sweep`; write: write sweep.json / .csv / .png there.
    kwargs: dataset, split, norm, extrapolate, select_alpha_on ('NAME:SPLIT[:N]'), data_dir.
  Returns:
    the result dict (also sweep.json): settings, `results` (one row per alpha: clean_accuracy,
    robust_accuracy, robust_accuracy_after {attack: acc}, shifts {group: acc}), `selection`,
    `wall_time_s`.
  """
  sweep = plan_sweep(workdir, alphas, attack=attack, eps=eps, steps=steps,
                     num_examples=num_examples, batch_size=batch_size, shifts=shifts, step=step,
                     out_dir=out_dir, **kwargs)
  return execute_sweep(sweep, progress=progress, write=write)


def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.sweep`: checks everything (one line, exit 2 on bad input), then runs."""
  v = evaluate.define_flags(evaluate.COMMON_FLAGS + (
      ("string", "alphas", None,
       f"START:STOP:NUM (ends included) or a comma list (default {DEFAULT_ALPHAS})."),
      ("string", "attack", "pgd", f"One of {', '.join(evaluate.ATTACK_CHOICES)}; autoattack = "
       "APGD-CE + APGD-T (AutoAttack's white-box core)."),
      ("bool", "extrapolate", False, "Allow alphas outside [0, 1]."),
      ("string", "select_alpha_on", None,
       "NAME:SPLIT[:N]: choose alpha on SPLIT[:N] of NAME, report it on SPLIT[N:]."),
      ("string", "out_dir", None, "Where to write (default: WORKDIR/sweep)."),
  ))
  cli.parse_flags(argv, v)
  if not v.workdir:
    cli.fail("--workdir=DIR is required")
  try:
    sweep = plan_sweep(v.workdir, v.alphas, attack=v.attack, eps=v.eps, steps=v.steps,
                       num_examples=v.num_examples, batch_size=v.batch_size, shifts=v.shifts,
                       step=v.step, out_dir=v.out_dir, dataset=v.dataset, split=v.split,
                       norm=v.norm, extrapolate=v.extrapolate, select_alpha_on=v.select_alpha_on,
                       data_dir=v.data_dir)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  for note in sweep.notes:
    print(f"note: {note}", file=sys.stderr)
  result = execute_sweep(sweep)
  print(format_table(result))
  print(f"written to {sweep.out_dir}/sweep.{{json,csv,png}}")


if __name__ == "__main__":
  main()
