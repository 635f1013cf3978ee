"""The `digits` data set: scikit-learn's bundled handwritten digits (no download needed), as a
TFDS builder (`Digits`, defined on first use) and as arrays (`split_arrays`, no TensorFlow).

1,797 greyscale 8x8 images (UCI optical digits, values 0..16) in 10 classes, stored as uint8
(8, 8, 1) images scaled by round(v * 255 / 16) (0 -> 0, 8 -> 128, 16 -> 255).

The split is fixed and independent of any library's random generator: within each class, examples
are ordered by the SHA-256 of the string f"digits-{i}" (i = index in `sklearn.datasets.load_digits`),
and the first k_c of that order go to `test`. k_c is the class's share of 360 test examples: floor(
n_c * 360 / 1797), with the remainder handed out one each to the classes with the largest
fractional parts (ties: smaller class label first). So `test` has 360 examples (~20%, stratified)
and `train` 1,437. Every example also carries `index`, its position in `load_digits`.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import os
import sys

import numpy as np

NUM_TRAIN = 1437
NUM_TEST = 360


def scaled_images() -> tuple[np.ndarray, np.ndarray]:
  """sklearn's digits as (images uint8 [1797, 8, 8, 1] in 0..255, labels int64 [1797])."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.floor(digits.images * 255.0 / 16.0 + 0.5).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, num_test: int = NUM_TEST) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, test indices), each sorted, by the rule in the module docstring."""
  n = len(labels)
  classes = np.unique(labels)
  counts = np.array([(labels == c).sum() for c in classes])
  exact = counts * num_test / n
  take = np.floor(exact).astype(int)
  remainder = num_test - take.sum()
  # Largest fractional part first; np.lexsort's last key is the primary one, ties by class.
  order = np.lexsort((classes, -(exact - take)))
  take[order[:remainder]] += 1
  test = []
  for c, k in zip(classes, take):
    members = np.flatnonzero(labels == c)
    members = sorted(members, key=lambda i: hashlib.sha256(f"digits-{i}".encode()).hexdigest())
    test.extend(members[:k])
  test = np.sort(np.asarray(test, dtype=np.int64))
  train = np.setdiff1d(np.arange(n), test)
  return train, test


def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 8, 8, 1] in 0..255, labels int64 [n]) of 'train' or 'test', in index
  order (the TFDS builder holds the same examples; its files order them differently)."""
  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
  images, labels = scaled_images()
  chosen = split_indices(labels)[0 if split == "train" else 1]
  return images[chosen], labels[chosen]


def __getattr__(name: str):
  if name == "Digits":  # the TFDS builder class, defined on first use (it needs TFDS)
    return builder_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def builder_class():
  """The `Digits` TFDS builder class (imports tensorflow_datasets; defined once per process)."""
  import tensorflow_datasets as tfds

  class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits; fixed stratified train (1,437) / test (360) split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
          description=__doc__,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(8, 8, 1)),
              "label": tfds.features.ClassLabel(num_classes=10),
              "index": tfds.features.Scalar(dtype=np.int64),
          }),
          supervised_keys=("image", "label"),
          homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      images, labels = scaled_images()
      train, test = split_indices(labels)
      return {
          "train": self._generate_examples(images, labels, train),
          "test": self._generate_examples(images, labels, test),
      }

    def _generate_examples(self, images, labels, indices):
      for i in indices:
        yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}

  return Digits


def prepare_digits(data_dir: str | None = None):
  """The digits builder in `data_dir` (None = $TFDS_DATA_DIR or ~/tensorflow_datasets), prepared
  if needed, once per data_dir.

  A remote data_dir (gs://...) is prepared by process 0; a local one by one process per host under
  a file lock (`<data_dir>/.digits.lock`: the others on that host wait for it, then find it
  prepared), so hosts with their own disks each get their copy. With several processes all of
  them must make their first call for a data_dir together: they meet at a barrier before
  reading; later calls in the same process return at once (process-local).
  """
  import jax
  Digits = builder_class()
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  if os.fspath(where) in _PREPARED:  # later calls are process-local: no barrier, no global call
    return Digits(data_dir=data_dir)
  if "://" in os.fspath(where):
    if jax.process_index() == 0 and not Digits(data_dir=data_dir).is_prepared():
      _prepare(Digits(data_dir=data_dir), where)
  else:
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, ".digits.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      builder = Digits(data_dir=data_dir)
      if not builder.is_prepared():
        _prepare(builder, where)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("adv_soups.data.digits prepared")
  _PREPARED.add(os.fspath(where))
  return Digits(data_dir=data_dir)  # (re-)reads the prepared info


def _prepare(builder: Digits, where: str) -> None:
  """download_and_prepare with one line on stderr saying where, instead of TFDS's banners (which
  it prints to stdout; its bars are off where `screen.quiet_libraries` ran)."""
  print(f"preparing the bundled digits data set (1,797 images, once) in {where}",
        file=sys.stderr, flush=True)
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # our line above says what happens
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare()


_PREPARED: set[str] = set()  # data_dirs this process has seen prepared (after the barrier)
