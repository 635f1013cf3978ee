"""In-memory data sets: numpy arrays read without TensorFlow (the digits where TensorFlow is not
installed, and any arrays given to `register_arrays`).

Batches have the tf.data pipelines' form: {'image': float32 [b, H, W, C] in [0, 1], 'label': int32
[b]} (plus 'mask': bool [b] for evaluation), process-local.

Training. Process i of P reads the contiguous slice [i * n, (i + 1) * n) of the train split,
n = N // P (the remainder is dropped, as `tfds.split_for_jax_process(drop_remainder=True)`). The
stream of that slice is epoch after epoch, each a permutation drawn from (seed, i, epoch); batch t
holds stream positions [t * b, (t + 1) * b), and its augmentation draws from (seed, i, t). So a
batch is a function of (seed, process, step) alone: the saved position is the number of batches
consumed (`MemoryTrainIterator.save`), and a resumed run continues with exactly the batches the
uninterrupted one reads. Augmentation by `DatasetSpec.preprocess`: 'digits' zero-pads 1 px and
crops back at a random offset; 'cifar' pads 4 px, crops and flips horizontally half the time;
'none' leaves the images alone. RandAugment (TF ops) is refused here. An `image_size` other than
the native one is reached with `jax.image.resize` (linear, antialiased).

Evaluation. Process i reads the contiguous slice of sizes N // P + (i < N % P) (the first ones get
one more), unshuffled; the last batches are padded with zeros and mask False, so that every
process yields `num_eval_batches` batches. Split names: 'train', 'test' (or the registered ones),
optionally sliced by example index, 'test[:100]', 'train[200:400]'.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
from typing import Any, Iterator, Mapping

import numpy as np
from etils import epath

from adv_soups.data import digits as digits_lib
from adv_soups.data import registry

POSITION_FILE = "position.json"
PREPROCESS = ("digits", "cifar", "none")
_PADS = {"digits": 1, "cifar": 4}
_ARRAYS: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # registered name -> splits


def importable(*modules: str) -> bool:
  """Whether every one of `modules` can be imported here (checked without importing them)."""
  try:
    return all(importlib.util.find_spec(m) is not None for m in modules)
  except (ImportError, ValueError):  # a blocked import, or sys.modules[m] = None
    return False


def uses_memory(spec: registry.DatasetSpec) -> bool:
  """Whether `spec` is read from memory: registered arrays always; the digits where TensorFlow
  or TFDS is not installed (else its TFDS builder, so the numbers of earlier runs stand)."""
  if spec.source == "memory":
    return True
  return spec.name == "digits" and not importable("tensorflow", "tensorflow_datasets")


def register_arrays(name: str, splits: Mapping[str, tuple[Any, Any]], *, num_classes: int,
                    train_split: str | None = "train", eval_split: str = "test",
                    preprocess: str = "none") -> registry.DatasetSpec:
  """Makes numpy arrays a dataset called `name` in this process (config.data.name = name).

  Args:
    splits: split name -> (images [N, H, W, C], uint8 in 0..255 or float in [0, 1]; labels [N]
      ints in [0, num_classes)); every split has the same square H = W and C.
    num_classes: the model's output size.
    train_split: the split training reads (None: evaluation only); eval_split: the default one.
    preprocess: training augmentation, one of PREPROCESS (see the module docstring).
  Returns:
    its `DatasetSpec`. A worker process (another host, a subprocess) must register it too.
  """
  if preprocess not in PREPROCESS:
    raise ValueError(f"preprocess={preprocess!r}; allowed: {', '.join(PREPROCESS)}")
  for split in filter(None, (train_split, eval_split)):
    if split not in splits:
      raise ValueError(f"split {split!r} is not among the arrays' splits {sorted(splits)}")
  checked, shape = {}, None
  for split, (images, labels) in splits.items():
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or len(images) != len(labels):
      raise ValueError(f"split {split!r}: images {images.shape} must be [N, H, H, C] with one "
                       f"label each (labels {labels.shape})")
    if shape not in (None, images.shape[1:]):
      raise ValueError(f"split {split!r}: images {images.shape[1:]} differ from {shape}")
    shape = images.shape[1:]
    if images.dtype != np.uint8 and (images.min() < 0 or images.max() > 1):
      raise ValueError(f"split {split!r}: float images must lie in [0, 1]")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"split {split!r}: labels must lie in [0, {num_classes})")
    checked[split] = (images, labels.astype(np.int32))
  spec = registry.register(registry.DatasetSpec(
      name=name, tfds_name=name, train_split=train_split, eval_split=eval_split,
      num_classes=int(num_classes), image_size=int(shape[0]), channels=int(shape[2]),
      preprocess=preprocess, source="memory",
      prepare_hint="register its arrays with adv_soups.data.memory.register_arrays"))
  _ARRAYS[name] = checked
  return spec


@functools.cache
def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = digits_lib.split_arrays(split)
  return images, labels.astype(np.int32)


def split_arrays(spec: registry.DatasetSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, H, W, C] uint8 or float, labels int32 [n]) of `split` ('test', 'test[:100]',
  'train[10:20]'); ValueError naming the split and the allowed forms otherwise."""
  match = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", split)
  available = (("train", "test") if spec.name == "digits" and spec.source != "memory"
               else tuple(_ARRAYS.get(spec.name, {})))
  if not match or match.group(1) not in available:
    raise ValueError(f"split {split!r} of in-memory dataset {spec.name!r}: allowed are "
                     f"{', '.join(available)}, each optionally sliced by index as NAME[A:B]")
  name = match.group(1)
  images, labels = (_ARRAYS[spec.name][name] if spec.name in _ARRAYS else _digits_split(name))
  start = int(match.group(2)) if match.group(2) else None
  stop = int(match.group(3)) if match.group(3) else None
  return images[start:stop], labels[start:stop]


