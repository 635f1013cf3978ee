"""Reports: the result of a request as a JSON-compatible dict, its text table, and its files.

A report has one row per column (a soup's alpha or a domain): clean accuracy, the robust
accuracy after each attack of the suite in turn, and the shifted accuracies; plus the settings,
the attacks that ran (named as such: a partial suite is never called AutoAttack), the
gradient-masking warnings, and the wall time. `one_model` flattens a one-column report into the
shape `python -m adv_soups.evaluate` prints and writes.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import numpy as np
import tensorflow as tf

from adv_soups.attacks import registry


def build(request, kind: str, main, shifts: dict, selection: dict | None, warnings: list[str],
          wall_time_s: float) -> dict:
  """The report of `request` from the engine's `main` result (a `ColumnResult`)."""
  loaded = request.loaded
  names = list(request.attacks)
  rows = []
  for a, label in enumerate(request.labels):
    row = dict(column=label, alpha=None if request.alphas is None else request.alphas[a],
               domain=np.asarray(request.columns)[a].tolist(),
               clean_accuracy=float(main.clean_correct[:, a].mean()))
    if names:
      row["robust_accuracy"] = float(main.robust[:, a].mean())
      row["robust_accuracy_after"] = {registry.display(n): float(main.accuracy_after(j)[a])
                                      for j, n in enumerate(names)}
    row["shifts"] = {g: e["mean"][a] for g, e in shifts.items()}
    rows.append(row)
  return dict(
      kind=kind, workdir=loaded.workdir, checkpoint_step=loaded.step,
      params_item=loaded.params_item,
      model=dict(adapter=loaded.config.model.get("adapter"), num_domains=loaded.num_domains,
                 mode=loaded.config.train.get("mode")),
      dataset=request.dataset, split=request.split, num_examples=main.num_examples,
      attack=dict(names=[registry.display(n) for n in names], attacks=main.attacks if names else [],
                  description=request.description,
                  suite=registry.suite_label(request.attacks, request.budgets),
                  budgets=request.budgets),
      precision=_precision(request),
      eps=request.eps, norm=request.norm, alphas=request.alphas, columns=request.labels,
      single_domain=loaded.num_domains == 1, notes=list(request.notes), results=rows,
      shifts=shifts, selection=selection, warnings=warnings, wall_time_s=wall_time_s)


def _precision(request) -> dict:
  """What the numbers were computed in: the model's compute dtype, the attacks' matmuls."""
  from adv_soups import loading
  configured = loading.compute_dtype(request.config)
  compute = configured if request.precision == "model" else "float32"
  return dict(request=request.precision, config_dtype=configured, compute_dtype=compute,
              matmul="highest")


def one_model(report: dict) -> dict:
  """A one-column report with that column's figures at the top level (the `evaluate` report):
  clean_accuracy, robust_accuracy, robust_accuracy_after, and shifts {group: {'mean', ...}};
  `format_table` still reads it."""
  row = report["results"][0]
  out = dict(report)
  out.update(model_label=row["column"], domain=row["domain"],
             clean_accuracy=row["clean_accuracy"],
             robust_accuracy=row.get("robust_accuracy"),
             robust_accuracy_after=row.get("robust_accuracy_after", {}))
  out["shifts"] = {
      g: dict(mean=e["mean"][0], datasets=len(e["per_dataset"]),
              per_dataset={k: v[0] for k, v in e["per_dataset"].items()},
              num_examples=e["num_examples"],
              **({"per_corruption": {k: v[0] for k, v in e["per_corruption"].items()}}
                 if "per_corruption" in e else {}))
      for g, e in report["shifts"].items()}
  return out


def _pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def _header(report: dict) -> list[str]:
  what = "Soup sweep" if report["kind"] == "sweep" else "Evaluation"
  lines = [f"{what} of {report['workdir']} (checkpoint step {report['checkpoint_step']}, "
           f"{report['params_item']}): {report['dataset']} {report['split']}, "
           f"{report['num_examples']} examples"]
  if report["attack"]["names"]:
    lines.append(f"Attack: {report['attack']['description']}, {report['norm']} "
                 f"eps={report['eps']:.6g}" + (" (each soup attacked in its own right)"
                                               if report["kind"] == "sweep" else ""))
  else:
    lines.append("Attack: none (clean accuracy only)")
  prec = report.get("precision")
  if prec and prec["compute_dtype"] != "float32":
    lines.append(f"Precision: the model computed in {prec['compute_dtype']} (as its config "
                 "asks, --precision=model), not float32")
  lines += [f"Note: {n}" for n in report["notes"]]
  lines += [f"Warning: {w}" for w in report.get("warnings", [])]
  return lines


