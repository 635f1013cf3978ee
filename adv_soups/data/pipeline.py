"""tf.data input pipelines: per-process shards of TFDS datasets as numpy batches.

Every batch is process-local: {'image': float32 [b, H, W, C] in [0, 1], 'label': int32 [b]} (plus
'mask': bool [b] for evaluation); `adv_soups.parallel.shard_batch` turns it into a global array.
Each process reads its own part of a split (`tfds.split_for_jax_process`). Datasets read from
memory (`adv_soups.data.memory`: registered numpy arrays, and the digits where TensorFlow or TFDS
is not installed) go through the same functions without TensorFlow, which loads on first use.

Data config fields (`config.data`, an ml_collections ConfigDict; a dict works too):
  name            dataset name, see `adv_soups.data.registry` ('digits', 'cifar10', 'imagenet2012').
  data_dir        TFDS data directory; None = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  image_size      side length in pixels of the model input; None = the dataset's default
                  (8 / 32 / 224). Other sizes are resized to.
  shuffle_buffer  examples in the tf.data shuffle buffer (schema default 10_000). The buffer is part of
                  each iterator checkpoint: for ImageNet it holds encoded JPEGs (~110 kB each), so
                  10_000 costs ~1.1 GB per process per checkpoint; keep it modest.
  crop_min_scale  ImageNet random-resized-crop minimum area fraction (default 0.08; the maximum is
                  1, aspect ratios 3/4..4/3, as Inception / torchvision).
  prefetch        batches to prefetch (default 2).
  randaugment     ConfigDict(num_ops, magnitude, magnitude_std, prob, fill): timm's RandAugment
                  (`adv_soups.data.randaugment`) on the uint8 image after the augmentation below,
                  before the conversion to float; num_ops = 0 (the default) is off.

A field a data config lacks takes its default from the config schema (`training.config`).

Training augmentation (all stateless, keyed by (seed, process index, position in the stream)):
  digits   zero-pad 1 px and random-crop back to 8x8 (a +-1 px translation); no flip (digits are
           not mirror-symmetric).
  cifar    zero-pad 4 px, random 32x32 crop, horizontal flip (torchvision's RandomCrop(32, 4)).
  imagenet Inception-style random resized crop (area fraction [crop_min_scale, 1], aspect ratio
           [3/4, 4/3], 10 attempts then the whole image), resized (bilinear, antialiased) to
           image_size, horizontal flip. The crop is decoded straight from the JPEG.
  then, where `randaugment.num_ops` > 0, RandAugment on the image rounded to uint8 (exact for
  digits / cifar; for imagenet the resized crop is rounded, as PIL's resize would), with its own
  seed folded from the element's, then back to float.
Evaluation preprocessing:
  digits / cifar  none (resized if image_size differs from the native size).
  imagenet        resize the shorter side to round(image_size / 0.875) (bilinear, antialiased),
                  then take the central image_size x image_size crop.
  imagenet_c      ImageNet-C images are stored already centre-cropped at 224 x 224: only resized
                  to image_size when that differs.

Exact resume: `TrainIterator.save` / `restore` checkpoint the tf.data iterator itself
(`tf.train.Checkpoint(iterator=...)`: shuffle buffer, file positions, prefetched batches included)
plus the number of batches consumed. Since every random choice is a stateless function of the seed
and the element's position, a restored iterator continues with exactly the batches the original
would have produced.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator

import jax
import numpy as np
from etils import epath, epy

with epy.lazy_imports():  # loaded by the TFDS path only: in-memory sets need no TensorFlow
  import tensorflow as tf
  import tensorflow_datasets as tfds

from adv_soups.data import digits as digits_lib
from adv_soups.data import memory
from adv_soups.data import randaugment as randaugment_lib
from adv_soups.data import registry
from adv_soups.training.config import base_config

# A field absent from a data config takes the config schema's default (its one source).
_DEFAULTS = {k: v for k, v in base_config().data.to_dict().items()
             if k in ("data_dir", "image_size", "shuffle_buffer", "crop_min_scale", "prefetch",
                      "randaugment")}
_RANDAUGMENT_STREAM = 0x52414E44  # folded into each element's seed for RandAugment's draws


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared in the TFDS data_dir that was searched."""


def _field(config: Any, key: str) -> Any:
  """`config.key` (ConfigDict, dict or object), or its documented default when absent or None."""
  if isinstance(config, dict) or hasattr(config, "get"):
    value = config.get(key, None)
  else:
    value = getattr(config, key, None)
  return _DEFAULTS.get(key) if value is None else value


