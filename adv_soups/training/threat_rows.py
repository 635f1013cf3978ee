"""Multi-threat co-training as rows of one batch: which inputs, in which domain, with which loss.

Domain 0 is clean and domain i the i-th threat (`adv_soups.threats`). For a batch of B images the
step runs B x R rows through the model at once, stacked per example on a new axis (each device
keeps its own examples: no data moves between devices):

  row 0                      x       in domain 0                          CE, weight train.clean_weight
  threat i with loss "ce"    x_adv_i in domain i                          CE, weight threat.weight
  threat i with "trades"     x in domain i, then x_adv_i in domain i      w * (CE(x) + beta KL(x || x_adv_i))

x_adv_i is crafted against domain i's own adapter with the threat's own norm, eps, steps and step
size (eps warm-up included): PGD on the cross-entropy for "ce", TRADES' KL attack for "trades"
(`attacks/trades.py`). Every attack is per example (no collective in any attack loop). The random
starts of threat i use `fold_in(rng, i)` (threat 0 uses `rng` itself, so a one-threat run keeps
the keys of the two-domain step it generalises).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from adv_soups.attacks import trades as trades_lib
from adv_soups.attacks.pgd import pgd

CLEAN = 0


@dataclasses.dataclass(frozen=True)
class Layout:
  """The rows of one example: `domains[r]` is row r's domain; `sources[r]` is -1 for the clean
  image and i for threat i's adversarial image; `threat_rows[i]` = (clean row or None, adversarial
  row) of threat i."""
  domains: tuple[int, ...]
  sources: tuple[int, ...]
  threat_rows: tuple[tuple[int | None, int], ...]
  cotrain: bool = True  # row 0 is the clean image in domain 0

  @property
  def num_rows(self) -> int:
    return len(self.domains)


def layout(threats: Mapping[str, dict], cotrain: bool = True) -> Layout:
  """The row layout of `threats` (in domain order; see the module docstring). `cotrain=False`
  (mode "adversarial": a one-domain model) drops the clean row 0 and puts every row in domain 0."""
  domains, sources, threat_rows = ([CLEAN], [-1], []) if cotrain else ([], [], [])
  for i, threat in enumerate(threats.values()):
    domain = i + 1 if cotrain else CLEAN
    clean_row = None
    if threat["loss"] == "trades":
      clean_row = len(domains)
      domains.append(domain)
      sources.append(-1)
    threat_rows.append((clean_row, len(domains)))
    domains.append(domain)
    sources.append(i)
  return Layout(tuple(domains), tuple(sources), tuple(threat_rows), cotrain)


def schedule(threat: dict, step: jax.Array) -> tuple[Any, Any]:
  """(eps, step_size) of a threat's training attack at `step` (completed steps): both scaled by
  min(1, step / eps_warmup_steps) when that is > 0; the configured floats otherwise."""
  warmup = threat.get("eps_warmup_steps", 0) or 0
  if not warmup:
    return threat["eps"], threat["step_size"]
  scale = jnp.minimum(1.0, step.astype(jnp.float32) / warmup)
  return threat["eps"] * scale, threat["step_size"] * scale


def craft(logits_fn_of: Callable[[int], Callable], images: jax.Array, attack_labels: jax.Array,
          rng: jax.Array, threats: Mapping[str, dict], step: jax.Array, rows: Layout
          ) -> list[jax.Array]:
  """One adversarial batch per threat, each against its own domain's adapter.

  Args:
    logits_fn_of: domain d -> `fn(images [B, H, W, C]) -> logits [B, K]` of the model in domain d
      (parameters closed over, held fixed).
    images: [B, H, W, C] in [0, 1]; attack_labels: int [B] or soft targets [B, K] (mixup).
    rng: the step's attack key; threats: `threats.normalise` output with step sizes filled.
    step: completed steps (int32 []), for the eps warm-up; rows: `layout(threats, ...)`.
  Returns:
    [x_adv_i [B, H, W, C] for each threat], in domain order.
  """
  out = []
  for i, threat in enumerate(threats.values()):
    key = rng if i == 0 else jax.random.fold_in(rng, i)
    fn = logits_fn_of(rows.domains[rows.threat_rows[i][1]])
    eps, step_size = schedule(threat, step)
    if threat["loss"] == "trades":
      out.append(trades_lib.kl_attack(fn, images, key, eps=eps, num_steps=threat["num_steps"],
                                      step_size=step_size, norm=threat["norm"]))
    else:
      out.append(pgd(fn, images, attack_labels, key, eps=eps, num_steps=threat["num_steps"],
                     step_size=step_size, norm=threat["norm"]))
  return out


def stack_rows(images: jax.Array, adversarial: list[jax.Array], rows: Layout) -> jax.Array:
  """The model's input [B * R, H, W, C], example-major (row r of example b at b * R + r)."""
  sources = [images if s < 0 else adversarial[s] for s in rows.sources]
  stacked = jnp.stack(sources, axis=1)
  return stacked.reshape((-1,) + images.shape[1:])


def row_domains(rows: Layout, batch_size: int) -> jax.Array:
  """int32 [B * R]: each row's domain, matching `stack_rows`."""
  return jnp.tile(jnp.asarray(rows.domains, jnp.int32), batch_size)


def losses(logits: jax.Array, targets: jax.Array, rows: Layout, threats: Mapping[str, dict],
           clean_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The co-training objective of one batch and its parts.

  Args:
    logits: [B * R, K] of the rows of `stack_rows`; targets: soft targets [B, K] (one-hot,
      smoothed or mixup's).
  Returns:
    (loss [] = sum over examples and terms / B, parts): parts['clean'] [B] is CE of row 0 (in
    co-training) and parts[name] [B] threat name's unweighted objective (CE of x_adv_i, or
    TRADES' CE + beta KL).
  """
  size, num_classes = targets.shape
  logits = logits.reshape(size, rows.num_rows, num_classes)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  ce = -jnp.sum(targets[:, None, :].astype(jnp.float32) * log_probs, axis=-1)  # [B, R]
  row_weight = [0.0] * rows.num_rows
  parts = {}
  if rows.cotrain:
    row_weight[0] = clean_weight
    parts["clean"] = ce[:, 0]
  extra = jnp.zeros((size,), jnp.float32)
  for (name, threat), (clean_row, adv_row) in zip(threats.items(), rows.threat_rows):
    if clean_row is None:
      row_weight[adv_row] = threat["weight"]
      parts[name] = ce[:, adv_row]
    else:
      objective = trades_lib.trades_loss(logits[:, clean_row], logits[:, adv_row], targets,
                                         threat["beta"])
      parts[name] = objective
      extra = extra + threat["weight"] * objective
  total = jnp.sum(ce * jnp.asarray(row_weight, jnp.float32)) + jnp.sum(extra)
  return total / size, parts
