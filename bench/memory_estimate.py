"""The memory check's estimate against the real peak, on the CPU, for three programs.

  .venv/bin/python -m bench.memory_estimate [--programs train,eval,sweep] [--devices 4]

Each program runs in its own fresh process: it is compiled ahead of time from abstract
arguments (nothing allocated), then the process's peak RSS is reset (`echo 5 >
/proc/self/clear_refs`, Linux), the arguments are allocated and the compiled object is executed
once; real = VmHWM (peak RSS since the reset) - VmRSS at the reset. The estimate is
`memory.compiled_bytes` (arguments + outputs + temporaries - aliased) times the devices: with
`--devices K` the process has K CPU devices sharing its memory, the batch sharded over them (as
the training programs split the CPU, `adv_soups.host_devices`), and the memory check compares one
device's need with MemAvailable / K, the same test. Caveat: memory the
allocator kept from the compilation can be reused without raising RSS, so `real` can read low;
XLA:CPU's thread-local scratch and the runtime's own buffers make it read high. Prints one JSON
line per program.

Programs (the standard bench model: ViT width 192, depth 6, 3 heads, MLP 768, 32x32x3, patch 4,
10 classes, token adapters, one CPU device unless --devices):
  train  the co-training step, batch 128, PGD-2 (`training.make_train_step`).
  eval   a periodic evaluation's PGD-20 stage on 512 rows (clean and adversarial columns),
         every row attacked (labels = its own prediction, so the compaction drops none).
  sweep  a sweep batch: PGD-10 on 512 rows with soup mixing weights (11 alphas' columns).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def _config(batch: int):
  from adv_soups import config_base, training
  config = config_base.base_config()
  config.model.update(variant="Ti/4", width=192, depth=6, num_heads=3, mlp_dim=768, patch_size=4,
                      image_size=32, num_classes=10, adapter="token")
  config.data.name = "cifar10"
  config.train.update(mode="cotrain", batch_size=batch)
  config.attack.update(norm="linf", eps=4 / 255, num_steps=2)
  return training.resolve_config(config)


def measure(program: str, devices: int = 1) -> dict:
  """Runs in the child process: compile, reset the peak, allocate, execute once."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from adv_soups import memory, parallel, training
  from adv_soups.evaluation import engine
  from adv_soups.models import create_model
  assert jax.device_count() >= devices, (jax.device_count(), devices)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  config = _config(128)
  model = create_model(config.model)
  if program == "train":
    optimizer = training.make_optimizer(config.optimizer, 100)
    state = jax.eval_shape(lambda: training.init_state(config, model, optimizer))
    batch = {"image": jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((128,), jnp.int32)}
    compiled = training.make_train_step(config, model, optimizer, mesh).lower(state, batch).compile()
    estimate = memory.compiled_bytes(compiled) * devices
    open("/proc/self/clear_refs", "w").write("5")
    before = _status("VmRSS")
    real_state = jax.device_put(training.init_state(config, model, optimizer),
                                parallel.replicated(mesh))
    real_batch = parallel.shard_batch(mesh, {
        "image": np.random.default_rng(0).uniform(0, 1, (128, 32, 32, 3)).astype(np.float32),
        "label": np.zeros((128,), np.int32)})
    jax.block_until_ready(compiled(real_state, real_batch))
  else:
    from adv_soups import soups
    from adv_soups.attacks import runner
    params_fn = lambda: training.init_state(config, model, training.make_optimizer(
        config.optimizer, 100)).params
    if program == "eval":
      columns, steps = np.asarray([0, 1], np.int32), 20
    else:
      columns, steps = np.asarray(soups.mix_weights(np.linspace(0, 1, 11)), np.float32), 10
    # Compile from real parameters (the runner's cache needs them), then free everything but
    # what the run uses, and measure the run's allocation of rows, outputs and temporaries.
    params = jax.device_put(params_fn())
    programs = engine.column_programs(model, params, (32, 32, 3), columns, attacks=("pgd",),
                                      budgets={"pgd": steps}, eps=4 / 255, mesh=mesh,
                                      batch_size=512)
    stage, compiled = programs[-1]
    estimate = memory.compiled_bytes(compiled) * devices
    params_bytes = memory.tree_bytes(params)
    open("/proc/self/clear_refs", "w").write("5")
    before = _status("VmRSS") - params_bytes  # the parameters are arguments of the estimate
    # (the labelling forward pass below is far smaller than the attack's stage)
    # Every row attacked at the full batch: labels are each row's own prediction (clean-correct
    # rows only go on to the attack), and the rows fill whole 512-row calls.
    rng = np.random.default_rng(0)
    n = -(-512 // len(columns))
    rows = engine.expand({"image": rng.uniform(0, 1, (n, 32, 32, 3)).astype(np.float32),
                          "label": np.zeros((n,), np.int32),
                          "key": np.arange(n, dtype=np.int32)}, columns)
    logits_fn = engine.model_logits_fn(model)
    rows["label"] = np.asarray(jnp.argmax(jax.jit(logits_fn)(params, rows["image"],
                                                             rows["domain"]), -1), np.int32)
    result = runner.robust_accuracy(logits_fn, [rows], eps=4 / 255, attacks=("pgd",),
                                    num_steps={"pgd": steps}, params=params, mesh=mesh,
                                    batch_size=512)
    assert result.clean_accuracy == 1.0
  real = _status("VmHWM") - before
  return dict(program=program, devices=devices, estimate_bytes=estimate, real_peak_bytes=real,
              estimate_over_real=estimate / max(real, 1))


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--programs", default="train,eval,sweep")
  p.add_argument("--devices", type=int, default=1, help="CPU devices sharing the process")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.child, args.devices)), flush=True)
    return []
  lines = []
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
  for program in args.programs.split(","):
    out = subprocess.run([sys.executable, "-m", "bench.memory_estimate", f"--child={program}",
                          f"--devices={args.devices}"],
                         capture_output=True, text=True, cwd=REPO, env=env, check=True)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    lines.append(line)
    print(json.dumps(line), flush=True)
  return lines


if __name__ == "__main__":
  main()
