"""Clean/adversarial co-training of a ViT with domain adapters (the paper's method).

  python -m adv_soups.train --config=configs/digits.py --workdir=workdirs/digits \
      [--config.train.steps=100 ...] [--overwrite]

Re-running the same command on an existing workdir resumes from its latest checkpoint. On SIGTERM
every process saves one checkpoint at the same step and the program exits with status 75 (resume
me); a finished run leaves WORKDIR/FINISHED. Multi-process runs start through
`parallel.initialize` (--coordinator_address / --num_processes / --process_id, ADV_SOUPS_* or
auto-detected; see launch/). Sections: config, train state and optimizer, the train step,
checkpointing, the loop, workdir checks; the command line is `adv_soups.training_cli`.

Parallelism ("the pmap'd PGD inside the jitted step", in current JAX): the train step is one
`jax.jit` over a `Mesh` with a `data` axis; the batch is sharded `P('data')`, the state replicated.
PGD is per example, so XLA runs it on each device's shard with no communication; the only
collective is the gradient all-reduce XLA inserts for the replicated parameters.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from clu import metric_writers, periodic_actions

from adv_soups import checkpoints as ckpt_lib
from adv_soups import config_base
from adv_soups import data as data_lib
from adv_soups import parallel, preemption as preemption_lib, workdir as workdir_lib
from adv_soups.evaluation import periodic
from adv_soups.attacks.pgd import pgd
from adv_soups.data import mixup as mixup_lib
from adv_soups.data import randaugment as randaugment_lib
from adv_soups.models import create_model, init_params
from adv_soups.models import npz as npz_lib

MODES = ("cotrain", "adversarial", "clean")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
NORMS = ("linf", "l2")
CLEAN, ADVERSARIAL = 0, 1


# ------------------------------------------------------------------------------------------------
# Config.

def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates `config` and fills what follows from it; returns a new, resolved ConfigDict.

  Fills: model.num_domains = 1 for the single-domain modes (clean, adversarial); data.image_size
  from model.image_size; attack.step_size = 2.5 * eps / num_steps when None. Raises ValueError with
  one line naming the bad value and what is allowed.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  _check_known_fields(config.to_dict(), config_base.base_config().to_dict())
  train, opt, attack = config.train, config.optimizer, config.attack
  if train.mode not in MODES:
    raise ValueError(f"unknown config.train.mode {train.mode!r}: allowed {list(MODES)}")
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"unknown config.optimizer.name {opt.name!r}: allowed {list(OPTIMIZERS)}")
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"unknown config.optimizer.schedule {opt.schedule!r}: allowed "
                     f"{list(SCHEDULES)}")
  if attack.norm == "l1":  # PGD has no l_1 step here; l_1 is an evaluation threat model
    raise ValueError("config.attack.norm='l1': training attacks are linf / l2 only (PGD has no "
                     "l_1 step here); evaluate l_1 with --norm=l1 or config.evals.NAME.norm=l1")
  if attack.norm not in NORMS:
    raise ValueError(f"unknown config.attack.norm {attack.norm!r}: allowed {list(NORMS)}")
  num_classes, shape = data_lib.dataset_info(config.data.name, config.model.image_size)
  if config.model.num_classes != num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but dataset "
                     f"{config.data.name!r} has {num_classes} classes")
  for name, value, low in (("train.steps", train.steps, 1), ("train.batch_size", train.batch_size, 1),
                           ("train.log_every", train.log_every, 1),
                           ("train.checkpoint_every", train.checkpoint_every, 0),
                           ("attack.num_steps", attack.num_steps, 1),
                           ("eval.attack_steps", config.eval.attack_steps, 1)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"config.{name} must be an integer >= {low}, got {value!r}")
  for name, value, low, high in (
      ("train.label_smoothing", train.label_smoothing, 0.0, 1.0),
      ("optimizer.ema_decay", opt.ema_decay, 0.0, 1.0)):
    if not low <= value < high:
      raise ValueError(f"config.{name}={value} is outside the allowed range [{low}, {high})")
  for name, value in (("train.clean_weight", train.clean_weight),
                      ("train.adv_weight", train.adv_weight),
                      ("optimizer.learning_rate", opt.learning_rate),
                      ("optimizer.weight_decay", opt.weight_decay),
                      ("optimizer.grad_clip_norm", opt.grad_clip_norm),
                      ("optimizer.warmup_steps", opt.warmup_steps)):
    if value < 0:
      raise ValueError(f"config.{name}={value} must be >= 0")
  if attack.step_size is not None and attack.step_size <= 0:
    raise ValueError(f"config.attack.step_size={attack.step_size} must be > 0 (or None)")
  if not isinstance(train.keep_checkpoints, int) or train.keep_checkpoints < 1:
    raise ValueError(f"config.train.keep_checkpoints must be an integer >= 1, got "
                     f"{train.keep_checkpoints!r}")
  n_devices = jax.device_count()
  eval_cfg = config.eval
  if not isinstance(eval_cfg.batch_size, int) or eval_cfg.batch_size < 1:
    raise ValueError(f"config.eval.batch_size={eval_cfg.batch_size!r} must be an integer >= 1 "
                     "(rows per evaluation call, rounded up to a multiple of the devices)")
  if eval_cfg.num_examples is not None and eval_cfg.num_examples < 1:
    raise ValueError(f"config.eval.num_examples={eval_cfg.num_examples} must be >= 1 (or None)")
  if train.batch_size % n_devices:
    raise ValueError(f"config.train.batch_size={train.batch_size} must be a multiple of the "
                     f"{n_devices} devices")
  if not (0 <= attack.eps <= (1 if attack.norm == "linf" else float("inf"))):
    raise ValueError(f"config.attack.eps={attack.eps} is outside the allowed range for "
                     f"{attack.norm} ([0, 1] for linf, >= 0 for l2)")
  _check_recipe(config, n_devices)
  if train.mode != "cotrain":
    config.model.num_domains = 1  # single-domain model: evaluate it with domain 0
  elif config.model.num_domains != 2:
    raise ValueError(f"config.model.num_domains={config.model.num_domains}: cotrain needs exactly "
                     "2 (0 = clean, 1 = adversarial)")
  config.data.image_size = config.model.image_size
  if attack.step_size is None:
    attack.step_size = 2.5 * attack.eps / attack.num_steps
  create_model(config.model)  # validates the model fields
  config.model.channels = shape[-1]
  periodic.validate(config)
  _resolve_weights(config)
  return config


ADAPTERS_REGEX = r"(.*/)?domain_[^/]*"  # every domain-specific leaf (see models/adapters.py)
HEAD_REGEX = r"head/.*"


def _resolve_weights(config: ml_collections.ConfigDict) -> None:
  """Checks model.init_from (file, layout, shapes, normalisation; reads only the .npy headers)
  and train.trainable; turns trainable 'adapters' into its regex: the domain_* leaves, plus the
  head unless init_from provides it. ValueError (one line) on bad values."""
  init_from, trainable = config.model.get("init_from"), config.train.get("trainable", "all")
  if not init_from and trainable == "all":
    return
  model = create_model(config.model)
  abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0), config.model.channels))
  head_loaded = False
  if init_from:
    head_loaded = npz_lib.check_pretrained(abstract, init_from, config.model,
                                           config.model.channels)["head_loaded"]
  if trainable == "all":
    return
  if trainable == "adapters":
    trainable = ADAPTERS_REGEX if head_loaded else f"{ADAPTERS_REGEX}|{HEAD_REGEX}"
  try:
    re.compile(trainable)
  except (re.error, TypeError) as e:
    raise ValueError(f"config.train.trainable={trainable!r}: allowed 'all', 'adapters' or a regex "
                     f"over parameter names ({e})") from None
  names = [npz_lib.param_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)]
  if not any(re.fullmatch(trainable, n) for n in names):
    raise ValueError(f"config.train.trainable={config.train.trainable!r} matches none of the "
                     f"model's parameters (names such as {', '.join(names[:3])})")
  config.train.trainable = trainable


def _check_recipe(config: ml_collections.ConfigDict, n_devices: int) -> None:
  """Validates data.randaugment, data.mixup and attack.eps_warmup_steps (ValueError, one line)."""
  ra = config.data.get("randaugment")
  if ra is not None:
    randaugment_lib.check_settings(ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob, ra.fill)
  mix = config.data.get("mixup")
  if mix is not None:
    mixup_lib.check_settings(mix.mixup_alpha, mix.cutmix_alpha, mix.switch_prob)
    per_device = config.train.batch_size // n_devices
    if mixup_lib.enabled(mix) and per_device % 2:
      raise ValueError(f"config.train.batch_size={config.train.batch_size} gives {per_device} "
                       f"examples per device; mixup / CutMix pairs examples within a device and "
                       "needs an even number")
  warmup = config.attack.get("eps_warmup_steps", 0)
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"config.attack.eps_warmup_steps must be an integer >= 0 (0 = off), got "
                     f"{warmup!r}")


def attack_schedule(attack: ml_collections.ConfigDict, step: jax.Array) -> tuple[Any, Any]:
  """(eps, step_size) of the training attack at `step` (completed steps, int32 []): with
  attack.eps_warmup_steps = W > 0 both are scaled by min(1, step / W), so the first step is
  clean and step W + 1 has the full eps; with W = 0, the configured floats, unchanged."""
  warmup = attack.get("eps_warmup_steps", 0)
  if not warmup:
    return attack.eps, attack.step_size
  scale = jnp.minimum(1.0, step.astype(jnp.float32) / warmup)
  return attack.eps * scale, attack.step_size * scale


# Fields resolve_config fills in; `evals` holds entries named by the user (periodic.validate
# checks their fields).
_FILLED = {"model.channels"}
_OPEN = {"evals"}


def _check_known_fields(config: dict, base: dict, prefix: str = "") -> None:
  """ValueError (one line) for a field that `config_base.base_config()` does not have: nothing
  would read it (e.g. a config file still setting a removed field, or a misspelt one)."""
  for key, value in config.items():
    name = prefix + key
    if name in _OPEN or name in _FILLED:
      continue
    if key not in base:
      where = f"config.{prefix[:-1]}" if prefix else "config"
      raise ValueError(f"config.{name} is not a field of the config (nothing reads it); "
                       f"{where} has: {', '.join(sorted(base))}")
    if isinstance(value, dict) and isinstance(base[key], dict):
      _check_known_fields(value, base[key], name + ".")


def adversarial_domain(config: ml_collections.ConfigDict) -> int:
  """The domain whose adapter is attacked and hardened: 1 in cotrain, 0 for one-domain models."""
  return ADVERSARIAL if config.model.num_domains > 1 else CLEAN


# ------------------------------------------------------------------------------------------------
# Train state and optimizer.

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # None without EMA
  rng: jax.Array   # key data (uint32), folded with the step for each step's randomness


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay: dense/conv kernels only (not biases, norm scales,
  position embeddings or class tokens)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], "key", path[-1])).endswith("kernel"), params)


def trainable_mask(params: Any, trainable: str = "all") -> Any:
  """True for the leaves that train: all of them for "all"; the domain_* leaves for "adapters";
  else those whose name (e.g. "block03/mlp/Dense_0/kernel") fully matches the regex `trainable`
  (resolve_config turns "adapters" into such a regex, the head included when it is new)."""
  if trainable == "all":
    return jax.tree.map(lambda _: True, params)
  pattern = ADAPTERS_REGEX if trainable == "adapters" else trainable
  return jax.tree_util.tree_map_with_path(
      lambda path, _: re.fullmatch(pattern, npz_lib.param_name(path)) is not None, params)


def stop_frozen_gradients(params: Any, trainable: str = "all") -> Any:
  """`params` with `lax.stop_gradient` on the frozen leaves (unchanged for "all"), so that XLA
  computes no parameter gradient for them."""
  if trainable == "all":
    return params
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params,
                      trainable_mask(params, trainable))


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `opt.learning_rate`, then cosine decay to 0 (or constant)."""
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  if opt.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, opt.learning_rate, max(warmup, 1)),
         optax.constant_schedule(opt.learning_rate)], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, opt.learning_rate, warmup, total_steps)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   trainable: str = "all") -> optax.GradientTransformation:
  """AdamW (or SGD with momentum) with warmup + cosine, global-norm clipping, masked decay.

  `trainable` (config.train.trainable) other than "all": the frozen leaves get zero updates and no
  optimizer state (optax.multi_transform), and the clipping norm is over the trainable ones only.
  """
  schedule = learning_rate_schedule(opt, total_steps)
  if opt.name == "adamw":
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=weight_decay_mask)
  else:
    core = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask),
                       optax.sgd(schedule, momentum=opt.momentum))
  if opt.grad_clip_norm:
    core = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), core)
  if trainable == "all":
    return core
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                       trainable_mask(params, trainable))
  return optax.multi_transform({"train": core, "frozen": optax.set_to_zero()}, labels)


