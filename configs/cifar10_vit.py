"""Co-training a small ViT on CIFAR-10, l_inf eps = 8/255 (the CIFAR-10 standard).

  python -m adv_soups.train --config=configs/cifar10_vit.py --workdir=workdirs/cifar10 \
      --config.data.data_dir=/path/to/tensorflow_datasets

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10 --data_dir=...` on a machine with
network). ViT-S/4 at 32 px (64 tokens); PGD-10 during training (project default for CIFAR, see
PAPER.md B). About a day on one modern GPU for 100k steps of batch 512; expect roughly 85-90%
clean (clean mode) and 45-55% PGD robust accuracy (robust mode): not measured here.
"""
from adv_soups import config_base


def get_config(arg=None):
  del arg
  config = config_base.base_config()
  config.model.update(variant="S/4", image_size=32, num_classes=10, drop_path_rate=0.1)
  config.data.update(name="cifar10", shuffle_buffer=20_000)
  config.train.update(mode="cotrain", steps=100_000, batch_size=512, label_smoothing=0.1,
                      log_every=100, eval_every=5_000, checkpoint_every=2_000)
  config.optimizer.update(name="adamw", learning_rate=1e-3, warmup_steps=5_000, b1=0.9, b2=0.95,
                          weight_decay=0.05, grad_clip_norm=1.0)
  config.attack.update(norm="linf", eps=8 / 255, num_steps=10)
  config.eval.update(batch_size=512, num_examples=2_048, attack_steps=20)
  return config
