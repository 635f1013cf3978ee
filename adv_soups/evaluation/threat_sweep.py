"""Soups over every domain, each attacked under every threat of the run, and their union.

A workdir trained with `config.threats` has one domain per threat (0 = clean). Each soup is a
weight vector over all domains (`soup_weights`: `simplex:0.1`, explicit vectors, affine ones);
the model called with those mixing weights *is* the parameter-space soup, so the whole grid is
one set of columns of the evaluation engine: every soup is attacked in its own right, and one
compiled program serves every soup and every eps of a norm (eps is traced), i.e. one compilation
per (attack, norm). Each threat is evaluated with its own norm and eps and the requested suite;
an example is robust to the union only if it is robust to every threat (`union.py`).

`--select_on` picks one soup by a criterion on examples disjoint from those it is reported on:
'union', 'clean' or a threat's name (the evaluation set split in two halves: the first selects,
the second reports), or 'NAME:SPLIT[:N]' (clean accuracy on a shift's SPLIT[:N]; the chosen soup
is reported on SPLIT[N:], as `--select_alpha_on` does for two domains).
An old single-threat workdir (config.json without `threats`) is one threat named by its norm.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath

from adv_soups import soup_weights, threats as threats_lib
from adv_soups import workdir as workdir_lib
from adv_soups.evaluation import engine, requests, simplex_plot, union

DEFAULT_WEIGHTS = "simplex:0.1"


@dataclasses.dataclass
class ThreatSweep:
  """A checked threat sweep: one request per threat (sharing the restored model), the soups
  `weights` [S, D] and the selection, if any."""
  requests: dict[str, requests.Request]
  weights: np.ndarray
  select_on: str | None
  selection: requests.Selection | None
  notes: list[str]

  @property
  def first(self) -> requests.Request:
    return next(iter(self.requests.values()))

  def name(self, kind: str) -> str:
    """A file name stating the settings (data, suite, threats, soups, selection, step)."""
    r = self.first
    n = "all" if r.num_examples is None else str(r.num_examples)
    attack = "+".join(f"{a}{r.budgets[a]}" for a in r.attacks) if r.attacks else "clean"
    threat_text = "+".join(f"{t}-{q.norm}-eps{q.eps:g}" for t, q in self.requests.items())
    digest = hashlib.sha1(np.asarray(self.weights, np.float64).round(8).tobytes()).hexdigest()
    soups_text = f"soups{len(self.weights)}-{digest[:8]}"
    sel = f"_select-{self.select_on}" if self.select_on else ""
    text = (f"{kind}_{r.dataset}-{r.split}_n{n}_{attack}_{threat_text}_{soups_text}{sel}"
            f"_step{r.loaded.step}")
    return "".join(c if c.isalnum() or c in "_.+-" else "-" for c in text)


def plan(workdir: str, weights: str | np.ndarray | None = None, *, attack: str = "pgd",
         extrapolate: bool = False, select_on: str | None = None,
         threat_names: Sequence[str] | None = None, loaded: Any = None,
         threat_settings: dict[str, dict] | None = None, **request_kwargs: Any) -> ThreatSweep:
  """Checks a threat sweep of `workdir` and restores its model; compiles and writes nothing.

  weights: `--weights` text (default simplex:0.1) or an array [S, D]; request_kwargs: the
  `requests.make_request` arguments but eps / norm (each threat has its own) and the columns.
  threat_settings: {name: {norm, eps}} to attack with instead of the run's own threats (e.g. a
  clean-only or single-threat run measured against every threat of an experiment).
  ValueError / FileNotFoundError (one line) on a bad value.
  """
  for flag in ("eps", "norm", "alphas", "domain", "select_alpha_on"):
    if request_kwargs.get(flag) is not None:
      raise ValueError(f"--{flag} does not apply to a sweep over --weights: each threat of the "
                       "run has its own norm and eps, and the soups are the weights")
    request_kwargs.pop(flag, None)
  config = loaded.config if loaded is not None else workdir_lib.load_config(workdir)
  all_threats = threat_settings or threats_lib.normalise(config)
  names = list(all_threats) if threat_names is None else list(threat_names)
  unknown = [n for n in names if n not in all_threats]
  if unknown or not names:
    raise ValueError(f"unknown threat {unknown[0] if unknown else ''!r}: the run's threats are "
                     f"{', '.join(all_threats)}")
  num_domains = int(config.model.num_domains)
  if num_domains == 1:
    w = np.ones((1, 1))
    notes = ["single-domain model: no soups, evaluated as one row (--weights ignored)"] \
        if weights is not None else []
  elif weights is None or isinstance(weights, str):
    w = soup_weights.parse_weights(DEFAULT_WEIGHTS if weights is None else weights, num_domains,
                                   extrapolate)
    notes = []
  else:
    w = soup_weights.parse_weights(";".join(",".join(repr(float(v)) for v in row)
                                            for row in np.asarray(weights)), num_domains,
                                   extrapolate)
    notes = []
  selection = None
  if select_on is not None:
    if ":" in select_on:
      num_examples = request_kwargs.get("num_examples") or config.eval.get("num_examples", None)
      data_dir = request_kwargs.get("data_dir") or config.data.get("data_dir", None)
      selection = requests._selection(select_on, config, num_domains, num_examples, data_dir,
                                      workdir)
    elif select_on not in union.criteria(names):
      raise ValueError(f"--select_on={select_on!r}: allowed {', '.join(union.criteria(names))} "
                       "or NAME:SPLIT[:N] (a shift's data set)")
    if num_domains == 1:
      raise ValueError(f"--select_on: {workdir!r} holds a single-domain model: there is no soup "
                       "to select")
  reqs = {}
  for name in names:
    threat = all_threats[name]
    reqs[name] = requests.make_request(workdir, attack=attack, eps=threat["eps"],
                                       norm=threat["norm"], alphas=[0.0], loaded=loaded,
                                       **request_kwargs)
    loaded = reqs[name].loaded
  columns = w.astype(np.float32) if num_domains > 1 else np.zeros([1], np.int32)
  labels = [soup_weights.label(row) for row in w]
  for name in names:
    reqs[name] = dataclasses.replace(reqs[name], columns=columns, labels=labels, alphas=None)
  return ThreatSweep(reqs, w, select_on, selection, notes)


def _evaluate(request: requests.Request, attack: bool, name: str | None = None,
              split: str | None = None, num_examples: int | None = None
              ) -> engine.ColumnResult:
  """Per-example results of every soup of `request` (its attacks when `attack`)."""
  return engine.evaluate_request(request, name, split, num_examples, attack=attack)


def run(sweep: ThreatSweep, *, kind: str = "sweep", out_dir: str | None = None,
        write: bool = True) -> dict:
  """Evaluates every soup under every threat; returns the report (and writes
  `<name>.{json,csv,npz}` and, for three domains, the simplex `<name>.png` into `out_dir`,
  default WORKDIR/<kind>). Report: settings, `threats` {name: {norm, eps}}, `results` (one row
  per soup: weights, clean_accuracy, robust_accuracy {threat: acc}, union_accuracy), `best`
  (the best soup per column), `selection`, `wall_time_s`, `files`."""
  start = time.time()
  first = sweep.first
  clean, robust = None, {}
  for name, request in sweep.requests.items():
    result = _evaluate(request, True)
    clean = result.clean_correct if clean is None else clean
    robust[name] = result.robust if request.attacks else result.clean_correct
  acc = union.accuracies(clean, robust)
  threat_names = list(sweep.requests)
  rows = []
  for s, w in enumerate(sweep.weights):
    rows.append({"column": soup_weights.label(w), "weights": [float(v) for v in w],
                 "clean_accuracy": float(acc["clean"][s]),
                 "robust_accuracy": {t: float(acc[t][s]) for t in threat_names},
                 "union_accuracy": float(acc[union.UNION][s])})
  best = {k: {"index": union.select(v), "column": rows[union.select(v)]["column"],
              "accuracy": float(np.max(v))} for k, v in acc.items()}
  selection = None
  if sweep.select_on and sweep.selection is None:
    selection = union.select_on_half(clean, robust, sweep.select_on,
                                     union.first_half(len(clean)))
    selection["column"] = rows[selection["index"]]["column"]
  elif sweep.selection is not None:
    sel = sweep.selection
    chosen = _evaluate(first, False, sel.dataset, sel.selection_split)
    index = union.select(chosen.clean_correct.mean(0))
    held = _evaluate(first, False, sel.dataset, sel.heldout_split, sel.num_heldout)
    selection = {"criterion": f"{sel.dataset}:{sel.split}[:{sel.n}]", "index": index,
                 "column": rows[index]["column"],
                 "selection_accuracy": float(chosen.clean_correct.mean(0)[index]),
                 "reported": {"clean": float(held.clean_correct.mean(0)[index])},
                 "selection_examples": int(len(chosen.clean_correct)),
                 "reported_examples": int(len(held.clean_correct))}
  report = {
      "kind": kind, "workdir": first.loaded.workdir, "step": first.loaded.step,
      "dataset": first.dataset, "split": first.split,
      "num_examples": int(len(clean)), "attack": {"names": list(first.attacks),
                                                   "budgets": dict(first.budgets),
                                                   "description": first.description},
      "threats": {t: {"norm": r.norm, "eps": r.eps} for t, r in sweep.requests.items()},
      "domains": (["clean"] + list(threats_lib.normalise(first.config)))
                 if len(sweep.weights[0]) > 1 else ["model"],
      "results": rows, "best": best, "selection": selection, "notes": list(sweep.notes),
      "wall_time_s": time.time() - start}
  if write and jax.process_index() == 0:
    report["files"] = _write(report, clean, robust, out_dir or os.path.join(
        first.loaded.workdir, kind), sweep.name(kind))
  return report


def to_csv(report: dict) -> str:
  """One line per soup: its weights per domain, clean, each threat, union."""
  threat_names = list(report["threats"])
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["column"] + [f"w_{d}" for d in report["domains"]] + ["clean_accuracy"]
                  + [f"robust_accuracy_{t}" for t in threat_names] + ["union_accuracy"])
  for r in report["results"]:
    weights = r["weights"] if len(r["weights"]) == len(report["domains"]) else \
        [""] * len(report["domains"])
    writer.writerow([r["column"]] + weights + [r["clean_accuracy"]]
                    + [r["robust_accuracy"][t] for t in threat_names] + [r["union_accuracy"]])
  return buf.getvalue()


def format_table(report: dict) -> str:
  """The report as a fixed-width table (percent), the best soup per column and the selection."""
  threat_names = list(report["threats"])
  head = ["soup (w: " + ", ".join(report["domains"]) + ")", "clean"] + threat_names + ["union"]
  lines = [f"{report['dataset']}:{report['split']} ({report['num_examples']} examples), "
           f"{report['attack']['description'] or 'clean only'}; threats: "
           + ", ".join(f"{t} {v['norm']} eps={v['eps']:g}" for t, v in report["threats"].items()),
           "  ".join(f"{h:>12}" for h in head)]
  for r in report["results"]:
    cells = [r["column"], r["clean_accuracy"]] + [r["robust_accuracy"][t] for t in threat_names] \
        + [r["union_accuracy"]]
    lines.append("  ".join(f"{c:>12}" if isinstance(c, str) else f"{100 * c:>11.2f}%"
                           for c in cells))
  for key, b in report["best"].items():
    lines.append(f"best {key}: {b['column']} ({100 * b['accuracy']:.2f}%)")
  sel = report.get("selection")
  if sel:
    lines.append(f"selected on {sel['criterion']} ({sel['selection_examples']} examples): "
                 f"{sel['column']}; on {sel['reported_examples']} other examples: "
                 + ", ".join(f"{k} {100 * v:.2f}%" for k, v in sel["reported"].items()))
  return "\n".join(lines)


def _write(report: dict, clean: np.ndarray, robust: dict, out_dir: str, name: str
           ) -> dict[str, str]:
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  files = {"json": json.dumps(report, indent=2).encode(), "csv": to_csv(report).encode()}
  buf = io.BytesIO()
  np.savez_compressed(buf, clean_correct=clean, **{f"robust_{t}": v for t, v in robust.items()})
  files["npz"] = buf.getvalue()
  if len(report["domains"]) == 3 and len(report["results"]) >= 1:
    metrics = {"clean": [r["clean_accuracy"] for r in report["results"]]}
    metrics.update({t: [r["robust_accuracy"][t] for r in report["results"]]
                    for t in report["threats"]})
    metrics["union"] = [r["union_accuracy"] for r in report["results"]]
    files["png"] = simplex_plot.to_png(np.asarray([r["weights"] for r in report["results"]]),
                                       metrics, report["domains"], title=name)
  paths = {}
  for ext, data in files.items():
    path = os.path.join(out_dir, f"{name}.{ext}")
    epath.Path(path + ".tmp").write_bytes(data)
    epath.Path(path + ".tmp").replace(path)
    paths[ext] = path
  return paths
