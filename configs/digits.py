"""Co-training a tiny ViT on the handwritten digits bundled with scikit-learn (the default config).

  python -m adv_soups.train --config=configs/digits.py --workdir=workdirs/digits

Runs in about 2-3 minutes on 2 CPU cores (1,200 steps of 128 images). eps = 0.1 (l_inf) is our
choice: the images are 8x8 with 17 grey levels, so ImageNet's 4/255 would be a fraction of one
level. Expected (measured, see README): clean mode ~98% clean accuracy, robust mode ~98% clean and
~78% PGD-20 / ~77% APGD-CE accuracy at eps 0.1.
`get_config("mode=clean")` or `--config.train.mode=clean` selects another training mode.
"""
from adv_soups.training.config import base_config


def get_config(arg=None):
  config = base_config()
  config.seed = 0
  config.model.update(variant="tiny/2", image_size=8, num_classes=10, width=64, depth=2,
                      num_heads=4, mlp_dim=128)
  config.data.update(name="digits", shuffle_buffer=2048)
  config.train.update(mode="cotrain", steps=1200, batch_size=128, log_every=100,
                      checkpoint_every=400)
  config.evals.val.update(every=400, attack="pgd")  # PGD-20 (eval.attack_steps) on both modes
  config.optimizer.update(learning_rate=5e-3, warmup_steps=50, weight_decay=1e-4, b2=0.99)
  # Training attack: PGD-5, step 2.5 * eps / 5 (project default for digits, see PAPER.md B).
  config.attack.update(norm="linf", eps=0.1, num_steps=5)
  config.eval.update(batch_size=360, attack_steps=20)
  if arg:
    for item in arg.split(","):
      key, value = item.split("=")
      if key != "mode":
        raise ValueError(f"unknown config argument {key!r}: allowed 'mode'")
      config.train.mode = value
  return config
