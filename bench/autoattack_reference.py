"""Our AutoAttack against the public one (torchattacks' parts at the reference settings), one run.

  PYTHONPATH=$PWD .venv/bin/python -m bench.autoattack_reference --workdir=DIR \
      [--num_examples=360] [--base=/path/to/another/tree] [--torch_python=.venv-timm/bin/python]

1. DIR: a digits workdir (`configs/digits.py`); trained first (~2-4 minutes) when it holds no
   checkpoint, reused otherwise.
2. Its robust mode (alpha 1) is exported (`adv_soups.export`, the vision_transformer .npz layout)
   and loaded into timm's `VisionTransformer` in the torch venv (a subprocess: the package never
   imports torch), with the sidecar's normalisation outside the model; the timm logits must equal
   ours on the evaluation images (max |difference| <= 1e-4) or the run stops.
3. Timed, one after the other on the same first `num_examples` digits test images, l_inf eps 0.1,
   each as a fresh process (start-up, data reading and compilation included in the wall time):
   - public: AutoAttack's standard version assembled from torchattacks' parts with the reference
     settings (APGD-CE 100 iterations 1 restart; APGD-T 100 iterations, 9 targets; FAB-T 100
     iterations, 9 targets; Square 5,000 queries, p_init 0.8, the schedule not rescaled; seed 0),
     each attack on the points every earlier one failed on, all of them in one batch, FAB points
     counted only within eps (as fra31/auto-attack). torchattacks' own
     `AutoAttack(version="standard")` is not used: it runs 10 iterations and a rescaled Square.
   - ours: `python -m adv_soups.evaluate --workdir=DIR --attack=autoattack --alpha=1
     --num_examples=N` of this tree with an empty persistent compilation cache (cold: every
     program compiled), then again finding them in that cache (warm, as a second evaluation of
     the model; `--no_warm` skips it), and of `--base` (another checkout, e.g. before a change).
4. One JSON line appended to `--out` (CPU model, both accuracies, wall times, per-attack seconds)
   and a table printed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.1
ATTACKS = ("APGD-CE", "APGD-T", "FAB-T", "Square")


# ---------------------------------------------------------------------------------------------
# The torch side (runs in the torch venv: torch, timm, torchattacks; no JAX, no adv_soups)
# ---------------------------------------------------------------------------------------------
def torch_side(args) -> None:
  """Loads the exported model into timm, checks its logits, runs the public AutoAttack's parts."""
  start = time.time()
  import functools

  import timm  # noqa: F401  (timm's import time counts: it is the public baseline's start-up)
  import torch
  import torchattacks
  from timm.models import vision_transformer as vit

  torch.set_num_threads(os.cpu_count() or 1)
  meta = json.load(open(args.npz[:-4] + ".json"))
  data = np.load(args.data)
  model = vit.VisionTransformer(
      img_size=meta["image_size"], patch_size=meta["patch_size"], in_chans=meta["channels"],
      num_classes=meta["num_classes"], embed_dim=meta["width"], depth=meta["depth"],
      num_heads=meta["num_heads"], mlp_ratio=meta["mlp_dim"] / meta["width"], qkv_bias=True,
      class_token=True, global_pool="token",
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=meta["layernorm_epsilon"]))
  vit._load_weights(model, args.npz)  # pylint: disable=protected-access

  class Normalised(torch.nn.Module):
    """images NCHW in [0, 1] -> logits, with the sidecar's (x - mean) / std outside timm."""

    def __init__(self, net):
      super().__init__()
      self.net = net
      self.register_buffer("mean", torch.tensor(meta["mean"]).view(1, -1, 1, 1))
      self.register_buffer("std", torch.tensor(meta["std"]).view(1, -1, 1, 1))

    def forward(self, x):
      return self.net((x - self.mean) / self.std)

  net = Normalised(model).eval()
  x = torch.from_numpy(np.ascontiguousarray(data["images"].transpose(0, 3, 1, 2)))
  y = torch.from_numpy(data["labels"].astype(np.int64))
  with torch.no_grad():
    logits = net(x).numpy()
  diff = float(np.abs(logits - data["logits"]).max())
  out = dict(logits_max_abs_diff=diff, torch=torch.__version__, timm=timm.__version__,
             torchattacks=torchattacks.__version__, threads=torch.get_num_threads())
  if diff > 1e-4:
    out["error"] = f"timm logits differ from ours by {diff:.3g} (> 1e-4)"
  if diff > 1e-4 or args.check_only:
    print(json.dumps(out))
    return
  n_classes = meta["num_classes"]
  parts = [
      ("APGD-CE", torchattacks.APGD(net, norm="Linf", eps=EPS, steps=100, n_restarts=1,
                                    loss="ce", seed=0)),
      ("APGD-T", torchattacks.APGDT(net, norm="Linf", eps=EPS, steps=100, n_restarts=1,
                                    n_classes=n_classes, seed=0)),
      ("FAB-T", torchattacks.FAB(net, norm="Linf", eps=EPS, steps=100, n_restarts=1,
                                 multi_targeted=True, n_classes=n_classes, seed=0)),
      ("Square", torchattacks.Square(net, norm="Linf", eps=EPS, n_queries=5000, n_restarts=1,
                                     p_init=0.8, loss="margin", resc_schedule=False, seed=0)),
  ]
  for name, attack in parts:  # the reference's targets: the 9 runner-up classes
    if name in ("APGD-T", "FAB-T"):
      assert attack.n_target_classes == 9, (name, attack.n_target_classes)
  with torch.no_grad():
    robust = net(x).argmax(1) == y
  clean = float(robust.float().mean())
  seconds, rows, after = {}, {}, {}
  for name, attack in parts:
    idx = robust.nonzero().flatten()
    t = time.time()
    if len(idx):
      xa = attack(x[idx], y[idx])
      with torch.no_grad():
        broken = net(xa).argmax(1) != y[idx]
      inside = (xa - x[idx]).abs().flatten(1).max(1)[0] <= EPS + 1e-6
      robust[idx[broken & inside]] = False
    seconds[name] = time.time() - t
    rows[name] = int(len(idx))
    after[name] = float(robust.float().mean())
  out.update(clean_accuracy=clean, robust_accuracy=after["Square"], accuracy_after=after,
             seconds=seconds, rows_attacked=rows, robust=robust.numpy().astype(int).tolist(),
             process_s=time.time() - start)
  print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The JAX side (this tree's venv)
# ---------------------------------------------------------------------------------------------
def _timed(cmd, **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
  """Runs `cmd`; returns (the process, wall seconds, CPU seconds (user + system) it and its
  children used: on a loaded machine the CPU seconds compare better than the wall time)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
  wall = time.time() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return proc, wall, cpu


def _env(tree: str) -> dict:
  env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="2")
  return env


def ensure_workdir(workdir: str) -> None:
  """Trains the digits config into `workdir` unless it already holds a checkpoint."""
  if glob.glob(os.path.join(workdir, "checkpoints", "*")):
    return
  print(f"training {workdir} (configs/digits.py, ~2-4 minutes) ...", flush=True)
  subprocess.run([sys.executable, "-m", "adv_soups.train", "--config=configs/digits.py",
                  f"--workdir={workdir}"], cwd=ROOT, env=_env(ROOT), check=True,
                 stdout=subprocess.DEVNULL)


def prepare(workdir: str, num_examples: int, out_dir: str) -> tuple[str, str]:
  """Exports the robust mode and writes the evaluation images, labels and our logits."""
  from adv_soups import export, loading
  from adv_soups.data import pipeline

  npz = os.path.join(out_dir, "robust.npz")
  export.export_soup(workdir, 1.0, npz)
  loaded = loading.load(workdir)
  batch = next(pipeline.eval_batches("digits", split="test", batch_size=num_examples,
                                     num_examples=num_examples,
                                     image_size=loaded.config.model.image_size))
  keep = batch["mask"].astype(bool)
  images, labels = batch["image"][keep], batch["label"][keep]
  logits = np.asarray(loaded.predict(images, alpha=1.0), np.float32)
  data = os.path.join(out_dir, "data.npz")
  np.savez(data, images=images.astype(np.float32), labels=labels.astype(np.int32), logits=logits)
  return npz, data


def run_ours(tree: str, workdir: str, num_examples: int, cache_dir: str | None = None) -> dict:
  """`adv_soups.evaluate` of `tree` as a fresh process; its wall time and report figures.
  cache_dir: its persistent compilation cache (`adv_soups.compile_cache`); None: off."""
  with tempfile.TemporaryDirectory() as out_dir:
    cmd = [sys.executable, "-m", "adv_soups.evaluate", f"--workdir={workdir}",
           "--attack=autoattack", "--alpha=1", f"--num_examples={num_examples}",
           f"--out_dir={out_dir}"]
    env = dict(_env(tree), ADV_SOUPS_COMPILATION_CACHE=cache_dir or "off")
    proc, wall, cpu = _timed(cmd, cwd=tree, env=env)
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} (in {tree}) failed:\n{proc.stderr[-3000:]}")
    reports = [json.load(open(p)) for p in glob.glob(os.path.join(out_dir, "*.json"))]
    report = [r for r in reports if isinstance(r, dict) and "results" in r][0]
  row = report["results"][0]
  attacks = report["attack"]["attacks"]
  return dict(tree=tree, wall_s=wall, cpu_s=cpu, clean_accuracy=row["clean_accuracy"],
              robust_accuracy=row["robust_accuracy"],
              accuracy_after=row["robust_accuracy_after"],
              seconds={a["name"]: a.get("seconds") for a in attacks},
              rows_attacked={a["name"]: a.get("rows_attacked") for a in attacks},
              report_wall_s=report.get("wall_time_s"), warnings=report.get("warnings", []))


def run_public(torch_python: str, npz: str, data: str) -> dict:
  """The torch side as a fresh process in the torch venv; its wall time and figures."""
  cmd = [torch_python, os.path.abspath(__file__), "--side=torch", f"--npz={npz}",
         f"--data={data}"]
  proc, wall, cpu = _timed(cmd, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  if proc.returncode:
    raise RuntimeError(f"the torch side failed:\n{proc.stderr[-3000:]}")
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  if "error" in out:
    raise RuntimeError(out["error"])
  out.update(wall_s=wall, cpu_s=cpu)
  return out


def cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def table(record: dict) -> str:
  """The printed comparison: accuracies, wall times and per-attack seconds (rows attacked)."""
  cols = [("public (torchattacks)", record.get("public"))] + [
      (f"ours: {name.replace('_', ' ')}", record.get(name))
      for name in ("after", "after_warm_cache", "before") if record.get(name)]
  cols = [(n, c) for n, c in cols if c]
  lines = ["| | " + " | ".join(n for n, _ in cols) + " |",
           "| --- |" + " --- |" * len(cols)]

  def line(label, fn):
    lines.append(f"| {label} | " + " | ".join(fn(c) for _, c in cols) + " |")
  line("clean accuracy", lambda c: f"{100 * c['clean_accuracy']:.2f}%")
  line("robust accuracy", lambda c: f"{100 * c['robust_accuracy']:.2f}%")
  line("wall time (start-up, compilation included)", lambda c: f"{c['wall_s']:.1f} s")
  line("CPU time (user + system)", lambda c: f"{c['cpu_s']:.1f} s")
  keys = {"APGD-CE": "apgd-ce", "APGD-T": "apgd-t", "FAB-T": "fab-t", "Square": "square"}
  for name in ATTACKS:
    def cell(c, name=name):
      k = name if name in c["seconds"] else keys[name]
      s, r = c["seconds"].get(k), c["rows_attacked"].get(k)
      return "-" if s is None else f"{s:.1f} s ({r} rows)"
    line(name, cell)
  pub = record.get("public")
  if pub:
    line("wall time / public", lambda c: f"{c['wall_s'] / pub['wall_s']:.2f}")
    line("CPU time / public", lambda c: f"{c['cpu_s'] / pub['cpu_s']:.2f}")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--side", default="jax", choices=("jax", "torch"), help=argparse.SUPPRESS)
  p.add_argument("--npz", help=argparse.SUPPRESS)
  p.add_argument("--data", help=argparse.SUPPRESS)
  p.add_argument("--check_only", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "bench_autoattack"),
                 help="digits workdir: reused when it holds a checkpoint, else trained")
  p.add_argument("--num_examples", type=int, default=360, help="first N digits test images")
  p.add_argument("--base", default=None, help="another checkout to time too (e.g. before)")
  p.add_argument("--torch_python", default=os.path.join(ROOT, ".venv-timm", "bin", "python"))
  p.add_argument("--skip_public", action="store_true", help="only our side(s)")
  p.add_argument("--no_warm", action="store_true",
                 help="skip the second run of this tree that finds its compiled programs in the "
                      "persistent compilation cache the first (cold) run filled")
  p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "autoattack.jsonl"))
  args = p.parse_args(argv)
  if args.side == "torch":
    torch_side(args)
    return
  if args.num_examples < 1:
    print(f"--num_examples={args.num_examples}: must be >= 1", file=sys.stderr)
    sys.exit(2)
  if not args.skip_public and not os.path.exists(args.torch_python):
    print(f"--torch_python={args.torch_python} does not exist (the torch + timm + torchattacks "
          "venv)", file=sys.stderr)
    sys.exit(2)
  workdir = os.path.abspath(args.workdir)
  ensure_workdir(workdir)
  prep_dir = os.path.join(workdir, "bench_autoattack")
  os.makedirs(prep_dir, exist_ok=True)
  npz, data = prepare(workdir, args.num_examples, prep_dir)
  record = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), cpu=cpu_model(), cores=os.cpu_count(),
                load_average=os.getloadavg(), workdir=workdir, num_examples=args.num_examples,
                eps=EPS, norm="linf")
  steps = [] if args.skip_public else [("public", lambda: run_public(args.torch_python, npz,
                                                                      data))]
  cache_dir = tempfile.mkdtemp(prefix="adv_soups_xla_")  # empty: the first run is cold
  steps.append(("after", lambda: run_ours(ROOT, workdir, args.num_examples, cache_dir)))
  if not args.no_warm:
    steps.append(("after_warm_cache", lambda: run_ours(ROOT, workdir, args.num_examples,
                                                       cache_dir)))
  if args.base:
    steps.append(("before", lambda: run_ours(os.path.abspath(args.base), workdir,
                                             args.num_examples)))
  try:
    for name, run in steps:  # each result printed when it comes (a long run keeps what it has)
      record[name] = run()
      print(f"{name}: " + json.dumps({k: v for k, v in record[name].items() if k != "robust"}),
            flush=True)
  finally:  # also when a side fails
    shutil.rmtree(cache_dir, ignore_errors=True)
  record["load_average_end"] = os.getloadavg()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "a") as f:
    public = record.get("public", {})
    f.write(json.dumps(dict(record, public={k: v for k, v in public.items() if k != "robust"}))
            + "\n")
  print(table(record))


if __name__ == "__main__":
  main()
