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
from adv_soups.attacks.pgd import pgd
from adv_soups.data import mixup as mixup_lib
from adv_soups.training import modes as modes_lib
from adv_soups.training.state import TrainState, stop_frozen_gradients


def attack_schedule(attack: ml_collections.ConfigDict, step: jax.Array) -> tuple[Any, Any]:
  """(eps, step_size) of the training attack at `step` (completed steps, int32 []): with
  attack.eps_warmup_steps = W > 0 both are scaled by min(1, step / W), so the first step is
  clean and step W + 1 has the full eps; with W = 0, the configured floats, unchanged."""
  warmup = attack.get("eps_warmup_steps", 0)
  if not warmup:
    return attack.eps, attack.step_size
  scale = jnp.minimum(1.0, step.astype(jnp.float32) / warmup)
  return attack.eps * scale, attack.step_size * scale


def _logits_fn(model, params: Any, domain: int):
  """`fn(images [b, H, W, C]) -> logits [b, K]` of `model` in `domain` (eval mode)."""
  return lambda x: model.apply({"params": params}, x, jnp.full(x.shape[:1], domain, jnp.int32),
                               train=False)


def make_train_step(config: ml_collections.ConfigDict, model, optimizer, mesh):
  """The jitted step `(state, batch) -> (state, metrics)` for `config.train.mode`.

  `batch`: {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}, sharded over `data`.
  The mode's entry of `modes.MODES` builds the rows and their per-row loss (see `training.modes`):
  cotrain: loss = clean_weight * CE(f(x, 0), y) + adv_weight * CE(f(x_adv, 1), y), with x_adv
  from PGD against domain 1 under the current (frozen) parameters; both halves run as one batch
  of 2B, interleaved per example so each device keeps its own examples. adversarial: CE on x_adv
  only (one domain). clean: CE on x only. Each loss is sum(CE per row * row weight) / B.
  With data.mixup on, x is first mixed (`adv_soups.data.mixup`) and every CE, PGD's included,
  uses the soft targets (our choice; the paper is silent): both branches see the same mixed
  images; train accuracies then compare with each example's own label. With
  attack.eps_warmup_steps, eps and the step size follow `attack_schedule`, logged as attack_eps
  and adv_perturbation (the largest per-example perturbation norm of the batch).
  """
  mode, attack = modes_lib.get(config.train.mode), config.attack
  smoothing = config.train.label_smoothing
  num_classes = config.model.num_classes
  ema_decay = config.optimizer.ema_decay
  adv_domain = modes_lib.adversarial_domain(config)
  mix = config.data.get("mixup")
  mix = mix.to_dict() if mixup_lib.enabled(mix) else None
  eps_warmup = bool(attack.get("eps_warmup_steps", 0))

  def craft(params, images, labels, rng, eps=attack.eps, step_size=attack.step_size,
            domain=None, **overrides):
    domain = jnp.full(labels.shape[:1], adv_domain if domain is None else domain, jnp.int32)
    logits_fn = lambda x: model.apply({"params": params}, x, domain, train=False)
    settings = dict(eps=eps, num_steps=attack.num_steps, step_size=step_size, norm=attack.norm)
    settings.update(overrides)
    return pgd(logits_fn, images, labels, rng, **settings)

  def step_fn(state: TrainState, batch):
    images, labels = batch["image"], batch["label"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    attack_rng, dropout_rng = jax.random.split(rng)
    eps, step_size = attack_schedule(attack, state.step)
    attack_labels = labels
    if mix is not None:  # attack_labels: soft targets [B, K], label smoothing included
      images, attack_labels, _ = mixup_lib.mix_batch(
          jax.random.fold_in(rng, 1), images, labels, num_classes=num_classes,
          smoothing=smoothing, **mix)
    inputs = modes_lib.StepInputs(
        images=images, labels=labels, soft_targets=None if mix is None else attack_labels,
        attack_labels=attack_labels, config=config, num_classes=num_classes, smoothing=smoothing,
        craft=lambda x, targets, domain=None, **overrides: craft(
            jax.lax.stop_gradient(state.params), x, targets, attack_rng, eps, step_size, domain,
            **overrides),
        logits_fn_of=lambda domain: _logits_fn(model, jax.lax.stop_gradient(state.params),
                                               domain),
        attack_rng=attack_rng, step=state.step)
    rows = mode.rows(inputs)
    x_adv = rows.x_adv

    def loss_fn(params):
      params = stop_frozen_gradients(params, config.train.get("trainable", "all"))
      logits = model.apply({"params": params}, rows.inputs, rows.domains, train=True,
                           rngs={"dropout": dropout_rng})
      loss, aux = mode.loss(logits, rows, inputs)
      return loss, (logits, aux)

    (loss, (logits, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    correct = (jnp.argmax(logits, -1) == rows.targets).astype(jnp.float32)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    metrics.update(mode.metrics(aux, correct, rows, inputs))
    if eps_warmup and x_adv is not None:
      delta = x_adv - images
      norms = jnp.sqrt(jnp.sum(delta * delta, axis=(1, 2, 3))) if attack.norm == "l2" else \
          jnp.max(jnp.abs(delta), axis=(1, 2, 3))
      metrics.update(attack_eps=jnp.asarray(eps, jnp.float32), adv_perturbation=jnp.max(norms))
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
    if ema is not None:
      metrics["finite"] &= jnp.isfinite(optax.tree.norm(ema))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  replicated = parallel.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
