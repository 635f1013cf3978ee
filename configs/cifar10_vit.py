"""Co-training a ViT-S/4 on CIFAR-10, l_inf eps = 8/255 (the CIFAR-10 standard): a one-GPU recipe.

  python -m adv_soups.train --config=configs/cifar10_vit.py --workdir=workdirs/cifar10 \
      --config.data.data_dir=/path/to/tensorflow_datasets

Needs CIFAR-10 prepared in TFDS format (`tfds build cifar10 --data_dir=...` on a machine with
network). Every choice here is ours (the paper trains on ImageNet only): ViT-S/4 at 32 px (64
patch tokens), 50k steps of batch 512 (512 epochs), AdamW (beta2 0.95, weight decay 0.05),
10k warm-up steps then cosine, label smoothing 0.1, drop path 0.1, pad-4 crop + flip then timm's
RandAugment rand-m9-mstd0.5-inc1 filled with the CIFAR-10 mean pixel, PGD-10 with step
2.5 * eps / 10 during training (PAPER.md B), eps ramped from 0 over the first 5 epochs; no mixup.
Cost (estimated, not measured): ~78 GFLOP per image for a PGD-10 co-training step of ViT-S/4
(26 forward-equivalents of ~3 GFLOP), 25.6M images: a few hours on one H100-class GPU at a
realistic 150-300 TFLOP/s, a day or more in float32 on older cards.
Expected, not measured here: clean mode ~88-92% clean accuracy; robust mode ~78-84% clean and
~45-50% PGD-20 / ~40-46% AutoAttack accuracy at 8/255 (from-scratch adversarially trained ViTs
of this size on CIFAR-10 in the literature), on the 10k test images.
"""
from adv_soups.training.config import base_config

CIFAR10_TRAIN_IMAGES = 50_000


def get_config(arg=None):
  del arg
  config = base_config()
  batch = 512
  steps_per_epoch = CIFAR10_TRAIN_IMAGES // batch
  config.model.update(variant="S/4", image_size=32, num_classes=10, drop_path_rate=0.1)
  config.data.update(name="cifar10", shuffle_buffer=20_000)
  config.data.randaugment.update(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5,
                                 fill=(125, 123, 114))  # CIFAR-10's mean pixel
  config.train.update(mode="cotrain", steps=50_000, batch_size=batch, label_smoothing=0.1,
                      log_every=100, checkpoint_every=2_000)
  config.optimizer.update(name="adamw", learning_rate=1e-3, warmup_steps=10_000, b1=0.9, b2=0.95,
                          weight_decay=0.05, grad_clip_norm=1.0)
  config.attack.update(norm="linf", eps=8 / 255, num_steps=10,
                       eps_warmup_steps=5 * steps_per_epoch)
  config.eval.update(batch_size=512, num_examples=2_048, attack_steps=20)
  config.evals.val.update(every=5_000, attack="pgd")  # PGD-k of config.eval on both modes
  return config
