"""How long the preemption save takes for the ImageNet config (must fit a ~30 s grace window).

  python -m bench.preemption_save [--dir=/tmp/preemption_save] [--buffer=10000] [--record_kb=110]

Writes what a preempted ImageNet run writes per process: (1) the tf.data iterator checkpoint of a
pipeline shaped like `adv_soups.data.train_iterator`'s (repeat, shuffle buffer of `--buffer`
encoded images of `--record_kb` kB each, ImageNet's mean JPEG size, enumerate, map, batch,
prefetch), and (2) the orbax checkpoint of ViT-B/16's parameters and AdamW state (86.6 M
parameters x 3, float32). Prints seconds (including `os.sync()`) and MB for each. Random bytes
stand in for JPEGs: a tf.data checkpoint stores buffered elements as they are, so only their size
matters.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time



def iterator_checkpoint_seconds(directory: str, buffer: int,
                                record_bytes: int) -> tuple[float, float]:
  """(seconds, MB) to write the iterator checkpoint of a filled shuffle buffer."""
  import tensorflow as tf
  ds = tf.data.Dataset.range(1 << 40).map(
      lambda i: {"image": tf.io.serialize_tensor(tf.cast(tf.random.stateless_uniform(
          [record_bytes], seed=tf.stack([i, 0]), maxval=256, dtype=tf.int32), tf.uint8)),
                 "label": tf.cast(i % 1000, tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.shuffle(buffer, seed=0).enumerate().map(lambda i, ex: ex)
  ds = ds.map(lambda ex: {"image": tf.strings.length(ex["image"]), "label": ex["label"]})
  ds = ds.batch(64, drop_remainder=True).prefetch(2)
  iterator = iter(ds)
  for _ in range(3):  # fills the buffer
    next(iterator)
  checkpoint = tf.train.Checkpoint(iterator=iterator)
  prefix = os.path.join(directory, "iterator", "ckpt")
  start = time.perf_counter()
  checkpoint.write(prefix)
  os.sync()  # on disk, not just in the page cache
  seconds = time.perf_counter() - start
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
             os.walk(os.path.dirname(prefix)) for f in fs)
  return seconds, size / 1e6


def orbax_checkpoint_seconds(directory: str) -> tuple[float, float]:
  """(seconds, MB) to save ViT-B/16 parameters + AdamW moments through adv_soups.checkpoints."""
  import jax
  from adv_soups import checkpoints
  from adv_soups.models import create_model, init_params
  from configs import imagenet_vit_b16
  config = imagenet_vit_b16.get_config()
  model = create_model(config.model)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), 3))
  leaves, treedef = jax.tree.flatten(shapes)
  keys = iter(jax.random.split(jax.random.key(0), 3 * len(leaves)))
  noise = lambda: jax.tree.unflatten(treedef, [  # random: orbax compresses constant arrays
      jax.random.normal(next(keys), s.shape, s.dtype) for s in leaves])
  params, opt_state = noise(), {"mu": noise(), "nu": noise()}
  manager = checkpoints.Checkpoints(os.path.join(directory, "workdir"))
  start = time.perf_counter()
  manager.save(1, {}, params=params, opt_state=opt_state)
  os.sync()
  seconds = time.perf_counter() - start
  manager.close()
  root = os.path.join(directory, "workdir", "checkpoints")
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
  return seconds, size / 1e6


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/preemption_save")
  parser.add_argument("--buffer", type=int, default=10_000)
  parser.add_argument("--record_kb", type=float, default=110.0)
  args = parser.parse_args()
  shutil.rmtree(args.dir, ignore_errors=True)
  os.makedirs(args.dir)
  seconds, mb = iterator_checkpoint_seconds(args.dir, args.buffer, int(args.record_kb * 1000))
  print(f"tf.data iterator checkpoint, shuffle buffer {args.buffer} x {args.record_kb:g} kB: "
        f"{mb:.0f} MB in {seconds:.1f} s ({mb / seconds:.0f} MB/s)")
  seconds, mb = orbax_checkpoint_seconds(args.dir)
  print(f"orbax checkpoint, ViT-B/16 params + AdamW state: {mb:.0f} MB in {seconds:.1f} s "
        f"({mb / seconds:.0f} MB/s)")
  shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
