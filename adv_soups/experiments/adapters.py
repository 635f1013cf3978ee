"""The paper's adapter comparison and soup curves as one command, over seeds.

  python -m adv_soups.experiments.adapters --config=configs/digits.py --workdir=DIR \
      [--adapters=token,norm] [--seeds=2] [--attack=apgd-ce,apgd-t] [--steps=N] \
      [--num_examples=N] [--only=RUN[,RUN]] [--config.x=...]

For each seed k (config.seed = k, so every run of a seed sees the same data order) and the
config's budget (train.steps, train.batch_size), it trains, each in its own ordinary workdir
DIR/<mode>-<adapter>-seed<k> (so `sweep`, `evaluate` and `loading.load` work on it):

  clean-none-seed<k>         clean-only training (train.mode=clean), a single-domain model
  adversarial-none-seed<k>   adversarial-only training (train.mode=adversarial), single-domain
  cotrain-<adapter>-seed<k>  co-training with each --adapters entry (model.adapter); `none`
                             co-trains one shared model on clean and adversarial examples (no
                             domain-specific parameters, so no soup curve)

Every run is evaluated on the held-out split by the evaluation engine: clean accuracy of the
clean domain (domain 0), robust accuracy under the --attack suite of the robust domain (domain
1; domain 0 for single-domain runs and for the shared `none` model), and for each co-trained
adapter the 11-alpha soup curve (one sweep: alpha 0 is domain 0, alpha 1 is domain 1). Writes
DIR/results.json, DIR/results.md and DIR/adapters.png. A finished run is not retrained and a
finished report (named by its settings) is read back instead of recomputed; an unfinished run
resumes from its checkpoint; --only=NAME[,NAME] runs a subset (one cluster job per run).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import textwrap
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from adv_soups import cli
from adv_soups import preemption
from adv_soups import soups
from adv_soups import training, training_cli
from adv_soups.attacks import suites
from adv_soups.models import ADAPTERS, create_model

SOUP_ALPHAS = tuple(round(i / 10, 10) for i in range(11))
DEFAULT_ADAPTERS = "token,norm"
DEFAULT_ATTACK = "apgd-ce,apgd-t"  # AutoAttack's white-box core; --attack=autoattack: the full
SINGLE_DOMAIN_MODES = ("clean", "adversarial")
TIMING_FILE = "experiment_timing.json"

EXTRA_FLAGS = (
    ("string", "adapters", DEFAULT_ADAPTERS, f"Comma list of co-training adapters, of "
     f"{', '.join(ADAPTERS)} (none: one shared model co-trained on both domains)."),
    ("integer", "seeds", 2, "Seeds per run: config.seed = 0 .. N-1."),
    ("string", "attack", DEFAULT_ATTACK, "Evaluation suite: apgd-ce,apgd-t (white-box core), "
     "autoattack (standard AutoAttack), pgd, ... (see adv_soups.attacks.suites)."),
    ("integer", "steps", None, "Iterations per gradient attack (default: 100 for APGD)."),
    ("integer", "num_examples", None, "Attack the first N held-out examples (default: "
     "config.eval.num_examples, or all)."),
    ("string", "only", "", "Comma list of run names to train and evaluate in this invocation "
     "(e.g. cotrain-token-seed1); the others are only collected when finished."),
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the experiment: train.mode, model.adapter and seed."""
  mode: str
  adapter: str
  seed: int

  @property
  def name(self) -> str:
    return f"{self.mode}-{self.adapter}-seed{self.seed}"

  @property
  def has_soup(self) -> bool:
    return self.mode == "cotrain" and self.adapter != "none"


def parse_adapters(text: str) -> list[str]:
  """'token,norm' -> ['token', 'norm']; ValueError naming an unknown or repeated adapter."""
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  if not items:
    raise ValueError(f"--adapters={text!r} is empty: allowed a comma list of {', '.join(ADAPTERS)}")
  for item in items:
    if item not in ADAPTERS:
      raise ValueError(f"unknown adapter {item!r} in --adapters: allowed {', '.join(ADAPTERS)}")
  if len(set(items)) != len(items):
    raise ValueError(f"--adapters={text!r} names an adapter twice")
  return items


