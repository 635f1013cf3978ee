"""The first N co-training losses of this tree beside another checkout's: did a step change move them?

  PYTHONPATH=$PWD .venv/bin/python -m bench.step_numerics --base=/path/to/old/tree \
      [--steps=50] [--batch=32] [other bench.train_step flags]

Both trees run `bench.train_step`'s standard configuration (co-training, PGD-2 with random start,
AdamW; `--batch` images a step) from the same initial parameters on the same fixed random batches
(numpy seed 0, labels random), each in its own process; the base tree runs with PYTHONPATH set to
it. Prints the largest relative loss difference per step range and one JSON line. PGD's sign
gradients can turn float noise into a different adversarial example, so differences grow with the
step; a changed function shows up at step 0 already.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_losses(args) -> list[float]:
  """Losses of the first `args.steps` train steps of this process's adv_soups (float32 scalars)."""
  import jax
  import numpy as np
  from adv_soups import parallel, training
  from adv_soups.models import create_model
  config = train_step.make_config(args, "cotrain")
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, config.train.steps)
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  step = training.make_train_step(config, model, optimizer, mesh)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(args.steps):
    images = rng.uniform(0, 1, (args.batch, args.image_size, args.image_size, 3))
    labels = rng.integers(0, args.num_classes, (args.batch,))
    batch = parallel.shard_batch(mesh, {"image": images.astype(np.float32),
                                        "label": labels.astype(np.int32)})
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(add_help=False)
  p.add_argument("--base", default=None)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--losses_only", action="store_true")
  own, rest = p.parse_known_args(argv)
  args = train_step.parse_args(rest + ([] if "--batch" in " ".join(rest) else ["--batch=32"]))
  args.steps = own.steps
  if own.losses_only:
    print(json.dumps(run_losses(args)))
    return {}
  ours = run_losses(args)
  result = {"steps": own.steps, "batch": args.batch, "ours": ours}
  if own.base:
    # This file as a script: `bench` and `adv_soups` then come from the base tree's PYTHONPATH.
    cmd = [sys.executable, os.path.abspath(__file__), "--losses_only", f"--steps={own.steps}",
           f"--batch={args.batch}"]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(own.base))
    out = subprocess.run(cmd, cwd=own.base, env=env, capture_output=True, text=True)
    if out.returncode:
      sys.exit(f"the base tree's run failed:\n{out.stderr[-2000:]}")
    base = json.loads(out.stdout.strip().splitlines()[-1])
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, base)]
    result.update(base=base, relative_difference=rel)
    for lo, hi in ((0, 1), (1, 10), (10, 25), (25, own.steps)):
      if lo < len(rel):
        print(f"steps {lo}-{min(hi, len(rel)) - 1}: max relative loss difference "
              f"{max(rel[lo:hi]):.2e}")
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
