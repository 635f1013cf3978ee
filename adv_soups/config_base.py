"""Fields shared by every training config (configs/*.py fill in their own values).

Every field is overridable from the command line, e.g. `--config.train.steps=100`.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from adv_soups.evaluation import periodic


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
      mode="cotrain",          # cotrain | adversarial | clean
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

  # Defaults of every evaluation (the periodic ones below, `evaluate`, `sweep`).
  config.eval = ml_collections.ConfigDict(dict(
      split=placeholder(str),  # None = the dataset's evaluation split
      num_examples=placeholder(int),  # None = the whole split
      batch_size=256,          # rows (example x model) per compiled call
      attack_steps=10))        # PGD-k's k when an evaluation asks for 'pgd' (a quick check, not AA)

  # Periodic evaluation during training (adv_soups/evaluation/periodic.py): one entry per
  # evaluator, e.g. --config.evals.val.every=200 --config.evals.val.attack=apgd-ce. The last
  # step always runs every entry. A resumed run may change these settings.
  config.evals = ml_collections.ConfigDict(dict(
      val=periodic.evaluator(every=500, attack="pgd", domains="clean,adversarial")))
  return config
