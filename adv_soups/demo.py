"""`make demo`: co-train the digits ViT from scratch, then sweep the adapter soups.

  python -m adv_soups.demo [--workdir=workdirs/digits_demo] [--overwrite] [--attack=apgd-ce]

Re-running on a finished workdir skips training (it resumes at the last step) and sweeps again.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags

from adv_soups import cli, sweep, train

_ATTACK = flags.DEFINE_string("attack", "apgd-ce", "Sweep attack: pgd, apgd-ce or autoattack.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", None, "Sweep on the first N test examples.")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "digits.py")


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if not any(a.startswith("--config=") for a in argv[1:]):
    argv.insert(1, f"--config={CONFIG}")  # before any --config.a.b=value override
  if not any(a.startswith("--workdir") for a in argv[1:]):
    argv.append("--workdir=workdirs/digits_demo")
  attack = next((a.split("=", 1)[1] for a in argv if a.startswith("--attack=")), _ATTACK.default)
  if attack not in ("pgd", "apgd-ce", "autoattack"):  # checked before training, not after
    cli.fail(f"unknown --attack={attack!r}: allowed pgd, apgd-ce, autoattack")
  start = time.time()
  print("[demo] 1/2 co-training a tiny ViT on the bundled digits", flush=True)
  train.main(argv)
  workdir = flags.FLAGS.workdir
  print(f"[demo] trained in {time.time() - start:.0f} s", flush=True)
  print(f"[demo] 2/2 adversarial model soups: 11 alphas, {_ATTACK.value}", flush=True)
  result = sweep.run_sweep(workdir, alphas=[i / 10 for i in range(11)], attack=_ATTACK.value,
                           num_examples=_NUM_EXAMPLES.value)
  print(sweep.format_table(result))
  print(f"[demo] wrote {os.path.join(workdir, 'sweep')}/sweep.{{csv,json,png}}; "
        f"total {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