def check_available(spec: registry.DatasetSpec, config_randaugment: Any) -> None:
  """Raises ValueError before anything is written if training cannot read `spec` from memory."""
  if spec.train_split is None:
    raise ValueError(f"Dataset {spec.name!r} is evaluation-only (no train split)")
  if config_randaugment is not None:
    raise ValueError(f"data.randaugment.num_ops={config_randaugment['num_ops']}: RandAugment "
                     f"runs in TensorFlow, and dataset {spec.name!r} is read from memory here "
                     "(TensorFlow not installed); set it to 0")
  split_arrays(spec, spec.train_split)


def _to_float(images: np.ndarray) -> np.ndarray:
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  return images.astype(np.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """float32 [b, h, w, c] -> [b, size, size, c] (linear, antialiased, clipped to [0, 1])."""
  if images.shape[1] == size:
    return images
  import jax
  out = jax.image.resize(images, (len(images), size, size, images.shape[3]), "linear",
                         antialias=True)
  return np.clip(np.asarray(out), 0.0, 1.0)


def _seed_words(*values: int) -> list[int]:
  return [int(v) % (1 << 64) for v in values]


class MemoryTrainIterator:
  """Infinite iterator of process-local training batches read from memory; its position is the
  number of batches consumed (see the module docstring). Same interface as `TrainIterator`."""

  def __init__(self, spec: registry.DatasetSpec, *, local_batch_size: int, seed: int,
               image_size: int, process_index: int, process_count: int):
    images, labels = split_arrays(spec, spec.train_split)
    n = len(images) // process_count
    if n < 1:
      raise ValueError(f"{spec.name!r} has {len(images)} training examples for "
                       f"{process_count} processes")
    part = slice(process_index * n, (process_index + 1) * n)
    self._images, self._labels = images[part], labels[part]
    self.spec, self.local_batch_size, self.seed = spec, int(local_batch_size), int(seed)
    self.image_size, self.process_index = int(image_size), int(process_index)
    self._consumed = 0
    self._orders: dict[int, np.ndarray] = {}

  @property
  def batches_consumed(self) -> int:
    """Batches yielded since the start of training (restored by `restore`)."""
    return self._consumed

  def __iter__(self) -> "MemoryTrainIterator":
    return self

  def _order(self, epoch: int) -> np.ndarray:
    """The permutation of this process's examples in `epoch` (the last two are kept)."""
    if epoch not in self._orders:
      rng = np.random.default_rng(_seed_words(self.seed, self.process_index, epoch))
      self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
      self._orders[epoch] = rng.permutation(len(self._labels))
    return self._orders[epoch]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Batch number `step` (0-based) of this process's stream: a function of (seed, process,
    step) only."""
    n, b = len(self._labels), self.local_batch_size
    positions = step * b + np.arange(b)
    rows = np.concatenate([self._order(int(e))[positions[positions // n == e] % n]
                           for e in np.unique(positions // n)])
    images = _to_float(self._images[rows])
    rng = np.random.default_rng(_seed_words(self.seed, self.process_index, step, 1))
    pad = _PADS.get(self.spec.preprocess)
    if pad:
      padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      top, left = rng.integers(0, 2 * pad + 1, size=(2, b))
      h, w = images.shape[1:3]
      images = np.stack([padded[k, t:t + h, l:l + w] for k, (t, l) in enumerate(zip(top, left))])
    if self.spec.preprocess == "cifar":
      flip = rng.random(b) < 0.5
      images[flip] = images[flip, :, ::-1]
    return {"image": _resize(images, self.image_size), "label": self._labels[rows]}

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self._consumed)
    self._consumed += 1
    return batch

  def _file(self, directory: str) -> epath.Path:
    return epath.Path(directory) / f"process_{self.process_index}" / POSITION_FILE

  def _identity(self) -> dict[str, Any]:
    return {"dataset": self.spec.name, "seed": self.seed, "local_batch_size": self.local_batch_size,
            "examples": len(self._labels)}

  def save(self, directory: str) -> str:
    """Writes `directory/process_<i>/position.json` (the batches consumed); returns its path."""
    path = self._file(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(self._identity(), batches_consumed=self._consumed)))
    return os.fspath(path)

  def restore(self, directory: str) -> None:
    """Moves to the position `save(directory)` wrote. A position of another pipeline (a tf.data
    iterator checkpoint) or of other settings is a `RestoreMismatch`, not damage."""
    from adv_soups import checkpoints as ckpt_lib
    path = self._file(directory)
    if not path.exists():
      if (path.parent / "iterator.index").exists():
        raise ckpt_lib.RestoreMismatch(
            f"{path.parent} holds a tf.data iterator checkpoint: this run read {self.spec.name!r} "
            "through TensorFlow; resume it where tensorflow and tensorflow-datasets are installed")
      raise FileNotFoundError(f"No input-pipeline position at {os.fspath(path)!r}")
    saved = json.loads(path.read_text())
    differ = [k for k, v in self._identity().items() if saved.get(k) != v]
    if differ:
      raise ckpt_lib.RestoreMismatch(
          f"input position {path} was saved with other settings ("
          + ", ".join(f"{k}: {saved.get(k)!r} -> {self._identity()[k]!r}" for k in differ) + ")")
    self._consumed = int(saved["batches_consumed"])


def process_slice(total: int, index: int, count: int) -> tuple[int, int]:
  """(start, stop) of process `index`'s evaluation examples among `total` (module docstring)."""
  base, extra = divmod(total, count)
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


