"""Clean, robust and distribution-shift accuracy of a trained model.

Library part: `model_logits_fn`, `clean_accuracy`, `evaluate_during_training`. Command line
(`python -m adv_soups.evaluate`) below them.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adv_soups import data as data_lib
from adv_soups import parallel
from adv_soups.attacks import robust_accuracy


@functools.lru_cache(maxsize=16)
def model_logits_fn(model) -> Any:
  """`fn(params, images [B,H,W,C], domain) -> logits [B, K]` for `model`, one object per model so
  that compiled attacks and evaluations are cached across calls."""
  def fn(params, images, domain):
    return model.apply({"params": params}, images, domain, train=False)
  return fn


@functools.lru_cache(maxsize=16)
def _compiled_correct(model, mesh):
  logits_fn = model_logits_fn(model)
  batch = parallel.batch_sharding(mesh)

  def correct(params, images, labels, domain):
    return jnp.argmax(logits_fn(params, images, domain), -1) == labels

  return jax.jit(correct, in_shardings=(parallel.replicated(mesh), batch, batch, batch),
                 out_shardings=batch)


def clean_accuracy(model, params: Any, batches: Iterable[dict], domain: Any, mesh=None) -> float:
  """Top-1 accuracy (fraction) over `batches` ({'image', 'label', 'mask'} numpy dicts, b a
  multiple of the device count) with `domain`: an int or float mixing weights [num_domains]."""
  mesh = mesh or parallel.make_mesh()
  correct_fn = _compiled_correct(model, mesh)
  params = jax.device_put(params, parallel.replicated(mesh))
  hits = total = 0
  for batch in batches:
    size = len(batch["label"])
    dom = _per_example_domain(domain, size)
    correct = correct_fn(params, *parallel.shard_batch(mesh, (batch["image"], batch["label"], dom)))
    mask = batch.get("mask", np.ones(size, bool))
    hits += int(np.sum(np.asarray(correct) & mask))
    total += int(np.sum(mask))
  return hits / max(total, 1)


def _per_example_domain(domain: Any, size: int) -> np.ndarray:
  domain = np.asarray(domain)
  if domain.ndim == 0:
    return np.full((size,), int(domain), np.int32)
  return np.broadcast_to(domain.astype(np.float32), (size,) + domain.shape).copy()


def with_domain(batches: Iterable[dict], domain: Any) -> Iterable[dict]:
  """Adds a per-example 'domain' (an int, or mixing weights [D] for every example) to batches."""
  for batch in batches:
    yield dict(batch, domain=_per_example_domain(domain, len(batch["label"])))


def evaluate_during_training(config: ml_collections.ConfigDict, model, params: Any,
                             mesh=None) -> dict[str, float]:
  """The periodic evaluation on the held-out split: clean accuracy of domain 0 (the clean mode)
  and PGD-k robust accuracy (k = config.eval.attack_steps) of the adversarial domain."""
  adv_domain = 1 if config.model.num_domains > 1 else 0
  batches = lambda: data_lib.eval_batches(
      config.data, split=config.eval.split, batch_size=config.eval.batch_size,
      num_examples=config.eval.num_examples)
  metrics = {"clean_accuracy": clean_accuracy(model, params, batches(), 0, mesh)}
  steps = config.eval.attack_steps
  result = robust_accuracy(
      model_logits_fn(model), with_domain(batches(), adv_domain), params=params,
      eps=config.attack.eps, norm=config.attack.norm, attacks=("pgd",), num_steps=steps,
      mesh=mesh, seed=config.seed)
  if adv_domain:
    metrics["adv_clean_accuracy"] = result.clean_accuracy
  metrics[f"robust_accuracy_pgd{steps}"] = result.robust_accuracy
  return metrics
