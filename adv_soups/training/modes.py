"""The training modes as a table: `config.train.mode` names an entry of `MODES`, which says how the
train step builds the rows the model sees (inputs, domains, targets, weights), the loss on their
logits, and the mode's own train metrics. A new mode or loss (TRADES, multi-threat co-training,
...) is one entry, registered with `register` (from any module, a test included).

The step calls, inside its jitted body: `rows = mode.rows(inputs)`, then in the differentiated
function `loss, aux = mode.loss(logits, rows, inputs)` (default: sum(CE per row * rows.weights) /
B, B = images drawn from the data, aux = the per-row CE), then `mode.metrics(aux, correct, rows,
inputs)` with correct [R] = argmax(logits) == rows.targets.
Rows are example-major: row r belongs to image r // (R / B), so a per-image quantity (mixup's soft
targets) repeats R / B times.

This module imports JAX only (no TensorFlow), so `training.config` can check mode names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from adv_soups import threats as threats_lib
from adv_soups.training import threat_rows

CLEAN, ADVERSARIAL = 0, 1


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """What a mode builds its rows from (inside the jitted step; B images drawn from the data).

  images: float32 [B, H, W, C] in [0, 1] (already mixed when data.mixup is on).
  labels: int32 [B], each image's own label.
  soft_targets: float32 [B, K], mixup's soft targets (label smoothing included); None without mixup.
  attack_labels: what the training attack maximises its loss against: `soft_targets` when mixup is
    on, else `labels`.
  craft: `craft(images [b, H, W, C], targets, domain=None, **pgd_overrides) -> x_adv` (same shape):
    PGD under the step's current parameters (gradient stopped) with config.attack's settings (eps
    and step size after the warm-up schedule) against `domain` (default: the adversarial domain,
    1 with two domains, else 0); `pgd_overrides` replace any keyword of `attacks.pgd.pgd`.
  config: the resolved config; num_classes and smoothing: config.model.num_classes and
    config.train.label_smoothing.
  logits_fn_of: domain d -> `fn(images [b, H, W, C]) -> logits [b, K]` of the model in domain d
    under the step's parameters (gradient stopped), for attacks other than `craft`'s PGD.
  attack_rng: the step's attack key; step: completed steps (int32 []), for eps warm-ups.
  """
  images: jax.Array
  labels: jax.Array
  soft_targets: jax.Array | None
  attack_labels: jax.Array
  craft: Callable[..., jax.Array]
  config: ml_collections.ConfigDict
  num_classes: int
  smoothing: float
  logits_fn_of: Callable[[int], Callable[[jax.Array], jax.Array]] | None = None
  attack_rng: jax.Array | None = None
  step: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Rows:
  """The batch the model sees: R = k * B rows, example-major.

  inputs: float32 [R, H, W, C]; domains: int32 [R] (or mixing weights [R, D]); targets: int32 [R]
  (the label each row is scored against); weights: float32 [R], each row's weight in the default
  loss (None for a mode with its own loss that needs none); x_adv: the adversarial images
  [B, H, W, C] when the mode crafts one set (the eps warm-up logs their perturbation size), else
  None; aux: anything else the mode's loss and metrics need (e.g. a row layout).
  """
  inputs: jax.Array
  domains: jax.Array
  targets: jax.Array
  weights: jax.Array | None = None
  x_adv: jax.Array | None = None
  aux: Any = None


def cross_entropy(logits: jax.Array, rows: Rows, inputs: StepInputs) -> jax.Array:
  """Per-row softmax cross-entropy [R]: against the label-smoothed one-hot targets, or with mixup
  against each image's soft targets (repeated R / B times)."""
  if inputs.soft_targets is None:
    one_hot = optax.smooth_labels(jax.nn.one_hot(rows.targets, inputs.num_classes),
                                  inputs.smoothing)
  else:  # already smoothed; one row per input (clean and adversarial interleaved in cotrain)
    one_hot = jnp.repeat(inputs.soft_targets, len(rows.targets) // len(inputs.labels), axis=0)
  return optax.softmax_cross_entropy(logits, one_hot)


def weighted_cross_entropy(logits: jax.Array, rows: Rows,
                           inputs: StepInputs) -> tuple[jax.Array, jax.Array]:
  """The default loss: (sum over rows of CE * rows.weights / B, the per-row CE [R])."""
  per_row = cross_entropy(logits, rows, inputs)
  return jnp.sum(per_row * rows.weights) / inputs.labels.shape[0], per_row


def accuracy_metric(aux: Any, correct: jax.Array, rows: Rows,
                    inputs: StepInputs) -> dict[str, jax.Array]:
  """{'train_accuracy'}: the fraction of rows predicted right."""
  del aux, rows, inputs
  return {"train_accuracy": correct.mean()}


def one_domain(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return ("model",)


@dataclasses.dataclass(frozen=True)
class TrainingMode:
  """One entry of `MODES`.

  rows: StepInputs -> Rows (traced inside the step).
  domains: config -> the names of the model's domains this mode trains, in domain order; one
    name = a single-domain model (`resolve_config` sets model.num_domains = 1); more = the model
    must have exactly that many.
  loss: (logits [R, K], Rows, StepInputs) -> (scalar loss, aux): the loss differentiated and
    anything the metrics need (default `weighted_cross_entropy`; aux = the per-row CE).
  metrics: (aux, correct [R] float, Rows, StepInputs) -> {name: scalar} added to the step's
    metrics (default: train_accuracy).
  description: one line for the README / --help.
  """
  rows: Callable[[StepInputs], Rows]
  domains: Callable[[ml_collections.ConfigDict], tuple[str, ...]] = one_domain
  loss: Callable[[jax.Array, Rows, StepInputs], tuple[jax.Array, Any]] = weighted_cross_entropy
  metrics: Callable[[Any, jax.Array, Rows, StepInputs], dict[str, jax.Array]] = accuracy_metric
  description: str = ""


def adversarial_domain(config: ml_collections.ConfigDict) -> int:
  """The domain whose adapter is attacked and hardened: 1 in cotrain, 0 for one-domain models."""
  return ADVERSARIAL if config.model.num_domains > 1 else CLEAN


# ------------------------------------------------------------------------------------------------
# The paper's three modes.

def _clean_rows(inputs: StepInputs) -> Rows:
  labels = inputs.labels
  return Rows(inputs=inputs.images, domains=jnp.zeros_like(labels), targets=labels,
              weights=jnp.ones((labels.shape[0],), jnp.float32))


def _adversarial_rows(inputs: StepInputs) -> Rows:
  labels = inputs.labels
  x_adv = inputs.craft(inputs.images, inputs.attack_labels)
  return Rows(inputs=x_adv, domains=jnp.zeros_like(labels), targets=labels,
              weights=jnp.ones((labels.shape[0],), jnp.float32), x_adv=x_adv)


def _cotrain_rows(inputs: StepInputs) -> Rows:
  """Clean and adversarial rows interleaved per example (each device keeps its own examples)."""
  images, labels = inputs.images, inputs.labels
  size = labels.shape[0]
  train = inputs.config.train
  x_adv = inputs.craft(images, inputs.attack_labels)
  rows = jnp.stack([images, x_adv], axis=1).reshape((2 * size,) + images.shape[1:])
  domains = jnp.tile(jnp.asarray([CLEAN, ADVERSARIAL], jnp.int32), size)
  targets = jnp.repeat(labels, 2)
  weights = jnp.asarray([train.clean_weight, train.adv_weight], jnp.float32)
  return Rows(inputs=rows, domains=domains, targets=targets, weights=jnp.tile(weights, size),
              x_adv=x_adv)


def _cotrain_metrics(per_row: jax.Array, correct: jax.Array, rows: Rows,
                     inputs: StepInputs) -> dict[str, jax.Array]:
  del rows, inputs
  return dict(clean_loss=per_row[0::2].mean(), adv_loss=per_row[1::2].mean(),
              clean_train_accuracy=correct[0::2].mean(), adv_train_accuracy=correct[1::2].mean())


# ------------------------------------------------------------------------------------------------
# Several threats (`config.threats`), one domain each: the rows of `threat_rows` (CE or TRADES per
# threat, each attack against its own domain). A config without `threats` keeps the modes above.

@dataclasses.dataclass(frozen=True)
class ThreatAux:
  """`Rows.aux` of the threat rows: the row layout, the threats (normalised, step sizes filled)
  and each threat's adversarial images [B, H, W, C], in domain order."""
  layout: threat_rows.Layout
  threats: dict
  adversarial: list


def _threat_rows(inputs: StepInputs, cotrain: bool) -> Rows:
  """B x R rows, example-major (`threat_rows.stack_rows`); targets each image's label."""
  threats = threats_lib.normalise(inputs.config)
  layout = threat_rows.layout(threats, cotrain=cotrain)
  adversarial = threat_rows.craft(inputs.logits_fn_of, inputs.images, inputs.attack_labels,
                                  inputs.attack_rng, threats, inputs.step, layout)
  size = inputs.labels.shape[0]
  return Rows(inputs=threat_rows.stack_rows(inputs.images, adversarial, layout),
              domains=threat_rows.row_domains(layout, size),
              targets=jnp.repeat(inputs.labels, layout.num_rows),
              aux=ThreatAux(layout, threats, adversarial))


def _threat_loss(logits: jax.Array, rows: Rows, inputs: StepInputs) -> tuple[jax.Array, Any]:
  """`threat_rows.losses` against the soft targets (mixup's, or the smoothed one-hot labels);
  aux = its parts ({'clean': [B], name: [B]})."""
  targets = inputs.soft_targets
  if targets is None:
    targets = optax.smooth_labels(jax.nn.one_hot(inputs.labels, inputs.num_classes),
                                  inputs.smoothing)
  return threat_rows.losses(logits, targets, rows.aux.layout, rows.aux.threats,
                            float(inputs.config.train.clean_weight))


def _threat_metrics(parts: dict, correct: jax.Array, rows: Rows,
                    inputs: StepInputs) -> dict[str, jax.Array]:
  """cotrain: clean_loss, adv_loss (mean over threats), clean_train_accuracy,
  adv_train_accuracy, and per threat adv_loss_NAME / adv_train_accuracy_NAME when there are
  several; adversarial: train_accuracy on the adversarial rows. With a threat's eps warm-up:
  attack_eps and adv_perturbation (suffixed _NAME when there are several)."""
  layout, threats = rows.aux.layout, rows.aux.threats
  names = list(threats)
  correct = correct.reshape(inputs.labels.shape[0], layout.num_rows)
  adv_rows = [adv for _, adv in layout.threat_rows]
  if layout.cotrain:
    metrics = dict(clean_loss=parts["clean"].mean(),
                   adv_loss=jnp.mean(jnp.stack([parts[n].mean() for n in names])),
                   clean_train_accuracy=correct[:, 0].mean(),
                   adv_train_accuracy=correct[:, adv_rows].mean())
    if len(names) > 1:
      for name, r in zip(names, adv_rows):
        metrics[f"adv_loss_{name}"] = parts[name].mean()
        metrics[f"adv_train_accuracy_{name}"] = correct[:, r].mean()
  else:
    metrics = {"train_accuracy": correct[:, adv_rows[0]].mean()}
  for i, (name, threat) in enumerate(threats.items()):
    if not threat.get("eps_warmup_steps"):
      continue
    suffix = f"_{name}" if len(names) > 1 else ""
    eps, _ = threat_rows.schedule(threat, inputs.step)
    delta = rows.aux.adversarial[i] - inputs.images
    norms = jnp.sqrt(jnp.sum(delta * delta, axis=(1, 2, 3))) if threat["norm"] == "l2" else \
        jnp.max(jnp.abs(delta), axis=(1, 2, 3))
    metrics[f"attack_eps{suffix}"] = jnp.asarray(eps, jnp.float32)
    metrics[f"adv_perturbation{suffix}"] = jnp.max(norms)
  return metrics


def _with_threats(one_threat: Callable, cotrain: bool) -> Callable[[StepInputs], Rows]:
  """Rows: the threat rows when the config lists `threats`, else the one-threat mode's own."""
  return lambda inputs: (_threat_rows(inputs, cotrain)
                         if threats_lib.has_threats(inputs.config) else one_threat(inputs))


def _threat_loss_or(one_threat: Callable) -> Callable:
  return lambda logits, rows, inputs: (_threat_loss(logits, rows, inputs)
                                       if isinstance(rows.aux, ThreatAux)
                                       else one_threat(logits, rows, inputs))


def _threat_metrics_or(one_threat: Callable) -> Callable:
  return lambda aux, correct, rows, inputs: (_threat_metrics(aux, correct, rows, inputs)
                                             if isinstance(rows.aux, ThreatAux)
                                             else one_threat(aux, correct, rows, inputs))


def cotrain_domains(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """('clean', 'adversarial'), or with `config.threats` ('clean', then the threats in order)."""
  if threats_lib.has_threats(config):
    return ("clean",) + tuple(threats_lib.names(config))
  return ("clean", "adversarial")


MODES: dict[str, TrainingMode] = {
    "cotrain": TrainingMode(
        rows=_with_threats(_cotrain_rows, cotrain=True), domains=cotrain_domains,
        loss=_threat_loss_or(weighted_cross_entropy),
        metrics=_threat_metrics_or(_cotrain_metrics),
        description="clean_weight * CE(f(x, 0), y) + adv_weight * CE(f(x_adv, 1), y), x_adv from "
                    "PGD against domain 1; with config.threats, domain i per threat i, each with "
                    "its own attack and loss (CE or TRADES)"),
    "adversarial": TrainingMode(
        rows=_with_threats(_adversarial_rows, cotrain=False),
        loss=_threat_loss_or(weighted_cross_entropy), metrics=_threat_metrics_or(accuracy_metric),
        description="CE(f(x_adv), y), one domain (Madry et al.); with one config.threats entry, "
                    "its attack and loss (CE or TRADES)"),
    "clean": TrainingMode(rows=_clean_rows, description="CE(f(x), y), one domain"),
}


def register(name: str, mode: TrainingMode) -> TrainingMode:
  """Adds `mode` to `MODES` under `name` (ValueError if the name is taken); returns it."""
  if name in MODES:
    raise ValueError(f"training mode {name!r} is already registered")
  MODES[name] = mode
  return mode


def get(name: str) -> TrainingMode:
  """The entry of `name`; ValueError naming the allowed modes."""
  if name not in MODES:
    raise ValueError(f"unknown config.train.mode {name!r}: allowed {list(MODES)}")
  return MODES[name]


def num_domains(config: ml_collections.ConfigDict) -> int:
  """How many domains the model of `config.train.mode` has."""
  return len(get(config.train.mode).domains(config))


def describe_domains(names: tuple[str, ...] | list[str]) -> str:
  """('clean', 'adversarial') -> '0 = clean, 1 = adversarial'."""
  return ", ".join(f"{i} = {n}" for i, n in enumerate(names))


__all__ = ["ADVERSARIAL", "CLEAN", "MODES", "Rows", "StepInputs", "ThreatAux", "TrainingMode",
           "accuracy_metric", "adversarial_domain", "cotrain_domains", "cross_entropy",
           "describe_domains", "get",
           "num_domains", "register", "weighted_cross_entropy"]
