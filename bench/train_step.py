"""Train-step throughput of `adv_soups.training.make_train_step`, optionally beside PyTorch eager.

  .venv/bin/python -m bench.train_step                         # the standard configuration
  .venv/bin/python -m bench.train_step --baseline=torch        # + the PyTorch eager step, interleaved
  .venv/bin/python -m bench.train_step --modes=cotrain --ab=--remat   # A/B of a switch, interleaved
  .venv/bin/python -m bench.train_step --variant=B/16 --width=768 --depth=12 --heads=12 \
      --mlp=3072 --patch=16 --image_size=224 --num_classes=1000 --batch=8 --modes=cotrain \
      --compile_only --ab=--dtype=bfloat16      # large models: compile time and memory only

`--threats=2|3` co-trains against 2 or 3 threats (`config.threats`; `--threat_loss=trades`):
the cost per step grows with the number of threats.

Standard configuration (the performance issue): ViT width 192, depth 6, 3 heads, MLP 768, 32x32x3
images, patch 4, 10 classes, token adapter, global batch 128, PGD-2 l_inf eps 4/255 with a random
start, AdamW, float32. The step is the project's own: the config comes from
`training.base_config()` + `training.resolve_config`, the mesh spans `jax.devices()`, and the step
is `training.make_train_step`, compiled ahead of time (its compile time is reported; the timed
calls cannot recompile). On a CPU-only host the CPU is split into devices as the training
programs split it (`adv_soups.host_devices`: 4 for batch 128; `ADV_SOUPS_CPU_DEVICES=1` for one
device). Warm-up excluded; `--repeats` timed repetitions of `--steps` steps each; the
median and the spread (min, max) are reported.

Prints one JSON line per mode: mode, images_per_sec, ms_per_step, spread_ms, flops_per_image
(analytic, `bench.flops`), achieved_gflops, utilisation (achieved / `bench.peak`'s matmul rate for
the compute dtype), compile_s, memory (XLA's memory analysis of the step), and with
`--baseline=torch` the PyTorch figures of the same repetitions, `speedup` = the median over
pairs of (torch ms / ours ms) and `speedup_of_best` (best torch ms / best ours ms; a busy machine
hurts PyTorch's OpenMP threads more than XLA's, so trust only runs with tight spreads); with
`--ab=FLAGS` the same for our step with FLAGS changed (`ab_speedup` = ours ms / theirs). With
modes cotrain and adversarial, a last line compares their cost with (2k + 6) / (2k + 3). Repetitions run round-robin over the modes (and, with the baseline,
ours then theirs, the order alternating), so slow drift of a shared machine hits all alike. Each
line is also appended, with the machine, versions and config, to `--results`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS = os.path.join(REPO, "bench", "results", "train_step.jsonl")
DEFAULT_TORCH_PYTHON = os.path.join(REPO, ".venv-torch", "bin", "python")
MODES = ("clean", "adversarial", "cotrain")
DATASETS = {10: "cifar10", 1000: "imagenet2012"}  # resolve_config checks the class count


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description="Train-step throughput of adv_soups (and PyTorch eager)")
  p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + str(MODES))
  p.add_argument("--variant", default="Ti/4", help="model variant; the size flags override it")
  p.add_argument("--width", type=int, default=192)
  p.add_argument("--depth", type=int, default=6)
  p.add_argument("--heads", type=int, default=3)
  p.add_argument("--mlp", type=int, default=768)
  p.add_argument("--patch", type=int, default=4)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--num_classes", type=int, default=10, choices=sorted(DATASETS))
  p.add_argument("--batch", type=int, default=128, help="global batch (images drawn)")
  p.add_argument("--attack_steps", type=int, default=2)
  p.add_argument("--eps", default="4/255")
  p.add_argument("--threats", type=int, default=1, choices=(1, 2, 3),
                 help="threat domains of cotrain: 1 = config.attack (the standard step); 2 = "
                      "config.threats l_inf eps + l_2 (eps * 8, our choice for 32x32x3); 3 = "
                      "those + l_inf at 2 eps; each PGD-k")
  p.add_argument("--threat_loss", default="ce", choices=("ce", "trades"),
                 help="the loss of every threat when --threats > 1")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--remat", action="store_true", help="config.model.remat (checkpoint each block)")
  p.add_argument("--backend", default=None, help="jax platform (cpu, gpu, tpu); default: jax's")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=2, help="steps per timed repetition")
  p.add_argument("--baseline", default="none", choices=("none", "torch"))
  p.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON)
  p.add_argument("--peak_gflops", type=float, default=None,
                 help="matmul rate for utilisation (default: measured with bench.peak)")
  p.add_argument("--results", default=DEFAULT_RESULTS, help="JSON-lines file to append to ('' = none)")
  p.add_argument("--ab", default="",
                 help="also time the same step with these flags changed (e.g. '--remat' or "
                      "'--dtype=bfloat16'), interleaved step by step, and report ab_speedup")
  p.add_argument("--compile_only", action="store_true",
                 help="only compile: report compile time and XLA's memory analysis, time nothing")
  p.add_argument("--note", default="", help="free text stored with the results (e.g. the lever)")
  args = p.parse_args(argv)
  args.modes = args.modes.split(",")
  bad = [m for m in args.modes if m not in MODES]
  if bad:
    p.exit(2, f"error: unknown mode {bad[0]!r}: allowed {list(MODES)}\n")
  for name in ("width", "depth", "heads", "mlp", "patch", "image_size", "batch", "attack_steps",
               "repeats", "steps"):
    if getattr(args, name) < 1:
      p.exit(2, f"error: --{name} must be >= 1, got {getattr(args, name)}\n")
  try:
    from adv_soups import cli
    args.eps = cli.parse_eps(args.eps)
  except ValueError as e:
    p.exit(2, f"error: {e}\n")
  if args.baseline == "torch" and not os.path.exists(args.torch_python):
    p.exit(2, f"error: --torch_python {args.torch_python} does not exist (make bench-torch-venv)\n")
  return args


def make_config(args, mode: str):
  """The resolved adv_soups config of the benchmark for `mode`."""
  from adv_soups import training
  config = training.base_config()
  config.model.update(variant=args.variant, width=args.width, depth=args.depth,
                      num_heads=args.heads, mlp_dim=args.mlp, patch_size=args.patch,
                      image_size=args.image_size, num_classes=args.num_classes, adapter="token",
                      dtype=args.dtype, remat=args.remat)
  config.data.name = DATASETS[args.num_classes]
  config.train.update(mode=mode, batch_size=args.batch)
  if mode == "cotrain" and args.threats > 1:
    from adv_soups import threats
    settings = [("linf", "linf", args.eps), ("l2", "l2", 8 * args.eps),
                ("linf2x", "linf", 2 * args.eps)][:args.threats]
    config.threats = threats.ordered({
        name: threats.threat(norm, eps, num_steps=args.attack_steps, loss=args.threat_loss)
        for name, norm, eps in settings})
  else:
    config.attack.update(norm="linf", eps=args.eps, num_steps=args.attack_steps)
  return training.resolve_config(config)


def machine_info() -> dict:
  """Host, CPU model, backend, device count and library versions."""
  import flax
  import jax
  import jaxlib
  import optax
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return dict(host=platform.node(), cpu=cpu, cores=os.cpu_count(), backend=jax.default_backend(),
              device_count=jax.device_count(), device_kind=jax.devices()[0].device_kind,
              python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
              flax=flax.__version__, optax=optax.__version__,
              xla_flags=os.environ.get("XLA_FLAGS", ""))


class Ours:
  """The compiled adv_soups step of one mode, its state and a fixed random batch."""

  def __init__(self, args, mode: str, mesh):
    import jax
    import numpy as np
    from adv_soups import parallel, training
    from adv_soups.models import create_model
    self.config = make_config(args, mode)
    model = create_model(self.config.model)
    optimizer = training.make_optimizer(self.config.optimizer, self.config.train.steps)
    self.state = jax.device_put(training.init_state(self.config, model, optimizer),
                                parallel.replicated(mesh))
    rng = np.random.default_rng(0)
    size = args.image_size
    self.batch = parallel.shard_batch(mesh, {
        "image": rng.uniform(0, 1, (args.batch, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, args.num_classes, (args.batch,)).astype(np.int32)})
    step = training.make_train_step(self.config, model, optimizer, mesh)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.memory = memory_figures(self.compiled)
    if not args.compile_only:
      self.run(1)  # warm-up

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps (dispatch to completion)."""
    import jax
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


