"""Adversarial co-training fine-tune of a public ViT-B/16 on CIFAR-10 (l_inf eps = 8/255).

  python -m adv_soups.train --config=configs/cifar10_finetune_vit_b16.py \
      --workdir=workdirs/cifar10_ft_b16 --config.data.data_dir=/path/to/tensorflow_datasets \
      --config.model.init_from=gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz \
      [--config.train.trainable=adapters] [--config.model.image_size=384]

`model.init_from` is required in practice (None trains ViT-B/16 from scratch): any ViT-B/16 .npz
in the google-research/vision_transformer layout (AugReg `gs://vit_models/augreg/*.npz`, the
original `gs://vit_models/imagenet21k/ViT-B_16.npz`, ...) or a big_vision pool_type='tok' file;
see README "Starting from public weights". They expect inputs in [-1, 1], i.e. our mean = std =
0.5 (the default). CIFAR images are resized to `model.image_size` (224 = the checkpoint's
resolution, no resampling; 384 or 32 resample the position grid bilinearly). The 10-class head
is new (the files have 1,000 or 21,843 classes) and starts at zero.

Numbers from the vision_transformer fine-tuning recipe (vit_jax/configs/common.py): SGD with
momentum, no weight decay, global-norm clipping at 1, batch 512, 500 warmup steps then cosine,
10k steps for CIFAR-10 (which it runs at 384 px); its base learning rate 0.03 is for clean
fine-tuning.
Our choices (the paper fine-tunes nothing): 0.01 for co-training, PGD-5 during training with step
2.5 * eps / 5, label smoothing 0. Not measured here (no GPU): expect hours on one modern GPU at
224 px; with `trainable=adapters` only the class tokens and the head train.
"""
from adv_soups.training.config import base_config


def get_config(arg=None):
  del arg
  config = base_config()
  config.model.update(variant="B/16", image_size=224, num_classes=10, adapter="token",
                      mean=(0.5,), std=(0.5,))  # the public files' [-1, 1] inputs
  config.data.update(name="cifar10", shuffle_buffer=20_000)
  config.train.update(mode="cotrain", steps=10_000, batch_size=512, log_every=100,
                      checkpoint_every=1_000, trainable="all")
  config.optimizer.update(name="sgd", learning_rate=0.01, momentum=0.9, weight_decay=0.0,
                          warmup_steps=500, schedule="cosine", grad_clip_norm=1.0)
  config.attack.update(norm="linf", eps=8 / 255, num_steps=5)
  config.eval.update(batch_size=512, num_examples=2_048, attack_steps=20)
  config.evals.val.update(every=1_000, attack="pgd")  # PGD-20 (config.eval) on both modes
  return config
