"""Stage 4 of the adapter experiment: results.json, results.md (the table over seeds and the soup
curves) and adapters.png, from the results dict alone (so a stored results.json renders again)."""
from __future__ import annotations

import json
import os
import textwrap

from etils import epath

from adv_soups import stats


MODE_TEXT = {"clean": "clean-only", "adversarial": "adversarial-only", "cotrain": "co-training"}


def format_markdown(summary: list[dict], settings: dict) -> str:
  """results.md: the table over seeds and the soup curves, stating the suite and the examples."""
  pct = lambda m, s: f"{100 * m:.1f} +- {100 * s:.1f}"
  lines = [f"# Adapter comparison: {settings['dataset']}, {settings['train_steps']} steps of "
           f"{settings['batch_size']}, seeds 0..{settings['seeds'] - 1}", "",
           f"Attack: {settings['attack']}, {settings['norm']} eps={settings['eps']:g}, on "
           f"{settings['num_examples_text']}. Clean accuracy: clean mode (domain 0); robust "
           "accuracy: robust mode (domain 1; domain 0 of single-domain and shared models). "
           "Mean +- sample std over seeds (n = seeds).", "",
           "| mode | adapter | per-domain params | x token | clean % | robust % | n |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for row in summary:
    if not row["seeds"]:
      lines.append(f"| {MODE_TEXT[row['mode']]} | {row['adapter']} | - | - | pending | "
                   "pending | 0 |")
      continue
    ratio = "-" if row["ratio_to_token"] is None else f"{row['ratio_to_token']:.1f}"
    lines.append(
        f"| {MODE_TEXT[row['mode']]} | {row['adapter']} | {row['per_domain_params']:,} | "
        f"{ratio} | {pct(row['clean_accuracy_mean'], row['clean_accuracy_std'])} | "
        f"{pct(row['robust_accuracy_mean'], row['robust_accuracy_std'])} | {row['seeds']} |")
  soups_rows = [r for r in summary if r.get("soup")]
  if soups_rows:
    lines += ["", "Soup curves (alpha 0 = clean mode, 1 = robust mode; each soup attacked in "
              "its own right), clean % / robust %, mean over seeds:", "",
              "| alpha | " + " | ".join(r["adapter"] for r in soups_rows) + " |",
              "| ---: |" + " ---: |" * len(soups_rows)]
    for i, point in enumerate(soups_rows[0]["soup"]):
      cells = [f"{100 * r['soup'][i]['clean_accuracy_mean']:.1f} / "
               f"{100 * r['soup'][i]['robust_accuracy_mean']:.1f}" for r in soups_rows]
      lines.append(f"| {point['alpha']:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(summary: list[dict], runs: list[dict], path: str, title: str) -> None:
  """adapters.png: clean vs robust accuracy (%), one faint point per run with its Wilson 95%
  interval, the mean per (mode, adapter) with error bars (std over seeds), and each co-trained
  adapter's mean soup curve with its 95% intervals (examples pooled over seeds)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, row in enumerate(r for r in summary if r["seeds"]):
    color = colors[i % len(colors)]
    label = f"{MODE_TEXT[row['mode']]}" + (f" ({row['adapter']})" if row["mode"] == "cotrain"
                                           else "")
    figs = [rec["figures"] for rec in runs  # the run records (results["runs"])
            if (rec["mode"], rec["adapter"]) == (row["mode"], row["adapter"])
            and rec.get("figures")]
    if row.get("soup"):  # the mean curve with its 95% interval (pooled over seeds) as error bars
      pooled = sum(f["num_examples"] for f in figs)
      curve = [stats.percent_interval([p[f"{k}_accuracy_mean"] for p in row["soup"]], pooled)
               for k in ("clean", "robust")]
      ax.errorbar(curve[0][0], curve[1][0], xerr=curve[0][1:], yerr=curve[1][1:], fmt="-",
                  color=color, alpha=0.5, lw=1, capsize=2)
    for fig_run in figs:  # each run's point with its binomial 95% interval
      x, y = (stats.percent_interval([fig_run[f"{k}_accuracy"]], fig_run["num_examples"])
              for k in ("clean", "robust"))
      ax.errorbar(x[0], y[0], xerr=x[1:], yerr=y[1:], fmt=".", color=color, alpha=0.4,
                  capsize=2)
    ax.errorbar(100 * row["clean_accuracy_mean"], 100 * row["robust_accuracy_mean"],
                xerr=100 * row["clean_accuracy_std"], yerr=100 * row["robust_accuracy_std"],
                fmt="o", color=color, capsize=3, label=label)
  ax.set_xlabel("clean accuracy % (clean mode)")
  ax.set_ylabel("robust accuracy % (robust mode)")
  ax.set_title(textwrap.fill(title, 80), fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def write_outputs(workdir: str, results: dict) -> list[str]:
  """Writes results.json, results.md and adapters.png of `results` into `workdir`; their paths."""
  settings = results["settings"]
  paths = [os.path.join(workdir, n) for n in ("results.json", "results.md", "adapters.png")]
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  for path, text in ((paths[0], json.dumps(results, indent=1) + "\n"),
                     (paths[1], format_markdown(results["summary"], settings))):
    with epath.Path(path).open("w") as f:
      f.write(text)
  plot(results["summary"], results["runs"], paths[2],
       f"{settings['dataset']}: {settings['attack']}, eps {settings['eps']:g}, "
       f"{settings['num_examples_text']}")
  return paths