def init_state(config: ml_collections.ConfigDict, model, optimizer) -> TrainState:
  """Fresh parameters and optimizer state from `config.seed`."""
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  params = init_params(model, init_rng, config.model.channels)
  if config.model.get("init_from"):  # head re-initialised when the classes differ
    params = jax.tree.map(jnp.asarray, npz_lib.load_pretrained(
        params, config.model.init_from, config.model, config.model.channels))
  ema = jax.tree.map(jnp.copy, params) if config.optimizer.ema_decay else None  # own buffers (donation)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema_params=ema,
                    rng=jax.random.key_data(train_rng))


# ------------------------------------------------------------------------------------------------
# The train step.

def make_train_step(config: ml_collections.ConfigDict, model, optimizer, mesh):
  """The jitted step `(state, batch) -> (state, metrics)` for `config.train.mode`.

  `batch`: {'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B]}, sharded over `data`.
  cotrain: loss = clean_weight * CE(f(x, 0), y) + adv_weight * CE(f(x_adv, 1), y), with x_adv
  from PGD against domain 1 under the current (frozen) parameters; both halves run as one batch
  of 2B, interleaved per example so each device keeps its own examples. adversarial: CE on x_adv
  only (one domain). clean: CE on x only.
  With data.mixup on, x is first mixed (`adv_soups.data.mixup`) and every CE, PGD's included,
  uses the soft targets (our choice; the paper is silent): both branches see the same mixed
  images; train accuracies then compare with each example's own label. With
  attack.eps_warmup_steps, eps and the step size follow `attack_schedule`, logged as attack_eps
  and adv_perturbation (the largest per-example perturbation norm of the batch).
  """
  mode, attack = config.train.mode, config.attack
  weights = jnp.asarray([config.train.clean_weight, config.train.adv_weight], jnp.float32)
  smoothing = config.train.label_smoothing
  num_classes = config.model.num_classes
  ema_decay = config.optimizer.ema_decay
  adv_domain = adversarial_domain(config)
  mix = config.data.get("mixup")
  mix = mix.to_dict() if mixup_lib.enabled(mix) else None
  eps_warmup = bool(attack.get("eps_warmup_steps", 0))

  def craft(params, images, labels, rng, eps=attack.eps, step_size=attack.step_size):
    domain = jnp.full(labels.shape[:1], adv_domain, jnp.int32)
    logits_fn = lambda x: model.apply({"params": params}, x, domain, train=False)
    return pgd(logits_fn, images, labels, rng, eps=eps, num_steps=attack.num_steps,
               step_size=step_size, norm=attack.norm)

  def step_fn(state: TrainState, batch):
    images, labels = batch["image"], batch["label"]
    size = labels.shape[0]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    attack_rng, dropout_rng = jax.random.split(rng)
    eps, step_size = attack_schedule(attack, state.step)
    attack_labels = labels
    if mix is not None:  # attack_labels: soft targets [B, K], label smoothing included
      images, attack_labels, _ = mixup_lib.mix_batch(
          jax.random.fold_in(rng, 1), images, labels, num_classes=num_classes,
          smoothing=smoothing, **mix)
    x_adv = None
    if mode == "cotrain":
      x_adv = craft(jax.lax.stop_gradient(state.params), images, attack_labels, attack_rng,
                    eps, step_size)
      inputs = jnp.stack([images, x_adv], axis=1).reshape((2 * size,) + images.shape[1:])
      domains = jnp.tile(jnp.asarray([CLEAN, ADVERSARIAL], jnp.int32), size)
      targets = jnp.repeat(labels, 2)
      example_weights = jnp.tile(weights, size)
    elif mode == "adversarial":
      inputs = x_adv = craft(jax.lax.stop_gradient(state.params), images, attack_labels,
                             attack_rng, eps, step_size)
      domains, targets = jnp.zeros_like(labels), labels
      example_weights = jnp.ones((size,), jnp.float32)
    else:
      inputs, domains, targets = images, jnp.zeros_like(labels), labels
      example_weights = jnp.ones((size,), jnp.float32)

    def loss_fn(params):
      params = stop_frozen_gradients(params, config.train.get("trainable", "all"))
      logits = model.apply({"params": params}, inputs, domains, train=True,
                           rngs={"dropout": dropout_rng})
      if mix is None:
        one_hot = optax.smooth_labels(jax.nn.one_hot(targets, num_classes), smoothing)
      else:  # already smoothed; one row per input (clean and adversarial interleaved in cotrain)
        one_hot = jnp.repeat(attack_labels, len(targets) // size, axis=0)
      per_example = optax.softmax_cross_entropy(logits, one_hot)
      return jnp.sum(per_example * example_weights) / size, (logits, per_example)

    (loss, (logits, per_example)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if mode == "cotrain":
      metrics.update(clean_loss=per_example[0::2].mean(), adv_loss=per_example[1::2].mean(),
                     clean_train_accuracy=correct[0::2].mean(),
                     adv_train_accuracy=correct[1::2].mean())
    else:
      metrics["train_accuracy"] = correct.mean()
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


# ------------------------------------------------------------------------------------------------
# Checkpointing: orbax for the arrays, the tf.data iterator state beside it.

def data_state_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "data_state", str(step))


def save_checkpoint(manager: ckpt_lib.Checkpoints, workdir: str, state: TrainState,
                    train_iter: data_lib.TrainIterator) -> int:
  """Saves the state and the input position at `state.step`; prunes stale data states."""
  step = int(state.step)
  train_iter.save(data_state_dir(workdir, step))
  manager.save(step, {"rng": np.asarray(state.rng).tolist(),
                      "batches_consumed": train_iter.batches_consumed},
               params=state.params, opt_state=state.opt_state, ema_params=state.ema_params)
  keep = {str(s) for s in manager.all_steps()}
  root = os.path.join(workdir, "data_state")
  if jax.process_index() == 0:
    for name in tf.io.gfile.listdir(root):
      if name.rstrip("/") not in keep:
        tf.io.gfile.rmtree(os.path.join(root, name.rstrip("/")))
  return step


def restore_checkpoint(manager: ckpt_lib.Checkpoints, workdir: str, state: TrainState,
                       train_iter: data_lib.TrainIterator) -> TrainState | None:
  """The latest readable checkpoint's state (into `state`'s structure and shardings), with
  `train_iter` moved to the same position; None when no checkpoint is left. A damaged step
  (unreadable arrays or input-pipeline state) is moved aside with one warning line and the
  previous one is used (`Checkpoints.restore_latest_readable`)."""
  items = ("params", "opt_state") + (("ema_params",) if state.ema_params is not None else ())

  def restore(step):
    restored = manager.restore(step, targets={name: getattr(state, name) for name in items},
                               items=items)
    directory = data_state_dir(workdir, step)
    if not tf.io.gfile.exists(os.path.join(directory, f"process_{jax.process_index()}")):
      raise ckpt_lib.RestoreMismatch(
          f"step {step} has no input-pipeline state for process {jax.process_index()} in "
          f"{directory}: resume with the number of processes that saved it")
    train_iter.restore(directory)
    if train_iter.batches_consumed != restored["meta"]["batches_consumed"]:
      raise RuntimeError(f"input-pipeline state of step {step} is at batch "
                         f"{train_iter.batches_consumed}, expected "
                         f"{restored['meta']['batches_consumed']}")
    return restored

  found = manager.restore_latest_readable(restore, workdir)
  if found is None:
    return None
  step, restored = found
  meta = restored["meta"]
  rng = jax.device_put(np.asarray(meta["rng"], np.uint32), state.rng.sharding)
  return state.replace(step=jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding),
                       rng=rng, **{name: restored[name] for name in items})


