"""`make demo`: co-train the digits ViT from scratch, then sweep the adapter soups.

  python -m adv_soups.demo [--workdir=workdirs/digits_demo] [--overwrite] [--attack=apgd-ce]

Re-running on a finished workdir skips training (it resumes at the last step) and sweeps again.
"""
from __future__ import annotations

import os
import sys
import time

from adv_soups import cli, training_cli
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
  training_cli.train_parsed(config, workdir, overwrite=values.overwrite)
  print(f"[demo] trained in {time.time() - start:.0f} s", flush=True)
  print(f"[demo] 2/2 adversarial model soups: 11 alphas, {values.attack}", flush=True)
  request = requests.make_request(workdir, alphas=[i / 10 for i in range(11)],
                                  attack=values.attack, num_examples=values.num_examples)
  result = run.run_request(request, kind="sweep")
  print(reports.format_table(result))
  stem = os.path.splitext(result["files"]["json"])[0]
  print(f"[demo] wrote {stem}.{{json,csv,png,npz}}; total {time.time() - start:.0f} s",
        flush=True)


if __name__ == "__main__":
  main()