def plan_runs(adapters: Sequence[str], seeds: int) -> list[Run]:
  """The runs, seed by seed: clean-only, adversarial-only, then co-training per adapter."""
  if int(seeds) != seeds or seeds < 1:
    raise ValueError(f"--seeds={seeds} must be an integer >= 1")
  runs = []
  for seed in range(seeds):
    runs += [Run(mode, "none", seed) for mode in SINGLE_DOMAIN_MODES]
    runs += [Run("cotrain", adapter, seed) for adapter in adapters]
  return runs


def select_runs(runs: list[Run], only: str) -> list[Run]:
  """The runs named in `only` ('' = all); ValueError naming an unknown name and the allowed."""
  names = [t.strip() for t in str(only or "").split(",") if t.strip()]
  if not names:
    return list(runs)
  known = {r.name: r for r in runs}
  for n in names:
    if n not in known:
      raise ValueError(f"unknown run {n!r} in --only: allowed {', '.join(known)}")
  return [r for r in runs if r.name in names]


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The resolved config of `run`: `base` (same budget and data) with its seed, mode, adapter."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.seed = int(run.seed)
  config.train.mode = run.mode
  config.model.adapter = run.adapter
  config.model.num_domains = 2 if run.mode == "cotrain" else 1
  return training.resolve_config(config)


def per_domain_params(model_config: ml_collections.ConfigDict, adapter: str) -> int:
  """Domain-specific parameters per domain of a 2-domain model like `model_config` with
  `adapter` (shapes only, nothing is initialised)."""
  cfg = ml_collections.ConfigDict(model_config.to_dict())
  cfg.adapter, cfg.num_domains = adapter, 2
  model = create_model(cfg)
  size = int(cfg.image_size)
  images = jax.ShapeDtypeStruct((1, size, size, int(cfg.get("channels", 3) or 3)), np.float32)
  domain = jax.ShapeDtypeStruct((1,), np.int32)
  shapes = jax.eval_shape(lambda x, d: model.init(jax.random.key(0), x, d), images, domain)
  return soups.count_params(shapes["params"])[1]


def _read_json(path: str) -> Any:
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _write_text(path: str, text: str) -> None:
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(text)


def train_run(run: Run, config: ml_collections.ConfigDict, workdir: str) -> float | None:
  """Trains `run` in `workdir` unless it is finished; returns the training wall time in seconds
  (None when it was already finished). A preempted run exits with status 75 (run it again)."""
  if preemption.is_finished(workdir):
    return None
  start = time.time()
  result = training.train_and_evaluate(config, workdir)
  if result.preempted_at is not None:
    preemption.exit_preempted(workdir, result.preempted_at, config.train.steps,
                              jax.process_index())
  seconds = time.time() - start
  if jax.process_index() == 0:
    _write_text(os.path.join(workdir, TIMING_FILE), json.dumps(dict(train_wall_s=seconds)))
  return seconds


