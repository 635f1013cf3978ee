"""Stage 3 of the adapter experiment: the numbers. Per (mode, adapter): parameter counts, the ratio
to the token adapter, clean / robust accuracy mean and sample std over the finished seeds, the
mean soup curve; and the results dict that `render` writes (settings, versions, runs, summary)."""
from __future__ import annotations

import json
import platform
from typing import Sequence

import jax
import ml_collections
import numpy as np

from adv_soups import soups
from adv_soups.experiments.plan import SOUP_ALPHAS, Run
from adv_soups.models import create_model


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


def _versions() -> dict:
  import flax
  import optax
  import adv_soups
  return dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
              optax=optax.__version__, numpy=np.__version__,
              adv_soups=getattr(adv_soups, "__version__", "0.1.0"),
              devices=f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def aggregate(runs: Sequence[Run], records: dict[str, dict], config: ml_collections.ConfigDict, *,
              seeds: int, adapters: Sequence[str], attack: str, steps: int | None,
              num_examples: int | None, argv: Sequence[str] | None = None,
              wall_time_s: float = 0.0) -> dict:
  """The results dict of the experiment from the per-run `records` (as `run.collect` returns or
  results.json stores them) and the first run's resolved `config` (data, budget, attack)."""
  token = per_domain_params(config.model, "token")
  summary = summarize(list(runs), records, token)
  done = [r["figures"] for r in records.values() if r["figures"]]
  n = sorted({f["num_examples"] for f in done})
  settings = dict(
      dataset=config.data.name, split=config.eval.get("split", None) or "held-out (eval split)",
      train_steps=int(config.train.steps), batch_size=int(config.train.batch_size),
      seeds=int(seeds), adapters=list(adapters), attack=(done[0]["attack"] if done else attack),
      attack_flag=attack, attack_steps=steps, eps=float(config.attack.eps),
      norm=config.attack.norm, num_examples_flag=num_examples, num_examples=n,
      num_examples_text=(f"the first {n[0]} held-out examples" if len(n) == 1 else
                         f"{n} held-out examples"), alphas=list(SOUP_ALPHAS),
      token_per_domain_params=token, argv=list(argv) if argv else None,
      config=json.loads(config.to_json_best_effort()))
  return dict(settings=settings, versions=_versions(), runs=[records[r.name] for r in runs],
              summary=summary, wall_time_s=wall_time_s,
              train_wall_s_total=sum(r["train_wall_s"] or 0 for r in records.values()),
              eval_wall_s_total=sum(f["eval_wall_s"] or 0 for f in done))
