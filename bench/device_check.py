"""One command for a lent accelerator: speed, MFU, numerics against the CPU, AutoAttack, memory.

  python -m bench.device_check [--out bench/results/device_check.json] [--smoke]
  python -m bench.device_check --write_reference     # on the CPU: the digits reference numbers

Writes one JSON file with these sections (each timed; a section that fails records its error and
the others still run):
  machine      backend, device kind, count, versions, `memory_stats()`.
  peaks        the chip's published dense peaks (`PUBLISHED_TFLOPS`) and the measured matmul rate.
  vit_b16      `bench.train_step` for ViT-B/16 at 224 px in bfloat16 (co-training, PGD-2), with MFU
               = analytic FLOPs per second / the published bfloat16 peak.
  standard     `bench.train_step`'s standard configuration (all modes, float32).
  digits       a short digits co-training run (`DIGITS_STEPS` steps); its PGD-20 accuracies are
               compared with the CPU's (`bench/results/device_check_cpu_reference.json`, made with
               --write_reference): within binomial noise = |p_device - p_cpu| <= 3 sigma, sigma =
               sqrt(2 p (1 - p) / n) at the pooled p.
  autoattack   the full AutoAttack (standard version, its own budgets) on that run's robust model,
               at full precision (evaluation's float32 'highest' matmuls).
  peak_memory  the device's peak_bytes_in_use (GPU / TPU) or this process's max RSS (CPU).
On the lent GPU it runs in under 10 minutes (budget: `--budget_s`; sections past it are
skipped). `--smoke` runs the same code at tiny sizes on the CPU (the test suite does), and its
AutoAttack then has tiny budgets (labelled so, never called the full AutoAttack).
The machine has no TensorFlow and no network: `bench/build_device_wheels.sh` builds the wheels to
carry and prints the command to run there.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO, "bench", "results", "device_check_cpu_reference.json")
DIGITS_NPZ = os.path.join(REPO, "dist", "device_wheels", "digits.npz")
DIGITS_STEPS = 400

# Published dense peaks per chip in TFLOP/s (no sparsity): vendor data sheets.
PUBLISHED_TFLOPS = {
    "H100 SXM": dict(bfloat16=989.4, tf32=494.7, float32=66.9),
    "H100 PCIe": dict(bfloat16=756.5, tf32=378.0, float32=51.2),
    "H200": dict(bfloat16=989.4, tf32=494.7, float32=66.9),
    "A100": dict(bfloat16=312.0, tf32=156.0, float32=19.5),
    "TPU v3": dict(bfloat16=123.0),
    "TPU v4": dict(bfloat16=275.0),
    "TPU v5 lite": dict(bfloat16=197.0),
    "TPU v5p": dict(bfloat16=459.0),
    "TPU v6 lite": dict(bfloat16=918.0),
}


def published_peak(device_kind: str) -> tuple[str | None, dict | None]:
  """(table key, peaks) for a jax `device_kind` ('NVIDIA H100 80GB HBM3', 'TPU v4', ...)."""
  kind = device_kind.lower()
  if "h200" in kind:
    return "H200", PUBLISHED_TFLOPS["H200"]
  if "h100" in kind:
    key = "H100 PCIe" if "pcie" in kind else "H100 SXM"
    return key, PUBLISHED_TFLOPS[key]
  if "a100" in kind:
    return "A100", PUBLISHED_TFLOPS["A100"]
  if kind.startswith("tpu"):
    key = "TPU v5p" if kind.strip() in ("tpu v5", "tpu v5p") else device_kind.strip()
    for name in PUBLISHED_TFLOPS:
      if name.lower() == key.lower():
        return name, PUBLISHED_TFLOPS[name]
  return None, None


def binomial_agreement(p_device: float, p_cpu: float, n: int) -> dict:
  """Two accuracies on the same n examples from two runs: within 3 sigma of their difference
  (sigma = sqrt(2 p (1 - p) / n), p pooled)?"""
  p = (p_device + p_cpu) / 2
  sigma = math.sqrt(max(2 * p * (1 - p) / n, 1e-12))
  z = abs(p_device - p_cpu) / sigma
  return dict(device=p_device, cpu=p_cpu, n=n, sigma=sigma, z=z, within_noise=z <= 3.0)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "device_check.json"))
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, the test suite)")
  p.add_argument("--write_reference", action="store_true",
                 help="run the digits section and store it as the CPU reference")
  p.add_argument("--budget_s", type=float, default=540.0,
                 help="skip the sections that start after this many seconds")
  p.add_argument("--sections", default="machine,peaks,vit_b16,standard,digits,autoattack",
                 help="comma list of the sections to run")
  return p.parse_args(argv)


def machine() -> dict:
  import jax
  from bench import train_step
  info = train_step.machine_info()
  try:
    info["memory_stats"] = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    info["memory_stats"] = None
  return info


def peaks(smoke: bool) -> dict:
  import jax
  from bench import peak
  kind = jax.devices()[0].device_kind
  name, table = published_peak(kind)
  size = 256 if smoke else 8192
  measured = {dt: peak.matmul_gflops(size, dt, repeats=3)
              for dt in ("float32", "bfloat16")}
  return dict(device_kind=kind, published_chip=name, published_tflops=table, measured=measured)


def vit_b16(smoke: bool, published: dict | None) -> dict:
  """bench.train_step on ViT-B/16, 224 px, bfloat16, co-training with PGD-2."""
  import jax
  from bench import train_step
  n = jax.device_count()
  if smoke:
    sizes = ["--width=32", "--depth=1", "--heads=2", "--mlp=64", "--patch=16",
             "--image_size=32", f"--batch={2 * n}", "--repeats=1", "--steps=1",
             "--peak_gflops=100"]
  else:
    sizes = ["--variant=B/16", "--width=768", "--depth=12", "--heads=12", "--mlp=3072",
             "--patch=16", "--image_size=224", "--num_classes=1000", f"--batch={64 * n}",
             "--repeats=5", "--steps=3"]
  line = train_step.main(sizes + ["--modes=cotrain", "--dtype=bfloat16", "--results="])[0]
  if published and "bfloat16" in published:
    peak_flops = published["bfloat16"] * 1e12 * n
    line["mfu"] = line["achieved_gflops"] * 1e9 / peak_flops
    line["mfu_peak_tflops_per_chip"] = published["bfloat16"]
  return line


def standard(smoke: bool) -> list[dict]:
  import jax
  from bench import train_step
  n = jax.device_count()
  args = ["--results="]
  if smoke:
    args += ["--width=32", "--depth=1", "--heads=2", "--mlp=64", "--image_size=8",
             f"--batch={2 * n}", "--repeats=1", "--steps=1", "--peak_gflops=100",
             "--modes=cotrain"]
  return train_step.main(args)


def digits_config(smoke: bool):
  from configs import digits
  config = digits.get_config()
  config.train.update(steps=6 if smoke else DIGITS_STEPS, log_every=3 if smoke else 100,
                      checkpoint_every=0)
  config.evals.val.update(every=0, attack="pgd")  # PGD-20 on both modes, at the end
  if smoke:
    config.model.update(depth=1, width=32, num_heads=2, mlp_dim=64)
    config.train.batch_size = 16
    config.attack.num_steps = 2
    config.eval.update(num_examples=32, batch_size=32, attack_steps=2)
  return config


@contextlib.contextmanager
def digits_without_sklearn():
  """Where scikit-learn is absent (the lent GPU), the digits come from the carried
  `dist/device_wheels/digits.npz` (the same arrays, written by build_device_wheels.sh)."""
  try:
    import sklearn  # noqa: F401  pylint: disable=unused-import
    yield
    return
  except ImportError:
    pass
  import numpy as np
  from adv_soups.data import digits
  saved = digits.scaled_images
  data = np.load(DIGITS_NPZ)
  digits.scaled_images = lambda: (data["images"], data["labels"])
  try:
    yield
  finally:
    digits.scaled_images = saved


def digits_run(smoke: bool, workdir: str) -> dict:
  """A short co-training run on digits; its end-of-run PGD accuracies (n = the test split)."""
  from adv_soups import training
  config = digits_config(smoke)
  t0 = time.time()
  with digits_without_sklearn():
    result = training.train_and_evaluate(config, workdir)
  n = int(config.eval.num_examples or 360)
  return dict(steps=config.train.steps, seconds=time.time() - t0, n=n,
              metrics={k: float(v) for k, v in result.eval_metrics.items()})


def compare_with_reference(run: dict, smoke: bool, path: str = REFERENCE) -> dict:
  """Each metric of `run` against the CPU reference of the same settings."""
  label = "smoke" if smoke else "full"
  if not os.path.exists(path):
    return dict(reference=None, note=f"no CPU reference at {path}")
  with open(path) as f:
    ref = json.load(f).get(label)
  if not ref or ref.get("steps") != run["steps"]:
    return dict(reference=None, note=f"no CPU reference for {label} with {run['steps']} steps")
  out = {k: binomial_agreement(v, ref["metrics"][k], run["n"])
         for k, v in run["metrics"].items() if k in ref["metrics"]}
  return dict(reference=dict(machine=ref.get("machine"), metrics=ref["metrics"]),
              agreement=out, all_within_noise=all(v["within_noise"] for v in out.values()))


def autoattack(smoke: bool, workdir: str) -> dict:
  """AutoAttack (standard version) on the run's robust model (domain 1), full precision."""
  from adv_soups import evaluate
  budgets = dict(steps=2, square_queries=10, num_examples=16, batch_size=16) if smoke else {}
  with digits_without_sklearn():
    report = evaluate.evaluate_one(workdir, domain=1, attack="autoattack", write=False,
                                   progress=False, **budgets)
  keep = ("clean_accuracy", "robust_accuracy", "robust_accuracy_after", "attack", "precision",
          "num_examples", "eps", "norm", "wall_time_s", "warnings")
  out = {k: report[k] for k in keep if k in report}
  out["full_budgets"] = not smoke
  return out