def evaluate_run(run: Run, workdir: str, attack: str, steps: int | None,
                 num_examples: int | None, compute: bool = True) -> dict | None:
  """The run's figures: clean accuracy of domain 0, robust accuracy of the robust domain, the
  soup curve (co-trained adapters) and the parameter counts. A finished report of the same
  settings is read back; otherwise it is computed (None when `compute` is False)."""
  from adv_soups import evaluation  # the engine imports the attack table: late, after flags
  kind = "sweep" if run.has_soup else "eval"
  request = evaluation.make_request(
      workdir, attack=attack, steps=steps, num_examples=num_examples,
      alphas=list(SOUP_ALPHAS) if run.has_soup else None,
      domain=None if run.has_soup else 0)
  path = os.path.join(workdir, kind, request.name(kind) + ".json")
  reused = tf.io.gfile.exists(path)
  if reused:
    report = _read_json(path)
  elif compute:
    report = evaluation.run_request(request, kind=kind, progress=False)
  else:
    return None
  rows = report["results"]
  clean_row = rows[0]  # alpha 0 = domain 0, or the single domain-0 column
  robust_row = rows[-1]  # alpha 1 = domain 1, or the same single column
  total, per_domain = soups.count_params(request.loaded.params)
  out = dict(
      clean_accuracy=clean_row["clean_accuracy"], robust_accuracy=robust_row["robust_accuracy"],
      robust_accuracy_after=robust_row.get("robust_accuracy_after", {}),
      robust_domain=(1 if run.has_soup else 0), clean_of_robust_domain=robust_row["clean_accuracy"],
      total_params=total, per_domain_params=per_domain,
      num_examples=report["num_examples"], attack=report["attack"]["description"],
      attack_names=report["attack"]["names"], eps=report["eps"], norm=report["norm"],
      checkpoint_step=report["checkpoint_step"], report=path, report_reused=reused,
      eval_wall_s=report.get("wall_time_s"))
  if run.has_soup:
    out["soup"] = [dict(alpha=r["alpha"], clean_accuracy=r["clean_accuracy"],
                        robust_accuracy=r["robust_accuracy"]) for r in rows]
  return out


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def _mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value)."""
  arr = np.asarray(values, np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(runs: list[Run], records: dict[str, dict], token_per_domain: int) -> list[dict]:
  """Rows per (mode, adapter), in plan order: parameters, ratio to the token adapter's
  domain-specific parameters, clean / robust accuracy mean and std over the finished seeds, and
  the mean soup curve."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for run in runs:
    groups.setdefault((run.mode, run.adapter), [])
    rec = records.get(run.name)
    if rec and rec.get("figures"):
      groups[(run.mode, run.adapter)].append(rec["figures"])
  rows = []
  for (mode, adapter), figs in groups.items():
    row = dict(mode=mode, adapter=adapter, seeds=len(figs))
    if figs:
      per_domain = figs[0]["per_domain_params"]
      row.update(total_params=figs[0]["total_params"], per_domain_params=per_domain,
                 ratio_to_token=(per_domain / token_per_domain) if per_domain else None)
      for key in ("clean_accuracy", "robust_accuracy"):
        row[key + "_mean"], row[key + "_std"] = _mean_std([f[key] for f in figs])
      if "soup" in figs[0]:
        alphas = [p["alpha"] for p in figs[0]["soup"]]
        row["soup"] = [dict(alpha=a, **{
            f"{k}_{s}": v for k in ("clean_accuracy", "robust_accuracy")
            for s, v in zip(("mean", "std"), _mean_std([f["soup"][i][k] for f in figs]))})
            for i, a in enumerate(alphas)]
    rows.append(row)
  return rows


MODE_TEXT = {"clean": "clean-only", "adversarial": "adversarial-only", "cotrain": "co-training"}


