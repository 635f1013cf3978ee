"""The train step: `make_train_step(config, model, optimizer, mesh)` -> jitted `(state, batch) ->
(state, metrics)`.

Parallelism ("the pmap'd PGD inside the jitted step", in current JAX): the train step is one
`jax.jit` over a `Mesh` with a `data` axis; the batch is sharded `P('data')`, the state replicated.
PGD is per example, so XLA runs it on each device's shard with no communication; the only
collective is the gradient all-reduce XLA inserts for the replicated parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from adv_soups import parallel
from adv_soups import threats as threats_lib
from adv_soups.data import mixup as mixup_lib
from adv_soups.training import threat_rows
from adv_soups.training.state import TrainState, stop_frozen_gradients


def attack_schedule(attack: ml_collections.ConfigDict, step: jax.Array) -> tuple[Any, Any]:
  """(eps, step_size) of the training attack at `step` (completed steps, int32 []): with
  attack.eps_warmup_steps = W > 0 both are scaled by min(1, step / W), so the first step is
  clean and step W + 1 has the full eps; with W = 0, the configured floats, unchanged."""
  return threat_rows.schedule(attack, step)  # the same ramp, one threat


def make_train_step(config: ml_collections.ConfigDict, model, optimizer, mesh):
  """The jitted step `(state, batch) -> (state, metrics)` for `config.train.mode`.

  `batch`: {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}, sharded over `data`.
  cotrain: loss = clean_weight * CE(f(x, 0), y) + the sum over the threats (`config.threats`, or
  the one threat of `config.attack`) of each one's weighted objective in its own domain i: CE of
  x_adv_i crafted by PGD against domain i, or TRADES (CE(f(x, i), y) + beta KL(f(x, i) ||
  f(x_adv_i, i)) with x_adv_i maximising the KL), all under the current (frozen) parameters.
  Every row (clean, and per threat its adversarial and, for TRADES, its clean row) runs in one
  batch of B x R rows, stacked per example so each device keeps its own examples
  (`threat_rows`). With one CE threat this is the two-domain step: clean_weight * CE(f(x, 0), y)
  + adv_weight * CE(f(x_adv, 1), y). adversarial: the one threat's objective in domain 0 only.
  clean: CE on x only.
  With data.mixup on, x is first mixed (`adv_soups.data.mixup`) and every CE, PGD's included,
  uses the soft targets (our choice; the paper is silent): all branches see the same mixed
  images; train accuracies then compare with each example's own label. With a threat's
  eps_warmup_steps, its eps and step size follow `threat_rows.schedule`, logged as attack_eps
  and adv_perturbation (the largest per-example perturbation norm of the batch; suffixed with
  the threat's name when there are several).
  """
  mode = config.train.mode
  smoothing = config.train.label_smoothing
  num_classes = config.model.num_classes
  ema_decay = config.optimizer.ema_decay
  clean_weight = float(config.train.clean_weight)
  threats = threats_lib.normalise(config)  # resolved: step sizes filled
  if mode == "adversarial" and not threats_lib.has_threats(config):
    for threat in threats.values():  # the one-threat adversarial mode never used adv_weight
      threat["weight"] = 1.0
  rows = None if mode == "clean" else threat_rows.layout(threats, cotrain=mode == "cotrain")
  names = list(threats)
  mix = config.data.get("mixup")
  mix = mix.to_dict() if mixup_lib.enabled(mix) else None

  def step_fn(state: TrainState, batch):
    images, labels = batch["image"], batch["label"]
    size = labels.shape[0]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    attack_rng, dropout_rng = jax.random.split(rng)
    attack_labels = labels
    if mix is not None:  # attack_labels: soft targets [B, K], label smoothing included
      images, attack_labels, _ = mixup_lib.mix_batch(
          jax.random.fold_in(rng, 1), images, labels, num_classes=num_classes,
          smoothing=smoothing, **mix)
      soft_targets = attack_labels
    else:
      soft_targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    adversarial = []
    if rows is None:
      inputs, domains = images, jnp.zeros_like(labels)
    else:
      frozen = jax.lax.stop_gradient(state.params)

      def logits_fn_of(domain):
        return lambda x: model.apply({"params": frozen}, x,
                                     jnp.full(x.shape[:1], domain, jnp.int32), train=False)
      adversarial = threat_rows.craft(logits_fn_of, images, attack_labels, attack_rng, threats,
                                      state.step, rows)
      inputs = threat_rows.stack_rows(images, adversarial, rows)
      domains = threat_rows.row_domains(rows, size)

    def loss_fn(params):
      params = stop_frozen_gradients(params, config.train.get("trainable", "all"))
      logits = model.apply({"params": params}, inputs, domains, train=True,
                           rngs={"dropout": dropout_rng})
      if rows is None:
        per_example = optax.softmax_cross_entropy(logits, soft_targets)
        return jnp.sum(per_example) / size, (logits, {"clean": per_example})
      loss, parts = threat_rows.losses(logits, soft_targets, rows, threats, clean_weight)
      return loss, (logits, parts)

    (loss, (logits, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    num_rows = 1 if rows is None else rows.num_rows
    correct = (jnp.argmax(logits, -1).reshape(size, num_rows) == labels[:, None]).astype(
        jnp.float32)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if mode == "cotrain":
      adv_rows = [adv for _, adv in rows.threat_rows]
      metrics.update(clean_loss=parts["clean"].mean(),
                     adv_loss=jnp.mean(jnp.stack([parts[n].mean() for n in names])),
                     clean_train_accuracy=correct[:, 0].mean(),
                     adv_train_accuracy=correct[:, adv_rows].mean())
      if len(names) > 1:
        for name, r in zip(names, adv_rows):
          metrics[f"adv_loss_{name}"] = parts[name].mean()
          metrics[f"adv_train_accuracy_{name}"] = correct[:, r].mean()
    elif mode == "adversarial":
      metrics["train_accuracy"] = correct[:, rows.threat_rows[0][1]].mean()
    else:
      metrics["train_accuracy"] = correct.mean()
    for i, (name, threat) in enumerate(threats.items()):
      if not threat.get("eps_warmup_steps") or not adversarial:
        continue
      suffix = f"_{name}" if len(names) > 1 else ""
      eps, _ = threat_rows.schedule(threat, state.step)
      delta = adversarial[i] - images
      norms = jnp.sqrt(jnp.sum(delta * delta, axis=(1, 2, 3))) if threat["norm"] == "l2" else \
          jnp.max(jnp.abs(delta), axis=(1, 2, 3))
      metrics[f"attack_eps{suffix}"] = jnp.asarray(eps, jnp.float32)
      metrics[f"adv_perturbation{suffix}"] = jnp.max(norms)
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    if ema is not None:
      metrics["finite"] &= jnp.isfinite(optax.tree.norm(ema))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