def _resolve(config_or_name: Any) -> tuple[Any, registry.DatasetSpec]:
  """(config or {'name': name}, spec) for a data config or a dataset name."""
  if isinstance(config_or_name, str):
    config_or_name = {"name": config_or_name}
  name = _field(config_or_name, "name")
  return config_or_name, registry.get_spec(name)


def _data_dir_for_message(data_dir: str | None) -> str:
  if data_dir is not None:
    return os.fspath(data_dir)
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def get_builder(spec: registry.DatasetSpec, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `spec` in `data_dir`; digits is prepared on first use (process 0 only)."""
  if spec.name == "digits":
    return digits_lib.prepare_digits(data_dir)
  return tfds.builder(spec.tfds_name, data_dir=data_dir)


def _as_dataset(spec, builder, data_dir, **kwargs) -> tf.data.Dataset:
  """`builder.as_dataset(**kwargs)`, turning TFDS's "could not find data" into one clear error."""
  try:
    return builder.as_dataset(**kwargs)
  except AssertionError as e:  # what TFDS raises when the builder's directory does not exist
    where = _data_dir_for_message(data_dir)
    raise DatasetNotFoundError(
        f"Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) is not prepared in data_dir {where!r} "
        f"(TFDS looked in {builder.data_dir!r}). To prepare it: "
        + spec.prepare_hint.format(data_dir=where)) from e


def _process() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


# ----------------------------------------------------------------------------------------------
# Preprocessing (pure TF functions of one example).

def _to_float(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(image, tf.float32) / 255.0


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Float image [h, w, c] resized to [size, size, c] (bilinear, antialiased; stays in [0, 1])."""
  return tf.image.resize(image, (size, size), method="bilinear", antialias=True)


def _maybe_resize(image: tf.Tensor, size: int, native: int) -> tf.Tensor:
  return image if size == native else _resize(image, size)


def _pad_and_crop(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
  """Zero-pad `pad` px on each side, then a random crop back to the input size."""
  shape = tf.shape(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, shape, seed=seed)


def _inception_crop(jpeg: tf.Tensor, size: int, min_scale: float, seed: tf.Tensor) -> tf.Tensor:
  """Random resized crop decoded from JPEG bytes, float [size, size, 3] in [0, 1]."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(jpeg),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(min_scale, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return _resize(_to_float(image), size)


def _central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Float image: shorter side resized to round(size / 0.875), then the central size x size crop."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = round(size / 0.875) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  new = tf.maximum(new, size)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return image[top:top + size, left:left + size, :]


def _randaugment_settings(config: Any) -> dict[str, Any] | None:
  """The RandAugment keyword arguments of `config.data.randaugment`, or None when it is off."""
  settings = _field(config, "randaugment")
  if settings is None or not int(settings.get("num_ops", 0) or 0):
    return None
  default = _DEFAULTS["randaugment"]
  kwargs = {"num_ops": int(settings["num_ops"]),
            "magnitude": float(settings.get("magnitude", default["magnitude"])),
            "magnitude_std": float(settings.get("magnitude_std", default["magnitude_std"])),
            "prob": float(settings.get("prob", default["prob"])),
            "fill": tuple(settings.get("fill", default["fill"]))}
  randaugment_lib.check_settings(**kwargs)
  return kwargs


def _apply_randaugment(image: tf.Tensor, seed: tf.Tensor, settings: dict[str, Any]) -> tf.Tensor:
  """Float image in [0, 1] -> uint8 (exact for images decoded from uint8) -> RandAugment -> float."""
  pixels = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
  # Its own stream, folded from the element's seed: the other augmentations keep their seeds.
  ra_seed = tf.random.experimental.stateless_fold_in(seed, _RANDAUGMENT_STREAM)
  return _to_float(randaugment_lib.randaugment(pixels, ra_seed, **settings))


def _train_preprocess(spec, size, min_scale, randaugment=None):
  """fn(seed [2] int64, example) -> {'image', 'label'}: stateless augmentation keyed on `seed`;
  `randaugment`: RandAugment keyword arguments, or None (off)."""

  def fn(seed, example):
    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if spec.preprocess == "imagenet":
      image = _inception_crop(example["image"], size, min_scale, crop_seed)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    else:
      image = _to_float(example["image"])
      if spec.preprocess == "digits":
        image = _pad_and_crop(image, 1, crop_seed)
      else:  # cifar
        image = _pad_and_crop(image, 4, crop_seed)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
      image = _maybe_resize(image, size, spec.image_size)
    image.set_shape((size, size, spec.channels))
    if randaugment is not None:
      image = _apply_randaugment(image, seed, randaugment)
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}

  return fn


def _eval_preprocess(spec, size):
  """fn(example) -> {'image', 'label', 'mask'} (deterministic)."""

  def fn(example):
    image = _to_float(example["image"])
    if spec.preprocess == "imagenet":
      image = _central_crop(image, size)
    else:
      image = _maybe_resize(image, size, spec.image_size)
    image.set_shape((size, size, spec.channels))
    return {"image": image, "label": tf.cast(example["label"], tf.int32),
            "mask": tf.constant(True)}

  return fn


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _to_numpy(batch: dict[str, tf.Tensor]) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in batch.items()}