def format_markdown(summary: list[dict], settings: dict) -> str:
  """results.md: the table over seeds and the soup curves, stating the suite and the examples."""
  pct = lambda m, s: f"{100 * m:.1f} +- {100 * s:.1f}"
  lines = [f"# Adapter comparison: {settings['dataset']}, {settings['train_steps']} steps of "
           f"{settings['batch_size']}, seeds 0..{settings['seeds'] - 1}", "",
           f"Attack: {settings['attack']}, {settings['norm']} eps={settings['eps']:g}, on "
           f"{settings['num_examples_text']}. Clean accuracy: clean mode (domain 0); robust "
           "accuracy: robust mode (domain 1; domain 0 of single-domain and shared models). "
           "Mean +- sample std over seeds (n = seeds).", "",
           "| mode | adapter | per-domain params | x token | clean % | robust % | n |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for row in summary:
    if not row["seeds"]:
      lines.append(f"| {MODE_TEXT[row['mode']]} | {row['adapter']} | - | - | pending | "
                   "pending | 0 |")
      continue
    ratio = "-" if row["ratio_to_token"] is None else f"{row['ratio_to_token']:.1f}"
    lines.append(
        f"| {MODE_TEXT[row['mode']]} | {row['adapter']} | {row['per_domain_params']:,} | "
        f"{ratio} | {pct(row['clean_accuracy_mean'], row['clean_accuracy_std'])} | "
        f"{pct(row['robust_accuracy_mean'], row['robust_accuracy_std'])} | {row['seeds']} |")
  soups_rows = [r for r in summary if r.get("soup")]
  if soups_rows:
    lines += ["", "Soup curves (alpha 0 = clean mode, 1 = robust mode; each soup attacked in "
              "its own right), clean % / robust %, mean over seeds:", "",
              "| alpha | " + " | ".join(r["adapter"] for r in soups_rows) + " |",
              "| ---: |" + " ---: |" * len(soups_rows)]
    for i, point in enumerate(soups_rows[0]["soup"]):
      cells = [f"{100 * r['soup'][i]['clean_accuracy_mean']:.1f} / "
               f"{100 * r['soup'][i]['robust_accuracy_mean']:.1f}" for r in soups_rows]
      lines.append(f"| {point['alpha']:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(summary: list[dict], records: dict[str, dict], runs: list[Run], path: str,
         title: str) -> None:
  """adapters.png: clean vs robust accuracy (%), one faint point per run, the mean per (mode,
  adapter) with error bars (std over seeds), and each co-trained adapter's mean soup curve."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, row in enumerate(r for r in summary if r["seeds"]):
    color = colors[i % len(colors)]
    label = f"{MODE_TEXT[row['mode']]}" + (f" ({row['adapter']})" if row["mode"] == "cotrain"
                                           else "")
    if row.get("soup"):
      ax.plot([100 * p["clean_accuracy_mean"] for p in row["soup"]],
              [100 * p["robust_accuracy_mean"] for p in row["soup"]], "-", color=color,
              alpha=0.6, lw=1)
    for run in runs:
      rec = records.get(run.name)
      if (run.mode, run.adapter) == (row["mode"], row["adapter"]) and rec and rec.get("figures"):
        ax.plot(100 * rec["figures"]["clean_accuracy"], 100 * rec["figures"]["robust_accuracy"],
                ".", color=color, alpha=0.4)
    ax.errorbar(100 * row["clean_accuracy_mean"], 100 * row["robust_accuracy_mean"],
                xerr=100 * row["clean_accuracy_std"], yerr=100 * row["robust_accuracy_std"],
                fmt="o", color=color, capsize=3, label=label)
  ax.set_xlabel("clean accuracy % (clean mode)")
  ax.set_ylabel("robust accuracy % (robust mode)")
  ax.set_title(textwrap.fill(title, 80), fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with tf.io.gfile.GFile(path, "wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


def _versions() -> dict:
  import flax
  import optax
  import adv_soups
  return dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
              optax=optax.__version__, numpy=np.__version__,
              adv_soups=getattr(adv_soups, "__version__", "0.1.0"),
              devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def check_experiment(base: ml_collections.ConfigDict, workdir: str, adapters: Sequence[str],
                     seeds: int, attack: str, steps: int | None, num_examples: int | None,
                     only: str = "") -> tuple[list[Run], list[Run], dict[str, Any]]:
  """Validates everything before anything is written or compiled: (all runs, selected runs,
  {run name: resolved config}). ValueError with one line naming the bad value."""
  runs = plan_runs(list(adapters), seeds)
  selected = select_runs(runs, only)
  names = suites.parse_suite(attack)
  if not names:
    raise ValueError(f"--attack={attack!r}: the experiment needs an attack; allowed "
                     f"{suites.allowed_text()}")
  for flag, value in (("steps", steps), ("num_examples", num_examples)):
    if value is not None and (int(value) != value or value < 1):
      raise ValueError(f"--{flag}={value} must be an integer >= 1")
  configs = {}
  for run in runs:
    configs[run.name] = run_config(base, run)
    training.prepare_workdir(configs[run.name], os.path.join(workdir, run.name), overwrite=False)
  return runs, selected, configs


def run_experiment(base: ml_collections.ConfigDict, workdir: str, *,
                   adapters: Sequence[str] = ("token", "norm"), seeds: int = 2,
                   attack: str = DEFAULT_ATTACK, steps: int | None = None,
                   num_examples: int | None = None, only: str = "",
                   argv: Sequence[str] | None = None) -> dict:
  """Trains and evaluates the experiment's runs (see the module docstring) and writes
  results.json, results.md and adapters.png into `workdir`; returns the results dict."""
  start = time.time()
  runs, selected, configs = check_experiment(base, workdir, adapters, seeds, attack, steps,
                                             num_examples, only)
  tf.io.gfile.makedirs(workdir)
  records: dict[str, dict] = {}
  durations: list[float] = []  # runs that did work in this invocation (for the ETA)
  for k, run in enumerate(selected, 1):
    t0 = time.time()
    run_dir = os.path.join(workdir, run.name)
    trained = train_run(run, configs[run.name], run_dir)
    figures = evaluate_run(run, run_dir, attack, steps, num_examples)
    if trained is not None or not figures["report_reused"]:
      durations.append(time.time() - t0)
    records[run.name] = dict(figures=figures, trained_now=trained is not None)
    left = len(selected) - k
    eta = _duration(left * np.mean(durations)) if durations else "0m00s" if not left else "?"
    what = (f"trained in {trained:.0f} s" if trained is not None else "already trained")
    what += ", report reused" if figures["report_reused"] else (
        f", evaluated in {figures['eval_wall_s']:.0f} s")
    print(f"[{k}/{len(selected)}] run {run.name} done ({what}): clean "
          f"{100 * figures['clean_accuracy']:.1f}%, robust {100 * figures['robust_accuracy']:.1f}%"
          f"; ETA {eta}", file=sys.stderr, flush=True)
  for run in runs:  # the others: collected when another invocation finished them
    if run.name in records:
      continue
    run_dir = os.path.join(workdir, run.name)
    figures = None
    if preemption.is_finished(run_dir):
      figures = evaluate_run(run, run_dir, attack, steps, num_examples, compute=False)
    records[run.name] = dict(figures=figures, trained_now=False)
  for run in runs:
    rec = records[run.name]
    rec.update(name=run.name, mode=run.mode, adapter=run.adapter, seed=run.seed,
               workdir=os.path.join(workdir, run.name),
               status="done" if rec["figures"] else "pending")
    timing = os.path.join(workdir, run.name, TIMING_FILE)
    rec["train_wall_s"] = (_read_json(timing)["train_wall_s"] if tf.io.gfile.exists(timing)
                           else None)
  first = next(iter(configs.values()))
  token = per_domain_params(first.model, "token")
  summary = summarize(runs, records, token)
  done = [r["figures"] for r in records.values() if r["figures"]]
  n = sorted({f["num_examples"] for f in done})
  settings = dict(
      dataset=first.data.name, split=first.eval.get("split", None) or "held-out (eval split)",
      train_steps=int(first.train.steps), batch_size=int(first.train.batch_size),
      seeds=int(seeds), adapters=list(adapters), attack=(done[0]["attack"] if done else attack),
      attack_flag=attack, attack_steps=steps, eps=float(first.attack.eps),
      norm=first.attack.norm, num_examples_flag=num_examples, num_examples=n,
      num_examples_text=(f"the first {n[0]} held-out examples" if len(n) == 1 else
                         f"{n} held-out examples"), alphas=list(SOUP_ALPHAS),
      token_per_domain_params=token, argv=list(argv) if argv else None,
      config=json.loads(first.to_json_best_effort()))
  results = dict(settings=settings, versions=_versions(), runs=[records[r.name] for r in runs],
                 summary=summary, wall_time_s=time.time() - start,
                 train_wall_s_total=sum(r["train_wall_s"] or 0 for r in records.values()),
                 eval_wall_s_total=sum(f["eval_wall_s"] or 0 for f in done))
  if jax.process_index() > 0:  # process 0 writes the outputs
    return results
  _write_text(os.path.join(workdir, "results.json"), json.dumps(results, indent=1) + "\n")
  _write_text(os.path.join(workdir, "results.md"), format_markdown(summary, settings))
  plot(summary, records, runs, os.path.join(workdir, "adapters.png"),
       f"{settings['dataset']}: {settings['attack']}, eps {settings['eps']:g}, "
       f"{settings['num_examples_text']}")
  print(f"wrote {workdir}/results.json, results.md, adapters.png "
        f"({_duration(time.time() - start)})", file=sys.stderr, flush=True)
  return results


def main(argv: list[str] | None = None) -> dict:
  """Parses the flags (one line and exit 2 on bad input, nothing written), then runs."""
  argv = list(sys.argv if argv is None else argv)
  values = training_cli.define_flags(EXTRA_FLAGS)
  _, workdir = training_cli.parse_command_line(argv, values)
  if values.overwrite:
    cli.fail("--overwrite is not supported by the experiment: use a new --workdir")
  try:
    adapters = parse_adapters(values.adapters)
    base = values.config
    runs, _, _ = check_experiment(base, workdir, adapters, values.seeds, values.attack,
                                  values.steps, values.num_examples, values.only)
  except ValueError as e:
    cli.fail(str(e))
  training_cli.quiet_logging()  # the same logs as train
  return run_experiment(base, workdir, adapters=adapters, seeds=values.seeds,
                        attack=values.attack, steps=values.steps,
                        num_examples=values.num_examples, only=values.only, argv=argv[1:])


if __name__ == "__main__":
  main()
