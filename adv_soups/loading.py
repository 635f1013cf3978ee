"""`adv_soups.load(workdir)`: a trained model for notebooks and scripts (predict, soup, attack).

  model = adv_soups.load("workdirs/digits_demo")          # any path etils.epath can read
  logits = model.predict(images, alpha=0.5)               # images float32 [B, H, W, C] in [0, 1]
  x_adv = model.attack(images, labels, alpha=0.5)         # PGD against the soup at alpha 0.5
  soup_model, soup_params = model.soup(0.5)               # a standalone single-domain model

The workdir alone is enough: its config.json rebuilds the model and its orbax checkpoint holds the
parameters (the EMA parameters when the run kept them). A soup at alpha is the two-domain model
called with mixing weights [1 - alpha, alpha] (adapters are affine in their parameters, see
`soups`), so `predict` and `attack` compile once and serve every alpha.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from adv_soups import checkpoints as ckpt_lib
from adv_soups import soups
from adv_soups import workdir as workdir_lib
from adv_soups.attacks import registry
from adv_soups.models import create_model, init_params

PRECISIONS = ("float32", "model")  # evaluation's compute dtype: float32 always, or the config's


def checkpoint_step(workdir: str, step: int | None = None) -> tuple[int, str]:
  """(step, item) of the checkpoint to evaluate: `step` (default the latest) and 'ema_params' when
  the run kept an EMA, else 'params'. FileNotFoundError without checkpoints; ValueError naming the
  available steps when `step` does not exist. Reads only the checkpoint directory listing."""
  manager = ckpt_lib.Checkpoints(workdir, create=False)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in workdir {workdir!r}: train it first")
    if step is None:
      step = steps[-1]
    if step not in steps:
      raise ValueError(f"checkpoint step {step} does not exist in {workdir!r}: available steps "
                       f"{steps}")
    item = "ema_params" if "ema_params" in manager.item_names(step) else "params"
  finally:
    manager.close()
  return int(step), item


@dataclasses.dataclass
class LoadedModel:
  """A trained model from a workdir. `params` live on this process's first device.

  Attributes:
    config: the run's resolved config (config.json).
    model: the flax ViT (num_domains = config.model.num_domains).
    params: the parameters (EMA parameters when the run kept them; see `params_item`).
    step: the checkpoint's training step.
    workdir: where it came from.
    params_item: 'ema_params' or 'params'.
  """
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  step: int
  workdir: str
  params_item: str = "params"

  def __post_init__(self):
    def predict(params, images, domain):
      with jax.default_matmul_precision("highest"):  # inside the body: jit retraces per context
        return self.model.apply({"params": params}, images, domain, train=False)
    self._predict = jax.jit(predict)
    self._attacks: dict[tuple, Any] = {}

  @property
  def num_domains(self) -> int:
    """2 for a co-trained model (alpha 0 = clean, 1 = robust mode), 1 for single-domain runs."""
    return int(self.config.model.num_domains)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the model input."""
    size = self.config.model.image_size
    return (size, size, int(self.config.model.get("channels", 3) or 3))

  def _check_alpha(self, alpha: Any) -> None:
    if self.num_domains == 1 and np.any(np.asarray(alpha) != 0):
      raise ValueError(
          f"{self.workdir!r} holds a single-domain model (train.mode="
          f"{self.config.train.get('mode')!r}): it has no soups, so alpha must be 0, got {alpha}")

  def domain(self, alpha: Any, batch_size: int) -> np.ndarray:
    """The per-example `domain` argument for `alpha` (a float or [B] floats): mixing weights
    [B, 2] = [1 - alpha, alpha] for a two-domain model, int zeros [B] for a single-domain one.
    `alpha` may also be one soup's weights over every domain (a list of num_domains floats
    summing to 1, e.g. [0.2, 0.3, 0.5] for clean + two threats)."""
    if np.ndim(alpha) == 1 and len(alpha) == self.num_domains and self.num_domains > 2:
      from adv_soups import soup_weights  # local: keeps `import adv_soups` light
      weights = soup_weights.parse_weights(",".join(repr(float(w)) for w in alpha),
                                           self.num_domains, extrapolate=True)
      return np.broadcast_to(weights.astype(np.float32), (batch_size, self.num_domains)).copy()
    self._check_alpha(alpha)
    if self.num_domains == 1:
      return np.zeros((batch_size,), np.int32)
    alpha = np.broadcast_to(np.asarray(alpha, np.float32), (batch_size,))
    weights = np.zeros((batch_size, self.num_domains), np.float32)
    weights[:, 0], weights[:, 1] = 1.0 - alpha, alpha
    return weights

  def _images(self, images: Any) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
      raise ValueError(f"images must be a batch [B, H, W, C], got shape {images.shape}; "
                       "add a leading axis (images[None])")
    if images.shape[1:] != self.image_shape:
      raise ValueError(f"images must have shape [B, {', '.join(map(str, self.image_shape))}], "
                       f"got {images.shape}")
    return images

  def predict(self, images: Any, alpha: Any = 0.0) -> jax.Array:
    """Logits [B, K] of the soup at `alpha` (float or [B]) for float32 images [B, H, W, C] in
    [0, 1]. Jitted: one compilation per batch shape, any alpha."""
    images = self._images(images)
    return self._predict(self.params, images, self.domain(alpha, len(images)))

  def soup(self, alpha: float) -> tuple[Any, Any]:
    """(single-domain model, params) of the soup at `alpha`: adapter = (1-a) p_clean + a p_adv.
    For a single-domain workdir: the model itself (alpha must be 0)."""
    self._check_alpha(alpha)
    if self.num_domains == 1:
      return self.model, self.params
    model = create_model(dict(self.config.model.to_dict(), num_domains=1))
    return model, soups.interpolate(self.params, [1.0 - alpha, alpha])

  def attack(self, images: Any, labels: Any, eps: float | str | None = None, alpha: Any = 0.0,
             steps: int | None = None, attack: str = "pgd", seed: int = 0,
             norm: str | None = None, threat: str | None = None) -> jax.Array:
    """Adversarial images [B, H, W, C] against the soup at `alpha` (the soup itself is attacked).

    Args:
      images: float32 [B, H, W, C] in [0, 1]; labels: int [B].
      eps: radius in pixel units (a float or '4/255'); default the threat's eps.
      threat: the name of one of the run's threats (config.threats; a run without them has one,
        named by config.attack's norm): its norm, and its eps unless `eps` is given. Default the
        first.
      steps: the attack's budget (>= 1); default the registry entry's: config.eval.attack_steps
        for PGD, 100 iterations for APGD and FAB, 5,000 queries for Square.
      attack: one attack of the registry (`attacks.registry.ATTACKS`): 'pgd' (PGD-k, CE, step
        2.5 eps / k, random start), 'apgd-ce', 'apgd-dlr', 'apgd-t', 'fab-t' (its points may lie
        outside eps: FAB is a minimal-distortion attack), 'square', or any registered one. For
        robust accuracy under a whole suite (AutoAttack) use `python -m adv_soups.evaluate`.
      seed: random starts (per example).
      norm: 'linf', 'l2' or 'l1' (every attack but PGD; another norm than the run's needs
        `eps`); default the threat's norm. l_1 runs the standard version's l_1
        settings (APGD-CE: 5 restarts, APGD-T: 5 targets, both with the 3 / 2 / 1 eps schedule).
      threat: the name of one of the run's threats (config.threats; a run without them has one,
        named by config.attack's norm): its norm and eps unless `norm` / `eps` are given.
        Default the first.
    The attack runs with full-precision (float32, 'highest') matmuls.
    """
    from adv_soups import numbers  # local: keeps `import adv_soups` light
    entry = registry.get(attack)
    from adv_soups import threats as threats_lib
    run_threats = threats_lib.normalise(self.config)
    if threat is not None and threat not in run_threats:
      raise ValueError(f"unknown threat {threat!r}: the run's threats are "
                       f"{', '.join(run_threats)}")
    chosen = run_threats[threat] if threat is not None else next(iter(run_threats.values()))
    norm = norm or chosen["norm"]
    if norm not in ("linf", "l2", "l1"):
      raise ValueError(f"unknown norm {norm!r}: allowed linf, l2, l1")
    registry.check_norm((attack,), norm)
    if eps is None and norm != chosen["norm"]:
      raise ValueError(f"norm={norm!r} needs its own eps (the run's eps is a "
                       f"{chosen['norm']} radius)")
    eps = chosen["eps"] if eps is None else numbers.parse_eps(eps, norm)
    budget = registry.resolve_budgets(
        (attack,), None if steps is None else {attack: steps},
        pgd_steps=int(self.config.eval.attack_steps))[attack]
    images = self._images(images)
    labels = np.asarray(labels, np.int32)
    key = (id(entry), budget, norm)
    if key not in self._attacks:
      self._attacks[key] = jax.jit(self._attack_fn(entry, budget, norm))
    return self._attacks[key](self.params, images, labels, self.domain(alpha, len(images)),
                              np.float32(eps), jax.random.PRNGKey(seed))

  def _attack_fn(self, entry: registry.Attack, budget: int, norm: str):
    settings = entry.settings_for(norm)

    def fn(params, images, labels, domain, eps, rng):
      with jax.default_matmul_precision("highest"):  # inside the body: jit retraces per context
        # The per-row domain travels with the rows that Square and FAB-T compact.
        rows_fn = lambda x, dom: self.model.apply({"params": params}, x, dom, train=False)
        return entry.run_full(lambda x: rows_fn(x, domain), images, labels, rng, eps=eps,
                              norm=norm, budget=budget, settings=settings,
                              rows=(rows_fn, (domain,)))
    return fn

  def with_precision(self, precision: str = "float32") -> "LoadedModel":
    """This model for evaluation: 'float32' rebuilds a model whose config computes in bfloat16
    with float32 compute (the parameters are float32 already; same parameters, no copy);
    'model' keeps the config's compute dtype. ValueError for another value."""
    if precision not in PRECISIONS:
      raise ValueError(f"unknown precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    if precision == "model" or compute_dtype(self.config) == "float32":
      return self
    model = create_model(dict(self.config.model.to_dict(), dtype="float32"))
    return dataclasses.replace(self, model=model)


def compute_dtype(config: ml_collections.ConfigDict) -> str:
  """The compute dtype the run's config asks for ('float32' or 'bfloat16')."""
  return str(config.model.get("dtype", "float32") or "float32")


def load(workdir: str, step: int | None = None) -> LoadedModel:
  """The model of a training workdir at checkpoint `step` (default the latest).

  Reads config.json and the orbax checkpoint through etils.epath, so local paths and remote
  ones (gs://...) both work; CPU, GPU or TPU. Without `step`, a latest checkpoint that cannot be
  read is moved to WORKDIR/damaged_checkpoints/ (one warning line) and the previous one is loaded.
  Raises FileNotFoundError (no config.json / no
  checkpoint) or ValueError (the step does not exist: the message lists the available ones).
  """
  workdir = str(workdir)
  config = workdir_lib.load_config(workdir)
  requested = step
  step, item = checkpoint_step(workdir, step)
  model = create_model(config.model)
  channels = int(config.model.get("channels", 3) or 3)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # each process its own copy
  abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0), channels))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract)
  manager = ckpt_lib.Checkpoints(workdir, create=False)
  try:
    if requested is not None:
      params = manager.restore(step, targets={item: target}, items=(item,))[item]
    else:  # the latest readable step: a damaged one is moved aside with one warning line
      def restore(s):
        name = "ema_params" if "ema_params" in manager.item_names(s) else "params"
        return name, manager.restore(s, targets={name: target}, items=(name,))[name]
      found = manager.restore_latest_readable(restore, workdir)
      if found is None:
        raise FileNotFoundError(f"no readable checkpoint in workdir {workdir!r} (damaged ones "
                                f"are in {ckpt_lib.DAMAGED_DIR}/)")
      step, (item, params) = found
  finally:
    manager.close()
  return LoadedModel(config=config, model=model, params=params, step=step, workdir=workdir,
                     params_item=item)