def check_available(data_config: Any) -> None:
  """Raises (before anything is written) if the training data of `data_config` is not prepared:
  ValueError for an unknown name, `DatasetNotFoundError` saying where TFDS looked and how to
  prepare it. The bundled digits are prepared here on first use."""
  config, spec = _resolve(data_config)
  if memory.uses_memory(spec):
    memory.check_available(spec, _randaugment_settings(config))
    return
  if spec.train_split is None:
    raise ValueError(f"Dataset {spec.name!r} is evaluation-only (no train split)")
  data_dir = _field(config, "data_dir")
  _as_dataset(spec, get_builder(spec, data_dir), data_dir, split=spec.train_split)


# ----------------------------------------------------------------------------------------------
# Training.

class TrainIterator:
  """Infinite iterator of process-local training batches that can save and restore its position.

  Yields {'image': float32 [b, H, W, C] in [0, 1], 'label': int32 [b]}, b = global batch / process
  count. `save(directory)` / `restore(directory)` write / read `directory/process_{i}/iterator*`
  (tf.data iterator checkpoint + batches consumed); each process handles its own file.
  """

  def __init__(self, dataset: tf.data.Dataset, local_batch_size: int):
    self.dataset = dataset
    self.local_batch_size = local_batch_size
    self._iterator = iter(dataset)
    self._consumed = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator, consumed=self._consumed)

  @property
  def batches_consumed(self) -> int:
    """Batches this iterator has yielded since the start of training (restored by `restore`)."""
    return int(self._consumed.numpy())

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._consumed.assign_add(1)
    return _to_numpy(batch)

  @staticmethod
  def _prefix(directory: str) -> str:
    return os.path.join(os.fspath(directory), f"process_{jax.process_index()}", "iterator")

  def save(self, directory: str) -> str:
    """Writes this process's iterator state under `directory`; returns the checkpoint prefix."""
    prefix = self._prefix(directory)
    tf.io.gfile.makedirs(os.path.dirname(prefix))
    return self._checkpoint.write(prefix)

  def restore(self, directory: str) -> None:
    """Restores the state written by `save(directory)` (same pipeline configuration and seed)."""
    prefix = self._prefix(directory)
    if (epath.Path(prefix).parent / memory.POSITION_FILE).exists():
      from adv_soups import checkpoints as ckpt_lib
      raise ckpt_lib.RestoreMismatch(
          f"{os.path.dirname(prefix)} holds an in-memory input position: this run read the data "
          "without TensorFlow; resume it where tensorflow / tensorflow-datasets are not importable")
    if not tf.io.gfile.exists(prefix + ".index"):
      raise FileNotFoundError(f"No input-pipeline checkpoint at {prefix!r}")
    self._checkpoint.read(prefix).assert_consumed()