def peak_memory() -> dict:
  import jax
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return dict(source="memory_stats peak_bytes_in_use", bytes=int(stats["peak_bytes_in_use"]),
                bytes_limit=stats.get("bytes_limit"))
  return dict(source="getrusage ru_maxrss (host process)",
              bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.time()
  sections = args.sections.split(",")
  result: dict = dict(smoke=args.smoke, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      sections={})
  workdir = tempfile.mkdtemp(prefix="device_check_")
  state: dict = {}

  def section(name, fn):
    if name not in sections:
      return
    if not args.smoke and time.time() - start > args.budget_s:  # (a loaded CPU is slow)
      result["sections"][name] = dict(skipped=f"past the {args.budget_s:.0f} s budget")
      return
    t0 = time.time()
    try:
      value = fn()
      entry = value if isinstance(value, dict) else dict(lines=value)
    except Exception as e:  # pylint: disable=broad-except  (one failure keeps the others)
      entry = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    entry["section_seconds"] = time.time() - t0
    result["sections"][name] = entry
    print(f"device_check: {name} done in {entry['section_seconds']:.1f} s"
          + (f" ({entry['error']})" if "error" in entry else ""), file=sys.stderr, flush=True)

  if args.write_reference:
    run = digits_run(args.smoke, workdir)
    run["machine"] = machine()
    ref = json.load(open(REFERENCE)) if os.path.exists(REFERENCE) else {}
    ref["smoke" if args.smoke else "full"] = run
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as f:
      json.dump(ref, f, indent=1, default=str)
    print(json.dumps(run, default=str))
    return run

  section("machine", machine)
  section("peaks", lambda: peaks(args.smoke))
  published = (result["sections"].get("peaks") or {}).get("published_tflops")
  section("vit_b16", lambda: vit_b16(args.smoke, published))
  section("standard", lambda: standard(args.smoke))

  def digits_section():
    run = digits_run(args.smoke, os.path.join(workdir, "digits"))
    state["digits"] = os.path.join(workdir, "digits")
    return dict(run, **compare_with_reference(run, args.smoke))

  section("digits", digits_section)
  if "digits" in state:
    section("autoattack", lambda: autoattack(args.smoke, state["digits"]))
  elif "autoattack" in sections:
    result["sections"]["autoattack"] = dict(skipped="no digits run to attack")
  result["sections"]["peak_memory"] = peak_memory()
  result["total_seconds"] = time.time() - start
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"device_check: wrote {args.out} in {result['total_seconds']:.0f} s", file=sys.stderr)
  return result


if __name__ == "__main__":
  main()