def memory_figures(compiled) -> dict:
  """XLA's memory analysis of a compiled step in MiB (temp = activations and scratch)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return {}
  if m is None:
    return {}
  mib = lambda b: round(b / 2 ** 20, 3)
  return dict(temp_mib=mib(m.temp_size_in_bytes), argument_mib=mib(m.argument_size_in_bytes),
              output_mib=mib(m.output_size_in_bytes), alias_mib=mib(m.alias_size_in_bytes))


class Torch:
  """The PyTorch eager worker (bench/torch_step.py --serve) in its own venv."""

  def __init__(self, args):
    cmd = [args.torch_python, os.path.join(REPO, "bench", "torch_step.py"), "--serve",
           f"--width={args.width}", f"--depth={args.depth}", f"--heads={args.heads}",
           f"--mlp={args.mlp}", f"--image_size={args.image_size}", f"--patch={args.patch}",
           f"--num_classes={args.num_classes}", f"--batch={args.batch}",
           f"--attack_steps={args.attack_steps}", f"--eps={args.eps!r}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
    self.info = json.loads(self._read())

  def _read(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the PyTorch worker exited (status {self.proc.wait()})")
    return line

  def run(self, mode: str, steps: int) -> float:
    self.proc.stdin.write(f"{mode} {steps}\n")
    self.proc.stdin.flush()
    return json.loads(self._read())["seconds"]

  def warm(self, mode: str) -> None:
    self.run(mode, 0)  # builds the mode's model and runs its untimed warm-up step

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def summarise(seconds: list[float], steps: int, batch: int) -> dict:
  ms = [1000 * s / steps for s in seconds]
  median = statistics.median(ms)
  return dict(images_per_sec=batch / median * 1000, ms_per_step=median,
              spread_ms=[min(ms), max(ms)], repeats=len(ms))


def ratios(numerators: list[float], denominators: list[float]) -> dict:
  """Median of the pairwise ratios and the ratio of the bests (less hit by a busy machine)."""
  pairs = [a / b for a, b in zip(numerators, denominators)]
  return dict(median=statistics.median(pairs), of_best=min(numerators) / min(denominators),
              pairs=pairs)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  args_b = parse_args(list(argv or sys.argv[1:]) + shlex.split(args.ab)) if args.ab else None
  from adv_soups import host_devices
  batches = [args.batch] + ([args_b.batch] if args_b else [])
  try:
    host_devices.split_for_training(math.gcd(*batches))  # as the programs do, before jax starts
  except ValueError as e:  # a bad $ADV_SOUPS_CPU_DEVICES
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import jax
  if args.backend:
    jax.config.update("jax_platforms", args.backend)
  from adv_soups import parallel
  from bench import flops, peak
  mesh = parallel.make_mesh()
  for batch in batches:
    if batch % jax.device_count():
      print(f"error: --batch {batch} must be a multiple of the {jax.device_count()} devices",
            file=sys.stderr)
      sys.exit(2)
  peak_gflops = None if args.compile_only else (
      args.peak_gflops or peak.matmul_gflops(2048, args.dtype, repeats=3)["median_gflops"])
  torch = Torch(args) if args.baseline == "torch" and not args.compile_only else None
  ours, theirs, other = {}, {m: [] for m in args.modes}, {}
  times_b = {m: [] for m in args.modes}
  try:
    for mode in args.modes:
      ours[mode] = Ours(args, mode, mesh)
      if args_b:
        other[mode] = Ours(args_b, mode, mesh)
      if torch:
        torch.warm(mode)
    times = {m: [] for m in args.modes}
    for rep in range(0 if args.compile_only else args.repeats):
      for mode in args.modes:
        if torch and rep % 2:
          theirs[mode].append(torch.run(mode, args.steps))
        times[mode].append(ours[mode].run(args.steps))
        if args_b:
          times_b[mode].append(other[mode].run(args.steps))
        if torch and not rep % 2:
          theirs[mode].append(torch.run(mode, args.steps))
  finally:
    if torch:
      torch.close()

  model = dict(image_size=args.image_size, patch_size=args.patch, channels=3, width=args.width,
               depth=args.depth, mlp_dim=args.mlp, num_classes=args.num_classes)
  info = machine_info()
  lines = []
  for mode in args.modes:
    per_image = flops.step_flops_per_image(mode, args.attack_steps, **model)
    if args.compile_only:
      line = dict(mode=mode, compile_only=True, flops_per_image=per_image,
                  compile_s=ours[mode].compile_s, memory=ours[mode].memory)
      if args_b:
        line["ab"] = dict(flags=args.ab, compile_s=other[mode].compile_s,
                          memory=other[mode].memory)
      lines.append(line)
      print(json.dumps(line), flush=True)
      continue
    line = dict(mode=mode, threats=args.threats, threat_loss=args.threat_loss,
                **summarise(times[mode], args.steps, args.batch))
    achieved = line["images_per_sec"] * per_image / 1e9
    line.update(flops_per_image=per_image, achieved_gflops=achieved,
                peak_gflops=peak_gflops, utilisation=achieved / peak_gflops,
                compile_s=ours[mode].compile_s, memory=ours[mode].memory)
    if args_b:
      r = ratios(times[mode], times_b[mode])
      line["ab"] = dict(summarise(times_b[mode], args.steps, args.batch), flags=args.ab,
                        compile_s=other[mode].compile_s, memory=other[mode].memory)
      line.update(ab_speedup=r["median"], ab_speedup_of_best=r["of_best"], ab_pairs=r["pairs"])
    if torch:
      t = summarise(theirs[mode], args.steps, args.batch)
      r = ratios(theirs[mode], times[mode])
      line["torch"] = dict(t, torch=torch.info.get("torch"), threads=torch.info.get("threads"))
      line.update(speedup=r["median"], speedup_of_best=r["of_best"], speedup_pairs=r["pairs"])
    lines.append(line)
    print(json.dumps(line), flush=True)
  if "cotrain" in times and "adversarial" in times and not args.compile_only:
    r = ratios(times["cotrain"], times["adversarial"])
    k = args.attack_steps
    print(json.dumps(dict(cotrain_over_adversarial=r["median"], of_best=r["of_best"],
                          pairs=r["pairs"], model=(2 * k + 6) / (2 * k + 3))), flush=True)
  if torch:
    print("median speedup over PyTorch eager (torch ms / ours ms, interleaved pairs): " +
          ", ".join(f"{l['mode']} {l['speedup']:.2f}x (of bests {l['speedup_of_best']:.2f}x)"
                    for l in lines), flush=True)
  if args.results:
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("results", "torch_python")}
    with open(args.results, "a") as f:
      for line in lines:
        f.write(json.dumps(dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=info,
                                config=config, **line)) + "\n")
  return lines


if __name__ == "__main__":
  main()