def train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                   image_size: int | None = None) -> TrainIterator:
  """Shuffled, augmented, repeated training batches of this process's shard of the train split.

  Args:
    data_config: `config.data` (see the module docstring) or a dataset name.
    global_batch_size: images per step over all processes; must divide by the process count.
    seed: int; fixes shuffling and augmentation (same seed -> same batches).
    image_size: pixels; overrides `data_config.image_size`.
  Returns:
    a `TrainIterator` of {'image': float32 [b, H, W, C] in [0, 1], 'label': int32 [b]},
    b = global_batch_size // jax.process_count().
  """
  config, spec = _resolve(data_config)
  if spec.train_split is None:
    raise ValueError(f"Dataset {spec.name!r} is evaluation-only (no train split)")
  index, count = _process()
  if global_batch_size % count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                     f"{count} processes")
  local_batch = global_batch_size // count
  size = image_size or _field(config, "image_size") or spec.image_size
  if memory.uses_memory(spec):
    memory.check_available(spec, _randaugment_settings(config))
    return memory.MemoryTrainIterator(spec, local_batch_size=local_batch, seed=seed,
                                      image_size=size, process_index=index, process_count=count)
  data_dir = _field(config, "data_dir")
  builder = get_builder(spec, data_dir)
  split = tfds.split_for_jax_process(
      spec.train_split, process_index=index, process_count=count, drop_remainder=True)
  decoders = {"image": tfds.decode.SkipDecoding()} if spec.preprocess == "imagenet" else None
  ds = _as_dataset(
      spec, builder, data_dir, split=split, shuffle_files=True, decoders=decoders,
      read_config=tfds.ReadConfig(shuffle_seed=seed, options=_options()))
  ds = ds.repeat()
  ds = ds.shuffle(int(_field(config, "shuffle_buffer")), seed=seed)
  base_seed = tf.constant([seed, index], tf.int64)
  ds = ds.enumerate().map(
      lambda i, ex: (tf.random.experimental.stateless_fold_in(base_seed, i), ex))
  ds = ds.map(_train_preprocess(spec, size, float(_field(config, "crop_min_scale")),
                                _randaugment_settings(config)),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(int(_field(config, "prefetch")))
  return TrainIterator(ds.with_options(_options()), local_batch)


# ----------------------------------------------------------------------------------------------
# Evaluation.

def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
  """Batches per process covering `num_examples` split over processes (the most loaded one)."""
  return math.ceil(math.ceil(num_examples / process_count) / batch_size)


def eval_batches(data_config_or_name: Any, *, split: str | None = None, batch_size: int,
                 num_examples: int | None = None, image_size: int | None = None,
                 data_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite, unshuffled process-local evaluation batches covering each example exactly once.

  Args:
    data_config_or_name: `config.data` or a dataset name (e.g. 'imagenet_r').
    split: TFDS split; None = the dataset's evaluation split ('test' / 'validation').
    batch_size: process-local batch size b.
    num_examples: if set, only the first N examples of the split (deterministic).
    image_size: pixels; overrides the config's / dataset's default.
    data_dir: overrides the config's data_dir.
  Returns:
    an iterator of {'image': float32 [b, H, W, C] in [0, 1], 'label': int32 [b], 'mask': bool [b]};
    every process yields the same number of batches (`num_eval_batches`), the last ones padded
    with zeros and mask False. Errors (unknown name, missing data) are raised by the call itself.
  """
  config, spec = _resolve(data_config_or_name)
  index, count = _process()
  size = image_size or _field(config, "image_size") or spec.image_size
  data_dir = data_dir if data_dir is not None else _field(config, "data_dir")
  split = split or spec.eval_split
  if memory.uses_memory(spec):
    return memory.eval_batches(spec, split=split, batch_size=batch_size, num_examples=num_examples,
                               image_size=size, process_index=index, process_count=count)
  if num_examples is not None:
    split = f"{split}[:{int(num_examples)}]"
  builder = get_builder(spec, data_dir)
  process_split = tfds.split_for_jax_process(
      split, process_index=index, process_count=count, drop_remainder=False)
  ds = _as_dataset(spec, builder, data_dir, split=process_split, shuffle_files=False,
                   read_config=tfds.ReadConfig(options=_options()))
  local = int(ds.cardinality().numpy())
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError):  # split sizes unknown (tfds.testing.mock_data)
    total = local * count
  if local < 0:
    raise ValueError(f"Unknown number of examples in {spec.name!r} split {split!r}")
  num_batches = num_eval_batches(total, batch_size, count)
  padding = num_batches * batch_size - local
  if padding < 0:
    raise ValueError(f"Process {index} has {local} examples of {split!r}, more than the "
                     f"{num_batches} x {batch_size} every process yields")
  ds = ds.map(_eval_preprocess(spec, size), num_parallel_calls=tf.data.AUTOTUNE)
  pad = {"image": tf.zeros((size, size, spec.channels), tf.float32),
         "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2).with_options(_options())
  return ds.as_numpy_iterator()


def split_size(name: str, split: str, data_dir: str | None) -> int | None:
  """Examples in `split` of dataset `name`; None when unknown (a TFDS split without sizes) or
  unreadable (a bad split: the evaluation's probe reports it)."""
  spec = registry.get_spec(name)
  try:
    if memory.uses_memory(spec):
      return memory.split_size(spec, split)
    return int(get_builder(spec, data_dir).info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except (unknown sizes only cost the progress total)
    return None


def process_offset(name: str, split: str, data_dir: str | None) -> int:
  """The global index of this process's first example of `eval_batches(name, split=split)`
  (each process reads an even, contiguous slice)."""
  index, count = _process()
  if count == 1 or index == 0:
    return 0
  spec = registry.get_spec(name)
  if memory.uses_memory(spec):
    return memory.process_slice(memory.split_size(spec, split), index, count)[0]
  builder = get_builder(spec, data_dir)
  parts = tfds.even_splits(split, n=count, drop_remainder=False)
  return int(sum(builder.info.splits[p].num_examples for p in parts[:index]))