def _columns(report: dict) -> list[tuple[str, Any]]:
  """(header, row -> text) for the table and the csv."""
  cols = [("alpha" if report["alphas"] is not None or report["single_domain"] else "model",
           lambda r: (r["column"] if r["alpha"] is None and not report["single_domain"]
                      else "-" if r["alpha"] is None else f"{r['alpha']:.3g}")),
          ("clean %", lambda r: _pct(r["clean_accuracy"]))]
  names = report["attack"]["names"]
  if names:
    for n in names[:-1]:
      cols.append((f"after {n} %", lambda r, n=n: _pct(r["robust_accuracy_after"][n])))
    cols.append(("robust %", lambda r: _pct(r["robust_accuracy"])))
  for group, entry in report["shifts"].items():
    label = group + (f" (mean of {len(entry['per_dataset'])})" if len(entry["per_dataset"]) > 1
                     else "")
    cols.append((f"{label} %", lambda r, g=group: _pct(r["shifts"][g])))
  return cols


def format_table(report: dict) -> str:
  """The report as a text table (accuracies in %), with a header naming the attacks that ran."""
  lines = _header(report)
  cols = _columns(report)
  cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in report["results"]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  for row in cells:
    lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
  sel = report.get("selection")
  if sel:
    h = sel["heldout_accuracy"]
    lines.append(
        f"Alpha selected on {sel['dataset']} {sel['selection_split']} ({sel['num_selection']} "
        f"examples): {sel['chosen_alpha']:.3g}; held-out {sel['heldout_split']} "
        f"({sel['num_heldout']} examples): {_pct(h['chosen'])}% at alpha="
        f"{sel['chosen_alpha']:.3g} vs {_pct(h['alpha_0'])}% at 0 (clean mode) and "
        f"{_pct(h['alpha_1'])}% at 1 (robust mode)")
  lines.append(f"Wall time {report['wall_time_s']:.1f} s")
  spent = [(registry.display(a["name"]), a.get("seconds"), a.get("rows_attacked"),
            a.get("compile_seconds"), a.get("rows_computed"))
           for a in report["attack"]["attacks"]]
  if spent and all(t is not None for _, t, *_ in spent):
    lines.append("Time per attack (rows attacked / computed with padding; compilation "
                 "separate): " + ", ".join(
                     f"{name} {t:.1f} s ({rows}/{computed}; +{c or 0:.1f} s compiling)"
                     for name, t, rows, c, computed in spent))
  if report.get("files"):
    lines.append(f"written to {report['files']['json']}")
  return "\n".join(lines)


def to_csv(report: dict) -> str:
  """One line per column: alpha/model, clean, robust after each attack, robust, shifts."""
  names = report["attack"]["names"]
  header = ["column", "alpha", "clean_accuracy"]
  if names:
    header += [f"robust_accuracy_after_{n}" for n in names] + ["robust_accuracy"]
  header += [f"shift_{g}" for g in report["shifts"]]
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(header)
  for r in report["results"]:
    row = [r["column"], "" if r["alpha"] is None else r["alpha"], r["clean_accuracy"]]
    if names:
      row += [r["robust_accuracy_after"][n] for n in names] + [r["robust_accuracy"]]
    row += [r["shifts"][g] for g in report["shifts"]]
    writer.writerow(row)
  return buf.getvalue()


def to_png(report: dict) -> bytes:
  """Accuracy against alpha, and the clean / robust trade-off (labels: alpha)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  rows = report["results"]
  alphas = [0.0 if r["alpha"] is None else r["alpha"] for r in rows]
  clean = [100 * r["clean_accuracy"] for r in rows]
  robust = [100 * r["robust_accuracy"] for r in rows] if report["attack"]["names"] else None
  fig, axes = plt.subplots(1, 2 if robust else 1, figsize=(11 if robust else 5.5, 4.2),
                           squeeze=False)
  ax = axes[0, 0]
  ax.plot(alphas, clean, "o-", label="clean")
  if robust:
    ax.plot(alphas, robust, "s-", label=f"robust ({report['attack']['description']})")
  for group in report["shifts"]:
    ax.plot(alphas, [100 * r["shifts"][group] for r in rows], "^--", label=group)
  ax.set_xlabel("alpha (0 = clean mode, 1 = robust mode)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{report['dataset']}, {report['norm']} eps={report['eps']:.4g}", fontsize=9)
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


def write(report: dict, main, out_dir: str, name: str, sweep: bool) -> dict[str, str]:
  """Writes `<name>.json` (for a one-column eval the flattened `one_model` report), the
  per-example results `<name>.npz` ([N, A] clean_correct and broken_by), and for a sweep
  `<name>.csv` and `<name>.png`, into `out_dir` (any tf.io.gfile path). Returns the paths."""
  tf.io.gfile.makedirs(out_dir)
  paths = {ext: os.path.join(out_dir, f"{name}.{ext}")
           for ext in (("json", "npz", "csv", "png") if sweep else ("json", "npz"))}
  report["files"] = paths
  body = report if sweep else one_model(report)
  contents: dict[str, Any] = {"json": json.dumps(body, indent=2)}
  buf = io.BytesIO()
  np.savez_compressed(buf, clean_correct=main.clean_correct, broken_by=main.broken_by)
  contents["npz"] = buf.getvalue()
  if sweep:
    contents.update(csv=to_csv(report), png=to_png(report))
  for ext, path in paths.items():
    binary = ext in ("png", "npz")
    with tf.io.gfile.GFile(path + ".tmp", "wb" if binary else "w") as f:
      f.write(contents[ext])
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
  return paths
