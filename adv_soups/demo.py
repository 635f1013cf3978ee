"""`make demo`: co-train the digits ViT from scratch, then sweep the adapter soups.

  python -m adv_soups.demo [--workdir=workdirs/digits_demo] [--overwrite] [--attack=apgd-ce]

Re-running on a finished workdir skips training (it resumes at the last step) and sweeps again.
"""
from __future__ import annotations

import os
import sys
import time

from adv_soups import cli, stats, training_cli
from adv_soups.attacks import registry
from adv_soups.evaluation import reports, requests, run

DEMO_FLAGS = (("string", "attack", "apgd-ce", "Sweep attack: one of the attacks or suites of "
               "`python -m adv_soups.sweep --help` (pgd, apgd-ce, autoattack, ...)."),
              ("integer", "num_examples", None, "Sweep on the first N test examples."))
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "digits.py")


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if not any(a.startswith("--config=") for a in argv[1:]):
    argv.insert(1, f"--config={CONFIG}")  # before any --config.a.b=value override
  if not any(a.startswith("--workdir") for a in argv[1:]):
    argv.append("--workdir=workdirs/digits_demo")
  attack = next((a.split("=", 1)[1] for a in argv if a.startswith("--attack=")), DEMO_FLAGS[0][2])
  try:  # checked before training, not after
    registry.parse_suite(attack)
  except ValueError as e:
    cli.fail(f"--attack={attack!r}: {e}")
  start = time.time()
  print("[demo] 1/2 co-training a tiny ViT on the bundled digits", flush=True)
  values = training_cli.define_flags(DEMO_FLAGS)  # the training flags (multi-process too) + ours
  config, workdir = training_cli.parse_command_line(argv, values)
  training_cli.train_parsed(config, workdir, overwrite=values.overwrite, verbose=values.verbose)
  print(f"[demo] trained in {time.time() - start:.0f} s", flush=True)
  print(f"[demo] 2/2 adversarial model soups: 11 alphas, {values.attack}", flush=True)
  request = requests.make_request(workdir, alphas=[i / 10 for i in range(11)],
                                  attack=values.attack, num_examples=values.num_examples)
  result = run.run_request(request, kind="sweep")
  print(reports.format_table(result))
  stem = os.path.splitext(result["files"]["json"])[0]
  print(f"[demo] wrote {stem}.{{json,csv,png,npz}}; total {time.time() - start:.0f} s",
        flush=True)
  for line in summary_lines(result):
    print(f"[demo] {line}", flush=True)


def summary_lines(report: dict) -> list[str]:
  """The sweep in plain words: clean and robust accuracy of both modes, and whether the clean
  (and the robust) accuracy moved across the soups by more than sampling noise (their Wilson 95%
  intervals on the report's examples do not overlap)."""
  rows, n = report["results"], report["num_examples"]
  suite = report["attack"]["description"]
  pct = lambda x: f"{100 * x:.1f}%"
  lines = []
  for row, name in ((rows[0], "clean mode"), (rows[-1], "robust mode")):
    lines.append(f"{name} (alpha {row['alpha']:g}): clean accuracy {pct(row['clean_accuracy'])}, "
                 f"robust accuracy {pct(row['robust_accuracy'])} ({suite}, {report['norm']} eps "
                 f"{report['eps']:g}, {n} test images)")
  for key, what in (("clean_accuracy", "clean"), ("robust_accuracy", "robust")):
    values = [r[key] for r in rows]
    low, high = min(values), max(values)
    half = max(h - l for l, h in zip(*stats.wilson_interval([low, high], n))) * 50
    moved = stats.differ_beyond_noise(low, high, n)
    verdict = ("more than sampling noise" if moved else
               f"within sampling noise (95% intervals about +-{half:.1f} points at n={n}): "
               "these images cannot show a difference")
    lines.append(f"across the {len(rows)} soups {what} accuracy spans {pct(low)}-{pct(high)}: "
                 f"{verdict}")
  return lines


if __name__ == "__main__":
  main()
