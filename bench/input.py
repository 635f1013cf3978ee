"""Input-pipeline throughput, with and without RandAugment, against the train step's images/s.

  .venv/bin/python -m bench.input [--datasets=digits,cifar10,imagenet2012] [--batches=20]
      [--batch_size=128] [--step_images_per_sec=cifar10:N,imagenet2012:M]

For cifar10 and imagenet2012 the benchmark writes records shaped like the real ones (32x32 PNGs;
JPEGs of ~400x350 px) in TFDS format into a temporary data_dir, under the official builders'
names, versions and features, so `adv_soups.data.train_iterator` reads them exactly as it would
the real data sets; digits is the bundled one. The pipeline runs with each data set's config
(configs/digits.py, cifar10_vit.py, imagenet_vit_b16.py), once with RandAugment off and once with
num_ops=2, m=9, mstd=0.5. One JSON line per data set: images/s of each, and the ratio to the
train step's images/s where given (`--step_images_per_sec`, measured with bench/train_step.py on
the accelerator that will train). Target: >= 3x the step.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

_CONFIGS = {"digits": "digits", "cifar10": "cifar10_vit", "imagenet2012": "imagenet_vit_b16"}


def _fake_examples(name: str, count: int, seed: int = 0):
  """Synthetic examples with the official features' keys (smooth images plus noise)."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    if name == "cifar10":
      h = w = 32
    else:
      h, w = int(rng.integers(300, 500)), int(rng.integers(300, 500))
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / rng.uniform(5, 40))[..., None] * 60 + np.cos(yy / rng.uniform(5, 40))[..., None] * 60
            + rng.uniform(60, 190, 3))
    image = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    label = int(rng.integers(0, 10 if name == "cifar10" else 1000))
    if name == "cifar10":
      yield i, {"id": f"train_{i:05d}", "image": image, "label": label}
    else:
      yield i, {"file_name": f"n{i:08d}.JPEG", "image": image, "label": label}


def write_fake_dataset(name: str, data_dir: str, count: int) -> None:
  """Writes `count` train examples of `name` in TFDS format under data_dir (official layout)."""
  import tensorflow_datasets as tfds
  official = tfds.builder(name, data_dir=data_dir)
  features, version = official.info.features, official.version

  class Fake(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = version

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"train": _fake_examples(name, count)}

    def _generate_examples(self):  # pragma: no cover (split generators yield directly)
      raise NotImplementedError

  Fake.name = name
  Fake(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False))


def time_pipeline(data_config, batch_size: int, batches: int) -> float:
  """Images/s of `batches` batches after 3 warm-up batches."""
  from adv_soups import data as data_lib
  it = data_lib.train_iterator(data_config, global_batch_size=batch_size, seed=0)
  for _ in range(3):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--datasets", default="digits,cifar10,imagenet2012")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--examples", type=int, default=0,
                      help="records to write per data set (default: 4 x batch_size)")
  parser.add_argument("--step_images_per_sec", default="",
                      help="NAME:IMAGES_PER_SEC,... of the train step to compare with")
  args = parser.parse_args(argv)
  from adv_soups import cli
  datasets = [d for d in args.datasets.split(",") if d]
  for d in datasets:
    if d not in _CONFIGS:
      cli.fail(f"unknown --datasets entry {d!r}: allowed {sorted(_CONFIGS)}")
  steps = {}
  for item in filter(None, args.step_images_per_sec.split(",")):
    name, _, value = item.partition(":")
    try:
      steps[name] = float(value)
    except ValueError:
      cli.fail(f"--step_images_per_sec entry {item!r} is not NAME:NUMBER")
  import importlib
  with tempfile.TemporaryDirectory() as data_dir:
    for name in datasets:
      config = importlib.import_module(f"configs.{_CONFIGS[name]}").get_config().data
      config.data_dir = data_dir
      config.shuffle_buffer = min(int(config.shuffle_buffer), 1024)
      if name != "digits":
        write_fake_dataset(name, data_dir, args.examples or 4 * args.batch_size)
      result = {"dataset": name, "batch_size": args.batch_size,
                "image_size": 224 if name == "imagenet2012" else (32 if name == "cifar10" else 8),
                "cpu_cores": os.cpu_count()}
      for label, num_ops in (("images_per_sec_plain", 0), ("images_per_sec_randaugment", 2)):
        config.randaugment.num_ops = num_ops
        result[label] = round(time_pipeline(config, args.batch_size, args.batches), 1)
      if name in steps:
        result["step_images_per_sec"] = steps[name]
        result["randaugment_over_step"] = round(result["images_per_sec_randaugment"]
                                                / steps[name], 2)
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
