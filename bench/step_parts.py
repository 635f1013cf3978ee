"""Where the co-training step's time goes, ours (XLA:CPU) beside PyTorch eager, interleaved.

  .venv/bin/python -m bench.step_parts [--torch_python .venv-torch/bin/python] [--repeats 5]

The standard configuration of `bench.train_step` (ViT width 192, depth 6, 3 heads, MLP 768,
32x32x3, patch 4, batch 128, co-training with PGD-2, AdamW, float32), cut into parts, each
jitted and compiled ahead of time on our side and run by `bench/torch_parts.py` on theirs:
  forward     logits of B images (no gradient).
  input_grad  one input-gradient pass (a PGD iteration: forward + backward to the images);
              the step runs k = 2 of them.
  param_grad  the loss and parameter gradient on the 2B-row co-training batch.
  optimizer   global-norm clipping + AdamW on those gradients.
  step        the whole train step (`training.make_train_step`).
Parts alternate ours / theirs (order flipping per repetition); medians in ms, and
torch / ours per part. Also the utilisation of XLA's own f32 matmul peak (`bench.peak`) of the
step, measured in the same run, and the load average before and after. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench import train_step

PARTS = ("forward", "input_grad", "param_grad", "optimizer", "step")


def our_parts(args) -> dict:
  """{part: zero-argument callable that runs it to completion} on our side."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from adv_soups import parallel, training
  from adv_soups.models import create_model
  config = train_step.make_config(args, "cotrain")
  mesh = parallel.make_mesh()
  model = create_model(config.model)
  optimizer = training.make_optimizer(config.optimizer, config.train.steps)
  state = jax.device_put(training.init_state(config, model, optimizer), parallel.replicated(mesh))
  rng = np.random.default_rng(0)
  b, size = args.batch, args.image_size
  x = jnp.asarray(rng.uniform(0, 1, (b, size, size, 3)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, args.num_classes, (b,)).astype(np.int32))
  adv = jnp.ones((b,), jnp.int32)
  inputs = jnp.stack([x, x], 1).reshape((2 * b,) + x.shape[1:])
  domains, targets = jnp.tile(jnp.asarray([0, 1], jnp.int32), b), jnp.repeat(y, 2)
  logits = lambda p, images, d: model.apply({"params": p}, images, d, train=False)

  def ce_sum(p, images, d, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, images, d), labels).sum()

  aot = lambda f, *a: jax.jit(f).lower(*a).compile()
  fwd = aot(logits, state.params, x, adv)
  igrad = aot(jax.grad(ce_sum, argnums=1), state.params, x, adv, y)
  pgrad = aot(lambda p: jax.grad(lambda q: ce_sum(q, inputs, domains, targets) / b)(p),
              state.params)
  grads = pgrad(state.params)
  opt = aot(lambda g, s, p: optimizer.update(g, s, p), grads, state.opt_state, state.params)
  batch = parallel.shard_batch(mesh, {"image": np.asarray(x), "label": np.asarray(y)})
  step = training.make_train_step(config, model, optimizer, mesh).lower(state, batch).compile()
  # `step` donates its state: it runs on its own copy, the other parts keep `state`.
  holder = {"state": jax.device_put(jax.tree.map(np.asarray, state), parallel.replicated(mesh))}

  def run_step():
    holder["state"], m = step(holder["state"], batch)
    jax.block_until_ready(m)

  parts = dict(forward=lambda: fwd(state.params, x, adv).block_until_ready(),
               input_grad=lambda: igrad(state.params, x, adv, y).block_until_ready(),
               param_grad=lambda: jax.block_until_ready(pgrad(state.params)),
               optimizer=lambda: jax.block_until_ready(opt(grads, state.opt_state, state.params)),
               step=run_step)
  for fn in parts.values():
    fn()
  return parts


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--torch_python", default=train_step.DEFAULT_TORCH_PYTHON)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--inner", type=int, default=2, help="runs per timed part")
  args_in = p.parse_args(argv)
  args = train_step.parse_args(["--modes=cotrain", "--results="])
  load_before = os.getloadavg()
  from bench import peak
  peak_gflops = peak.matmul_gflops(2048, "float32", repeats=3)["median_gflops"]
  torch = None
  if os.path.exists(args_in.torch_python):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    torch = subprocess.Popen([args_in.torch_python, os.path.join(train_step.REPO, "bench",
                                                                 "torch_parts.py")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    info = json.loads(torch.stdout.readline())
  t0 = time.perf_counter()
  ours = our_parts(args)
  print(f"step_parts: our parts compiled in {time.perf_counter() - t0:.0f} s; load "
        f"{os.getloadavg()}", file=sys.stderr, flush=True)
  times = {k: {"ours": [], "torch": []} for k in PARTS}

  def time_ours(part):
    t0 = time.perf_counter()
    for _ in range(args_in.inner):
      ours[part]()
    times[part]["ours"].append((time.perf_counter() - t0) / args_in.inner)

  def time_torch(part):
    torch.stdin.write(f"{part} {args_in.inner}\n")
    torch.stdin.flush()
    times[part]["torch"].append(json.loads(torch.stdout.readline())["seconds"])

  for rep in range(args_in.repeats):
    for part in PARTS:
      order = (time_ours, time_torch) if rep % 2 == 0 else (time_torch, time_ours)
      for fn in order:
        if fn is time_ours or torch:
          fn(part)
      print(f"step_parts: rep {rep} {part} " + json.dumps(times[part]), file=sys.stderr,
            flush=True)
  if torch:
    torch.stdin.write("quit\n")
    torch.stdin.flush()
    torch.wait(timeout=60)
  from bench import flops
  model = dict(image_size=args.image_size, patch_size=args.patch, channels=3, width=args.width,
               depth=args.depth, mlp_dim=args.mlp, num_classes=args.num_classes)
  per_image = flops.step_flops_per_image("cotrain", args.attack_steps, **model)
  table = {}
  for part in PARTS:
    o = statistics.median(times[part]["ours"]) * 1e3
    row = dict(ours_ms=o, ours_spread_ms=[min(times[part]["ours"]) * 1e3,
                                          max(times[part]["ours"]) * 1e3])
    if times[part]["torch"]:
      t = statistics.median(times[part]["torch"]) * 1e3
      row.update(torch_ms=t, torch_over_ours=t / o)
    table[part] = row
  step_s = table["step"]["ours_ms"] / 1e3
  result = dict(machine=train_step.machine_info(), load_before=load_before,
                load_after=os.getloadavg(), peak_gflops_f32=peak_gflops,
                step_utilisation=args.batch * per_image / step_s / 1e9 / peak_gflops,
                torch=info if torch else None, parts=table, repeats=args_in.repeats)
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