# ------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: the final state and the last evaluation's metrics."""
  state: TrainState
  eval_metrics: dict[str, float]
  preempted_at: int | None = None  # the step saved on SIGTERM (the run is not finished)


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches pending per-step metrics; raises FloatingPointError naming the first bad step."""
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, m in fetched:
    if not bool(m["finite"]):
      raise FloatingPointError(f"non-finite loss or gradient at step {step} (loss={m['loss']}, "
                               f"grad_norm={m['grad_norm']}); the last checkpoint is untouched")
  return fetched


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None) -> TrainResult:
  """Trains per `config` (resolved or not) in `workdir`, resuming from its latest checkpoint."""
  config = resolve_config(config)
  mesh = mesh or parallel.make_mesh()
  if jax.process_index() == 0:
    workdir_lib.save_config(workdir, config)
  train_cfg = config.train
  model = create_model(config.model)
  optimizer = make_optimizer(config.optimizer, train_cfg.steps, train_cfg.get("trainable", "all"))
  train_step = make_train_step(config, model, optimizer, mesh)
  state = jax.device_put(init_state(config, model, optimizer), parallel.replicated(mesh))
  train_iter = data_lib.train_iterator(config.data, global_batch_size=train_cfg.batch_size,
                                       seed=config.seed)
  manager = ckpt_lib.Checkpoints(workdir, max_to_keep=train_cfg.keep_checkpoints)
  if manager.latest_step() is not None:
    restored = restore_checkpoint(manager, workdir, state, train_iter)
    if restored is not None:
      state = restored
      logging.info("Resumed from step %d of %s", int(state.step), workdir)
    else:  # every checkpoint was damaged (kept aside): start afresh from an untouched iterator
      train_iter = data_lib.train_iterator(config.data, global_batch_size=train_cfg.batch_size,
                                           seed=config.seed)
  start = int(state.step)
  watch = preemption_lib.PreemptionWatch().start()  # SIGTERM -> save at one step, stop
  preempted_at = None

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(_flat_hparams(config))
  progress = periodic_actions.ReportProgress(num_train_steps=train_cfg.steps, writer=writer,
                                             every_secs=None, every_steps=train_cfg.log_every)
  pending: list[tuple[int, dict]] = []
  eval_metrics: dict[str, float] = {}
  t0, images_seen = time.time(), 0
  for step in range(start + 1, train_cfg.steps + 1):
    batch = parallel.shard_batch(mesh, next(train_iter))
    state, metrics = train_step(state, batch)
    pending.append((step, metrics))
    images_seen += train_cfg.batch_size
    progress(step)
    last = step == train_cfg.steps
    preempted = watch.reached(step) and not last  # every step, on every process
    if step % train_cfg.log_every == 0 or last or len(pending) >= 10:
      fetched = _check_finite(pending)  # also paces dispatch (XLA:CPU collectives on jax 0.10)
      pending = []
      if step % train_cfg.log_every == 0 or last:
        summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]
                   if k != "finite"}
        summary["learning_rate"] = float(learning_rate_schedule(config.optimizer,
                                                                train_cfg.steps)(step - 1))
        summary["images_per_sec"] = images_seen / (time.time() - t0)
        writer.write_scalars(step, summary)
        t0, images_seen = time.time(), 0
    due = periodic.due(config, step, last)
    do_eval = bool(due)
    do_save = (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0) or last
    if do_save or preempted:  # before evaluating: a failed evaluation must not cost the save
      _check_finite(pending)  # never save a non-finite state
      save_checkpoint(manager, workdir, state, train_iter)
    if preempted:
      preempted_at = step
      break
    if do_eval:
      eval_metrics = periodic.evaluate(config, model, _eval_params(state), step, due, workdir)
      writer.write_scalars(step, eval_metrics)
    if do_eval or do_save:
      t0, images_seen = time.time(), 0  # throughput excludes evaluation and checkpointing
  if start >= train_cfg.steps:  # a finished run: report its evaluation again
    logging.info("%s is already trained to step %d", workdir, start)
    eval_metrics = periodic.evaluate(config, model, _eval_params(state), start, None, workdir)
  watch.close()
  if preempted_at is None and jax.process_index() == 0:
    preemption_lib.write_finished(workdir, train_cfg.steps)
  writer.flush()
  manager.close()
  return TrainResult(state=state, eval_metrics=eval_metrics, preempted_at=preempted_at)


def _eval_params(state: TrainState) -> Any:
  return state.ema_params if state.ema_params is not None else state.params


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}{k}.", v)
    else:
      flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

  walk("", config.to_dict())
  return flat


# ------------------------------------------------------------------------------------------------
# Workdir checks (the command line is adv_soups/training_cli.py).

def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  """With `overwrite`, moves an earlier run aside (never deletes it; process 0 moves, the others
  wait); else checks that an earlier run in `workdir` has the same resolved config, so re-running
  resumes it: fields that leave the trajectory alone (`workdir_lib.TRAJECTORY_NEUTRAL`) may
  differ, with one line saying which; any other difference is a ValueError naming them."""
  if overwrite:
    if jax.process_index() == 0:
      moved = workdir_lib.move_aside(workdir)
      if moved:
        print(f"moved the previous run aside to {moved}", file=sys.stderr)
    parallel.barrier("adv_soups.train moved the previous run aside")
  elif tf.io.gfile.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    saved = workdir_lib.config_to_dict(workdir_lib.load_config(workdir))
    allowed, refused = workdir_lib.resume_differences(saved, workdir_lib.config_to_dict(config))
    if refused:
      raise ValueError(f"{workdir} holds a run with a different config ({'; '.join(refused)}); "
                       "resume with the same config, use a new --workdir, or pass --overwrite")
    if allowed and jax.process_index() == 0:
      print(f"resuming {workdir} with changed fields that leave its trajectory alone: "
            f"{'; '.join(allowed)}", file=sys.stderr)



def main(argv: list[str] | None = None) -> None:
  """`python -m adv_soups.train`: see `training_cli.main` (flags, checks, exit codes)."""
  from adv_soups import training_cli  # the command line sits above this library module
  training_cli.main(argv)


if __name__ == "__main__":
  main()
