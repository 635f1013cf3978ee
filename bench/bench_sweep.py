"""An 11-alpha soup sweep vs one alpha on the same examples: time, ratio, compilations.

  .venv/bin/python -m bench.bench_sweep [--workdir=DIR | --no_workdir] [--num_examples 512]
      [--batch_size 128] [--steps 10] [--attack pgd] [--alphas 11] [--repeats 3]

Two measurements, both through the sweep's code path (batches expanded to (example x alpha) rows
with per-row mixing weights [1 - a, a], `batch_size` rows per compiled call). The single alpha
runs first and pays the compilation; the sweep must then compile nothing more (counted with
`jax.monitoring`). Then both are timed, interleaved, best of `repeats`. Target (DESIGN.md): an
attacked sweep <= 1.1 x 11 x one alpha.

1. Compute-bound: the digits config's ViT (width 64, depth 2, 8x8 images, patch 2), untrained,
   on random images labelled with its own predictions, so every row is clean-correct and is
   attacked (no compaction shortcut): the cost of the attack itself.
2. A trained workdir (`--workdir`, or the tests' tiny co-trained digits model, trained first in a
   temporary directory in ~20-30 s), on its test split through `evaluate.run_evaluation`, data
   reading included; only clean-correct rows are attacked. A clean-only sweep is timed too.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from adv_soups import evaluate, soups  # pylint: disable=wrong-import-position

_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, *a, **k: _COMPILES.append(event) if "backend_compile" in event else None)


def train_tiny(workdir: str, data_dir: str) -> None:
  """The tests' tiny co-trained digits model (see tests/conftest.py)."""
  from adv_soups import training
  from configs import digits
  config = digits.get_config()
  config.data.data_dir = data_dir
  config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
  config.train.update(steps=150, batch_size=64, log_every=50, checkpoint_every=0)
  config.evals.val.every = 0
  config.attack.update(num_steps=2, eps=0.03)
  config.optimizer.update(learning_rate=5e-3, warmup_steps=10)
  config.eval.update(num_examples=64, batch_size=64, attack_steps=2)
  training.train_and_evaluate(config, workdir)


def count_compiles(fn) -> int:
  """Compilations during `fn()`."""
  start = len(_COMPILES)
  fn()
  return len(_COMPILES) - start


def best_times(runs, repeats: int) -> list[float]:
  """Best of `repeats` wall times of each zero-argument function, calls interleaved (the machine
  is shared and noisy: interleaving exposes both to the same load)."""
  best = [float("inf")] * len(runs)
  for _ in range(repeats):
    for i, run in enumerate(runs):
      t = time.perf_counter()
      run()
      best[i] = min(best[i], time.perf_counter() - t)
  return best


def compute_bound(args) -> None:
  """Section 1: every row attacked; the model is the digits config's, untrained."""
  from adv_soups import training
  from adv_soups.models import create_model, init_params
  from configs import digits
  config = training.resolve_config(digits.get_config())
  model = create_model(config.model)
  params = init_params(model, jax.random.key(0), config.model.channels)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(args.num_examples, 8, 8, 1)).astype(np.float32)
  labels = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, None).argmax(-1))(
      params, images)).astype(np.int32)
  batches = [dict(image=images[i:i + args.batch_size], label=labels[i:i + args.batch_size])
             for i in range(0, args.num_examples, args.batch_size)]

  def run(domains):
    return evaluate.grid_robust(model, params, iter(batches), domains, attack=args.attack,
                                eps=config.attack.eps, norm="linf", num_steps=args.steps,
                                batch_size=args.batch_size)
  report(f"1. compute-bound: digits ViT (width 64, depth 2), untrained, every row attacked, "
         f"{evaluate.describe_attack(args.attack, args.steps)}", run, args)


def report(title: str, run, args) -> None:
  grid = np.asarray(soups.mix_weights(np.linspace(0.0, 1.0, args.alphas)))
  one = np.asarray(soups.mix_weights([0.5]))
  t = time.perf_counter()
  c1 = count_compiles(lambda: run(one))
  first1 = time.perf_counter() - t
  cg = count_compiles(lambda: run(grid))
  t1, tg = best_times([lambda: run(one), lambda: run(grid)], args.repeats)
  print(f"\n{title}")
  print(f"  1 alpha:   {t1:8.3f} s  (first call {first1:.3f} s: {c1} compilations)")
  print(f"  {args.alphas} alphas: {tg:8.3f} s  ({cg} compilations after the 1-alpha call)")
  print(f"  ratio {tg / t1:.2f} = {tg / t1 / args.alphas:.3f} x {args.alphas} x one alpha")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--num_examples", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--attack", default="pgd")
  parser.add_argument("--alphas", type=int, default=11)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_workdir", action="store_true", help="only the compute-bound part")
  args = parser.parse_args()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; {args.num_examples} "
        f"examples, {args.batch_size} rows per compiled call")
  compute_bound(args)
  if args.no_workdir:
    return
  workdir = args.workdir
  if workdir is None:
    tmp = tempfile.mkdtemp(prefix="bench_sweep_")
    workdir = os.path.join(tmp, "workdir")
    print(f"\ntraining the tiny digits model into {workdir} ...", flush=True)
    train_tiny(workdir, os.path.join(tmp, "tfds"))
  for i, attack in enumerate((args.attack, "none")):
    plan = evaluate.make_plan(workdir, attack=attack, steps=args.steps,
                              num_examples=args.num_examples, batch_size=args.batch_size)
    report(f"2{'ab'[i]}. workdir {workdir}, {evaluate.describe_attack(attack, plan.steps)}, "
           f"eps={plan.eps:g}", lambda d, plan=plan: evaluate.run_evaluation(plan, d), args)


if __name__ == "__main__":
  main()
