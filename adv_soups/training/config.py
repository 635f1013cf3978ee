"""The training config: its schema (`base_config`, every field with a neutral default) and
`resolve_config` (every check, and the fields that follow from others).

Every field is overridable from the command line, e.g. `--config.train.steps=100`. Importing this
module loads no TensorFlow (a test checks it): the checks that need the data sets, the pretrained
file reader or the evaluation engine import them when `resolve_config` runs.
"""
from __future__ import annotations

import re

import jax
import ml_collections
from ml_collections.config_dict import placeholder

from adv_soups import evaluators
from adv_soups import threats as threats_lib
from adv_soups.models import create_model, init_params
from adv_soups.training import modes as modes_lib

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
NORMS = ("linf", "l2")

# ------------------------------------------------------------------------------------------------
# The schema.

def base_config() -> ml_collections.ConfigDict:
  """The full set of fields `adv_soups.train` reads, with neutral defaults. Fields that default to
  None are typed placeholders, so `--config.data.data_dir=PATH` etc. can still override them."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict(dict(
      variant="tiny/4", num_classes=10, adapter="token", num_domains=2, image_size=32,
      mean=(0.5,), std=(0.5,), dropout_rate=0.0, drop_path_rate=0.0, dtype="float32",
      remat=False,  # activation checkpointing of each encoder block (memory for compute)
      # Optional overrides of the variant's sizes (None = the variant's).
      patch_size=placeholder(int), width=placeholder(int), depth=placeholder(int),
      num_heads=placeholder(int), mlp_dim=placeholder(int),
      # A public ViT .npz (vision_transformer / big_vision layout, any etils.epath path) to start
      # from; None = random initialisation. See adv_soups/models/npz.py.
      init_from=placeholder(str)))

  config.data = ml_collections.ConfigDict(dict(
      name="digits", data_dir=placeholder(str), image_size=placeholder(int), shuffle_buffer=10_000, crop_min_scale=0.08,
      prefetch=2,
      # timm's RandAugment (rand-m{magnitude}-mstd{magnitude_std}-inc1); num_ops = 0 is off.
      randaugment=ml_collections.ConfigDict(dict(
          num_ops=0, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=(124, 116, 104))),
      # Mixup / CutMix in the train step (timm's Mixup, batch mode); both alphas 0 = off.
      mixup=ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5))))

  config.train = ml_collections.ConfigDict(dict(
      mode="cotrain",          # cotrain | adversarial | clean (training/modes.py: MODES)
      steps=1000,              # total optimizer steps
      batch_size=128,          # global, images drawn from the data (each seen clean AND adv)
      clean_weight=1.0,        # cotrain loss = clean_weight * CE(clean) + adv_weight * CE(adv)
      adv_weight=1.0,          # (our default, AdvProp's sum; the paper gives no weights)
      label_smoothing=0.0,
      log_every=50,
      checkpoint_every=500,    # and always at the end
      keep_checkpoints=3,
      # Which parameters train: "all", "adapters" (the domain_* leaves, plus the head when it is
      # not loaded from model.init_from) or a regex fully matching names like
      # "block03/mlp/Dense_0/kernel". Frozen ones get no gradient and no optimizer state.
      trainable="all"))

  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",            # adamw | sgd
      learning_rate=1e-3,      # peak, after warmup
      warmup_steps=100,
      schedule="cosine",       # cosine | constant (after warmup)
      b1=0.9, b2=0.999,        # adamw
      momentum=0.9,            # sgd
      weight_decay=1e-4,       # decoupled; only on kernels (not biases, norms, pos. emb., tokens)
      grad_clip_norm=1.0,      # 0 = off
      ema_decay=0.0))          # 0 = no EMA; else evaluation uses the EMA parameters

  config.attack = ml_collections.ConfigDict(dict(
      norm="linf",
      eps=8 / 255,
      num_steps=10,
      step_size=placeholder(float),          # None = 2.5 * eps / num_steps (Madry et al.)
      eps_warmup_steps=0))     # eps (and the step size) ramp linearly from 0 over these steps; 0 = off

  # The threat models to co-train against, in order: domain i is the i-th (adv_soups/threats.py),
  # e.g. config.threats.l2 = threats.threat("l2", 0.5, num_steps=5, loss="trades"). Empty = one
  # threat from config.attack (loss "ce", weight train.adv_weight); a config that sets threats
  # leaves config.attack and train.adv_weight at their defaults.
  config.threats = threats_lib.ordered()

  # Defaults of every evaluation (the periodic ones below, `evaluate`, `sweep`).
  config.eval = ml_collections.ConfigDict(dict(
      split=placeholder(str),  # None = the dataset's evaluation split
      num_examples=placeholder(int),  # None = the whole split
      batch_size=256,          # rows (example x model) per compiled call
      attack_steps=10))        # PGD-k's k when an evaluation asks for 'pgd' (a quick check, not AA)

  # Periodic evaluation during training (adv_soups/evaluation/periodic.py): one entry per
  # evaluator, its `type` a module of adv_soups/evaluators (default robust), e.g.
  # --config.evals.val.every=200 --config.evals.val.attack=apgd-ce. The last
  # step always runs every entry. A resumed run may change these settings.
  config.evals = ml_collections.ConfigDict(dict(
      val=evaluators.entry("robust", every=500, attack="pgd", domains="clean,adversarial")))
  return config

# ------------------------------------------------------------------------------------------------
# Resolution and checks.

def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates `config` and fills what follows from it; returns a new, resolved ConfigDict.

  Fills: model.num_domains = 1 for the single-domain modes (clean, adversarial); data.image_size
  from model.image_size; attack.step_size = 2.5 * eps / num_steps when None. Raises ValueError with
  one line naming the bad value and what is allowed.
  """
  # The data sets' modules load TensorFlow: imported on use, so that reading the schema stays
  # light (the evaluators import theirs in their checks).
  from adv_soups.data.registry import dataset_info
  # Before the copy below, which sorts the threats' names (their order is the domains').
  threats = threats_lib.normalise(config) if threats_lib.has_threats(config) else None
  threats_lib.check_exclusive(config, base_config())
  config = ml_collections.ConfigDict(config.to_dict())
  _check_known_fields(config.to_dict(), base_config().to_dict())
  train, opt, attack = config.train, config.optimizer, config.attack
  mode = modes_lib.get(train.mode)  # ValueError naming the allowed modes
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
  num_classes, shape = dataset_info(config.data.name, config.model.image_size)
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
    cpu = jax.devices()[0].platform == "cpu"
    raise ValueError(f"config.train.batch_size={train.batch_size} must be a multiple of the "
                     f"{n_devices} devices" + (" (on CPU, $ADV_SOUPS_CPU_DEVICES or XLA_FLAGS "
                                               "set their number)" if cpu else ""))
  if not (0 <= attack.eps <= (1 if attack.norm == "linf" else float("inf"))):
    raise ValueError(f"config.attack.eps={attack.eps} is outside the allowed range for "
                     f"{attack.norm} ([0, 1] for linf, >= 0 for l2)")
  _check_recipe(config, n_devices)
  if threats is None:  # one threat, from config.attack (checked above)
    threats = threats_lib.normalise(config)
  if train.mode == "adversarial" and len(threats) > 1:
    raise ValueError(f"config.train.mode='adversarial' trains one domain against one threat; "
                     f"config.threats has {len(threats)} ({', '.join(threats)}): use mode cotrain")
  if threats_lib.has_threats(config):  # in order, step sizes and domains filled
    config.threats = threats_lib.resolved(threats)
  domains = mode.domains(config)
  if len(domains) == 1:
    config.model.num_domains = 1  # single-domain model: evaluate it with domain 0
  elif threats_lib.has_threats(config) and config.model.num_domains == 2:  # the schema's default
    config.model.num_domains = len(domains)
  elif config.model.num_domains != len(domains):
    raise ValueError(f"config.model.num_domains={config.model.num_domains}: {train.mode} needs "
                     f"exactly {len(domains)} ({modes_lib.describe_domains(domains)})")
  config.data.image_size = config.model.image_size
  if not threats_lib.has_threats(config) and attack.step_size is None:
    attack.step_size = 2.5 * attack.eps / attack.num_steps
  create_model(config.model)  # validates the model fields
  config.model.channels = shape[-1]
  evaluators.validate(config)
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
  from adv_soups.models import npz as npz_lib  # reads files through etils.epath
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
  from adv_soups.data import mixup as mixup_lib
  from adv_soups.data import randaugment as randaugment_lib  # TensorFlow ops
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



# Fields resolve_config fills in; `evals` holds entries named by the user (evaluators.validate
# checks their fields).
_FILLED = {"model.channels"}
_OPEN = {"evals", "threats"}  # threats: checked by threats_lib.normalise


def _check_known_fields(config: dict, base: dict, prefix: str = "") -> None:
  """ValueError (one line) for a field that `base_config()` does not have: nothing
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
