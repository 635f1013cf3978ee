"""The train state, the parameter masks (weight decay, trainable), the optimizer and its schedule."""
from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from adv_soups.models import init_params
from adv_soups.models import npz as npz_lib
from adv_soups.training.config import ADAPTERS_REGEX


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