def eval_batches(spec: registry.DatasetSpec, *, split: str, batch_size: int,
                 num_examples: int | None, image_size: int, process_index: int,
                 process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's evaluation batches of `split` (first `num_examples` if set): {'image' float32
  [b, S, S, C] in [0, 1], 'label' int32 [b], 'mask' bool [b]}, zero-padded with mask False to
  `ceil(ceil(total / P) / b)` batches on every process."""
  images, labels = split_arrays(spec, split)
  if num_examples is not None:
    images, labels = images[:int(num_examples)], labels[:int(num_examples)]
  total = len(labels)
  start, stop = process_slice(total, process_index, process_count)
  num_batches = math.ceil(math.ceil(total / process_count) / batch_size)

  def generate():
    for k in range(num_batches):
      lo, hi = start + k * batch_size, min(start + (k + 1) * batch_size, stop)
      real = max(hi - lo, 0)
      image = np.zeros((batch_size, image_size, image_size, spec.channels), np.float32)
      label = np.zeros((batch_size,), np.int32)
      if real:
        image[:real] = _resize(_to_float(images[lo:hi]), image_size)
        label[:real] = labels[lo:hi]
      yield {"image": image, "label": label, "mask": np.arange(batch_size) < real}

  return generate()


def split_size(spec: registry.DatasetSpec, split: str) -> int:
  """Examples in `split` (slices included)."""
  return len(split_arrays(spec, split)[1])
