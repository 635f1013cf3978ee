"""Tests of adv_soups.data: the digits builder, the registry and the tf.data pipelines.

Everything runs offline in a temporary TFDS data_dir: digits come from scikit-learn's bundled copy,
the other datasets from `tfds.testing.mock_data`.
"""
import collections
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from adv_soups import data
from adv_soups.data import digits as digits_lib

SMALL = {"shuffle_buffer": 64}  # keeps mock-data pipelines fast (the buffer fills on first use)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A data_dir with digits prepared (once for the module)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  data.prepare_digits(path)
  return path


def _digits_config(data_dir, **kw):
  return {"name": "digits", "data_dir": data_dir, "shuffle_buffer": 256, **kw}


def _raw_split(data_dir, split):
  """(uint8 images [n, 8, 8, 1], labels [n], sklearn indices [n]) of a prepared digits split."""
  ds = data.Digits(data_dir=data_dir).as_dataset(split=split)
  exs = list(ds.as_numpy_iterator())
  return (np.stack([e["image"] for e in exs]), np.array([e["label"] for e in exs]),
          np.array([e["index"] for e in exs]))


def _example_keys(batches):
  """Multiset of (image bytes, label) over the unmasked examples of eval batches."""
  keys = collections.Counter()
  for b in batches:
    for image, label in zip(b["image"][b["mask"]], b["label"][b["mask"]]):
      keys[(np.round(image * 255).astype(np.uint8).tobytes(), int(label))] += 1
  return keys


# ------------------------------------------------------------------------------------------------
# The digits builder.

def test_digits_builder(digits_dir, tmp_path):
  builder = data.Digits(data_dir=digits_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1437
  assert builder.info.splits["test"].num_examples == 360
  assert builder.info.features["label"].num_classes == 10

  sk_images, sk_labels = digits_lib.scaled_images()
  from sklearn.datasets import load_digits
  raw = load_digits()
  for i in (0, 1, 100, 1796):  # the stored scaling is round(v * 255 / 16)
    np.testing.assert_array_equal(
        sk_images[i, ..., 0], np.floor(raw.images[i] * 255 / 16 + 0.5).astype(np.uint8))
  assert sk_images.max() == 255 and sk_images.min() == 0

  images, labels, index = _raw_split(digits_dir, "train")
  test_images, test_labels, test_index = _raw_split(digits_dir, "test")
  assert len(set(index) | set(test_index)) == 1797 and not set(index) & set(test_index)
  for j in (0, 5, 700):
    np.testing.assert_array_equal(images[j], sk_images[index[j]])
    assert labels[j] == sk_labels[index[j]]
  np.testing.assert_array_equal(test_images[3], sk_images[test_index[3]])
  # Stratified: every class has 35..37 test examples (~20% of ~180).
  assert set(np.bincount(test_labels, minlength=10)) <= {35, 36, 37}

  # A second preparation elsewhere gives the same split, in the same stored order.
  other = str(tmp_path / "again")
  data.prepare_digits(other)
  np.testing.assert_array_equal(_raw_split(other, "test")[2], test_index)
  np.testing.assert_array_equal(_raw_split(other, "train")[2], index)


def test_digits_prepared_by_process_zero_only(tmp_path, monkeypatch):
  """A local data_dir is prepared before the barrier by one process per host, under the host's
  file lock (so hosts without a shared disk each make their copy); every process then meets the
  others at the barrier with the data prepared."""
  from jax.experimental import multihost_utils
  at_barrier = []  # (process index, data_dir prepared?) at each barrier
  def barrier(name):
    at_barrier.append((jax.process_index(), data.Digits(data_dir=current).is_prepared()))
  monkeypatch.setattr(multihost_utils, "sync_global_devices", barrier)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  current = str(tmp_path / "not_shared")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  # Process 0 wrote elsewhere (no shared disk): process 1 makes its own copy before the barrier.
  assert data.prepare_digits(current).is_prepared()
  current = str(tmp_path / "shared")
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert data.prepare_digits(current).is_prepared()
  assert at_barrier == [(1, True), (0, True)]


# ------------------------------------------------------------------------------------------------
# Registry.

def test_dataset_info_without_disk():
  assert data.dataset_info("digits") == (10, (8, 8, 1))
  assert data.dataset_info("cifar10") == (10, (32, 32, 3))
  assert data.dataset_info("imagenet2012") == (1000, (224, 224, 3))
  assert data.dataset_info("imagenet2012", image_size=64) == (1000, (64, 64, 3))
  assert data.dataset_info("imagenet_r") == (1000, (224, 224, 3))
  assert data.dataset_info("cifar10_corrupted/fog_2") == (10, (32, 32, 3))


def test_unknown_name_lists_allowed_names():
  with pytest.raises(ValueError, match="not_a_dataset") as err:
    data.get_spec("not_a_dataset")
  for name in ("digits", "cifar10", "imagenet2012", "imagenet_r", "imagenet2012_corrupted/"):
    assert name in str(err.value)
  with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
    data.eval_batches("nope", batch_size=8)
  with pytest.raises(ValueError, match="imagenet2012_corrupted/fog_9"):
    data.get_spec("imagenet2012_corrupted/fog_9")
  with pytest.raises(ValueError, match="glass_blur"):  # CIFAR-10-C calls it frosted_glass_blur
    data.get_spec("cifar10_corrupted/glass_blur_1")


def test_corrupted_dataset_names():
  for base, family in (("imagenet2012", "imagenet2012_corrupted"), ("cifar10", "cifar10_corrupted")):
    names = data.corrupted_datasets(base)
    assert len(names) == 75 == len(set(names))
    assert names[0] == f"{family}/gaussian_noise_1" and names[-1] == f"{family}/jpeg_compression_5"
    for name in names:
      spec = data.get_spec(name)
      assert spec.tfds_name == name and spec.train_split is None
  assert data.get_spec("imagenet2012_corrupted/gaussian_noise_1").eval_split == "validation"
  # Every name is a config TFDS knows.
  for name in data.corrupted_datasets("imagenet2012")[::7] + data.corrupted_datasets("cifar10")[::7]:
    family, config = name.split("/")
    assert config in {c.name for c in tfds.builder_cls(family).BUILDER_CONFIGS}


def test_class_subsets(tmp_path):
  assert data.get_spec("imagenet2012").class_subset is None
  names_file = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
  wnids = open(names_file).read().split()
  assert len(wnids) == 1000
  for name, known in (
      ("imagenet_r", {"n01443537": 1, "n09472597": 980, "n10565667": 983, "n12267677": 988}),
      ("imagenet_a", {"n01498041": 6, "n01531178": 11, "n01534433": 13})):
    spec = data.get_spec(name)
    subset = spec.class_subset
    assert len(subset) == 200 == len(set(subset)) and list(subset) == sorted(subset)
    assert 0 <= subset[0] and subset[-1] < 1000 and spec.num_classes == 1000
    assert spec.label_space == "full"
    for wnid, i in known.items():
      assert wnids[i] == wnid and i in subset
    # TFDS labels these sets with the 1000-way ImageNet index.
    assert tfds.builder_cls(name)(data_dir=str(tmp_path)).info.features["label"].num_classes == 1000


def test_subset_predictions():
  logits = np.full((2, 1000), -5.0, np.float32)
  logits[0, 0] = 10.0  # the global argmax, outside ImageNet-R's classes
  logits[0, 988] = 3.0
  logits[1, 4] = 1.0
  preds = np.asarray(data.subset_predictions(logits, data.IMAGENET_R_CLASSES))
  np.testing.assert_array_equal(preds, [988, 4])
  np.testing.assert_array_equal(np.asarray(data.subset_predictions(logits, None)), [0, 4])


# ------------------------------------------------------------------------------------------------
# Training pipeline.

def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_iterator_shapes_and_range(digits_dir):
  import ml_collections  # the training config's type; unset fields take their defaults
  config = ml_collections.ConfigDict({"name": "digits", "data_dir": digits_dir, "image_size": None})
  it = data.train_iterator(config, global_batch_size=32, seed=0)
  for batch in _take(it, 3):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].max() == 1.0 and 0 <= batch["label"].min() <= batch["label"].max() < 10
  assert it.batches_consumed == 3


def test_train_iterator_is_infinite_and_batches_must_divide(digits_dir, monkeypatch):
  it = data.train_iterator(_digits_config(digits_dir), global_batch_size=512, seed=0)
  assert len(_take(it, 4)) == 4  # 2,048 images > 1,437: it repeats
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="divisible"):
    data.train_iterator(_digits_config(digits_dir), global_batch_size=33, seed=0)


def test_train_iterator_deterministic_from_seed(digits_dir):
  config = _digits_config(digits_dir)
  a = _take(data.train_iterator(config, global_batch_size=16, seed=3), 3)
  b = _take(data.train_iterator(config, global_batch_size=16, seed=3), 3)
  c = _take(data.train_iterator(config, global_batch_size=16, seed=4), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not all(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def test_digits_augmentation_is_a_small_translation(digits_dir):
  """Each training image is a raw train image shifted by at most 1 px (zero fill), not always 0."""
  images, labels, _ = _raw_split(digits_dir, "train")
  padded = np.pad(images[..., 0], ((0, 0), (1, 1), (1, 1)))
  shifted = {}  # image bytes -> set of (dy, dx) offsets that produce it (with its label)
  for dy in range(3):
    for dx in range(3):
      for image, label in zip(padded[:, dy:dy + 8, dx:dx + 8], labels):
        shifted.setdefault((image.tobytes(), int(label)), set()).add((dy - 1, dx - 1))
  it = data.train_iterator(_digits_config(digits_dir), global_batch_size=64, seed=1)
  offsets = collections.Counter()
  for batch in _take(it, 2):
    for image, label in zip(batch["image"][..., 0], batch["label"]):
      key = (np.round(image * 255).astype(np.uint8).tobytes(), int(label))
      assert key in shifted, "not a <= 1 px translation of a training image"
      offsets.update(shifted[key])
  assert sum(v for k, v in offsets.items() if k != (0, 0)) > 0
  # Images that could only come from a non-zero shift: augmentation did change them.
  changed = sum(1 for b in _take(it, 1) for img, lab in zip(b["image"][..., 0], b["label"])
                if (0, 0) not in shifted[(np.round(img * 255).astype(np.uint8).tobytes(), int(lab))])
  assert changed > 16


def test_train_iterator_exact_resume(digits_dir, tmp_path):
  config = _digits_config(digits_dir)
  it = data.train_iterator(config, global_batch_size=32, seed=7)
  _take(it, 5)  # N = 5 (past the first shuffle-buffer fill)
  it.save(str(tmp_path / "ckpt"))
  assert os.path.exists(tmp_path / "ckpt" / "process_0" / "iterator.index")
  expected = _take(it, 4)  # M = 4
  fresh = data.train_iterator(config, global_batch_size=32, seed=7)
  fresh.restore(str(tmp_path / "ckpt"))
  assert fresh.batches_consumed == 5
  got = _take(fresh, 4)
  for x, y in zip(expected, got):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # A fresh, unrestored iterator starts elsewhere (so the test above can fail).
  start = _take(data.train_iterator(config, global_batch_size=32, seed=7), 1)[0]
  assert not np.array_equal(start["image"], expected[0]["image"])
  with pytest.raises(FileNotFoundError):
    fresh.restore(str(tmp_path / "nothing_here"))


# ------------------------------------------------------------------------------------------------
# Evaluation pipeline.

def test_eval_batches_cover_each_example_once(digits_dir):
  batches = list(data.eval_batches(_digits_config(digits_dir), split="test", batch_size=64))
  assert len(batches) == 6 == data.num_eval_batches(360, 64, 1)
  for b in batches:
    assert b["image"].shape == (64, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and mask[:360].all() and not mask[360:].any()
  assert not batches[-1]["image"][~batches[-1]["mask"]].any()  # padding is zeros
  images, labels, _ = _raw_split(digits_dir, "test")
  raw = collections.Counter(
      (image.tobytes(), int(label)) for image, label in zip(images, labels))
  assert _example_keys(batches) == raw
  # Deterministic order: the same batches again.
  again = list(data.eval_batches("digits", batch_size=64, data_dir=digits_dir))
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_eval_batches_num_examples(digits_dir):
  batches = list(data.eval_batches("digits", batch_size=32, num_examples=100, data_dir=digits_dir))
  assert len(batches) == 4 and sum(b["mask"].sum() for b in batches) == 100
  images = _raw_split(digits_dir, "test[:100]")[0]
  first = np.concatenate([b["image"] for b in batches])[:100]
  np.testing.assert_array_equal(np.round(first * 255).astype(np.uint8), images)


@pytest.mark.parametrize("num_examples", [360, 33])  # 33: 17 + 16, still 2 batches each
def test_eval_batches_split_over_two_processes(digits_dir, monkeypatch, num_examples):
  from jax.experimental import multihost_utils
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  per_process = []
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    per_process.append(list(data.eval_batches(
        "digits", batch_size=16, num_examples=num_examples, data_dir=digits_dir)))
  assert len(per_process[0]) == len(per_process[1]) == data.num_eval_batches(num_examples, 16, 2)
  keys0, keys1 = (_example_keys(b) for b in per_process)
  assert sum(keys0.values()) == (num_examples + 1) // 2
  assert sum(keys1.values()) == num_examples // 2
  images, labels, _ = _raw_split(digits_dir, f"test[:{num_examples}]")
  everything = collections.Counter((i.tobytes(), int(l)) for i, l in zip(images, labels))
  assert keys0 + keys1 == everything  # disjoint, and together the whole (sub)split


def test_train_split_over_two_processes(digits_dir, monkeypatch):
  """Two processes read disjoint halves of the train split that together hold all of it less the
  drop_remainder example (1,437 = 2 x 718 + 1). Examples are identified by their sklearn index,
  put in the label by a wrapped preprocessing (mutation: `process_index=0` in train_iterator)."""
  import tensorflow as tf
  from jax.experimental import multihost_utils
  from adv_soups.data import pipeline
  real = pipeline._train_preprocess

  def with_index(*args, **kwargs):
    fn = real(*args, **kwargs)
    return lambda seed, ex: {**fn(seed, ex), "label": tf.cast(ex["index"], tf.int32)}
  monkeypatch.setattr(pipeline, "_train_preprocess", with_index)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  seen = []
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    # A small shuffle buffer: after 3 passes' worth of batches every example has come out.
    it = data.train_iterator(_digits_config(digits_dir, shuffle_buffer=64),
                             global_batch_size=64, seed=0)
    batches = _take(it, 3 * 718 // 32)
    assert batches[0]["image"].shape == (32, 8, 8, 1)
    seen.append(set(np.concatenate([b["label"] for b in batches]).tolist()))
  train_index = set(_raw_split(digits_dir, "train")[2].tolist())
  assert len(seen[0]) == len(seen[1]) == 718
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] <= train_index and len(train_index - (seen[0] | seen[1])) == 1


# ------------------------------------------------------------------------------------------------
# Other datasets through tfds.testing.mock_data.

def test_cifar10_and_imagenet_pipelines_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    cifar = {"name": "cifar10", "data_dir": str(tmp_path), **SMALL}
    batch = next(data.train_iterator(cifar, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and 0 <= batch["image"].min() <= batch["image"].max() <= 1
    batches = list(data.eval_batches(cifar, batch_size=4))
    assert [b["image"].shape for b in batches] == [(4, 32, 32, 3)] * 3
    assert sum(b["mask"].sum() for b in batches) == 10

    imagenet = {"name": "imagenet2012", "data_dir": str(tmp_path), "image_size": 48, **SMALL}
    batch = next(data.train_iterator(imagenet, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 48, 48, 3) and batch["image"].dtype == np.float32
    assert 0 <= batch["image"].min() <= batch["image"].max() <= 1
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 1000
    batch = next(data.eval_batches(imagenet, batch_size=4))
    assert batch["image"].shape == (4, 48, 48, 3)
    batch = next(data.eval_batches("imagenet2012", batch_size=2))  # default 224 px
    assert batch["image"].shape == (2, 224, 224, 3)


@pytest.mark.parametrize("name,shape", [
    ("imagenet_r", (2, 64, 64, 3)),
    ("imagenet_a", (2, 64, 64, 3)),
    ("imagenet_v2", (2, 64, 64, 3)),
    ("imagenet_sketch", (2, 64, 64, 3)),
    ("imagenet2012_corrupted/gaussian_noise_1", (2, 64, 64, 3)),
    ("cifar10_corrupted/frosted_glass_blur_2", (2, 32, 32, 3)),
])
def test_shift_sets_with_mock_data(tmp_path, name, shape):
  size = shape[1] if "cifar" not in name else None
  with tfds.testing.mock_data(num_examples=3):
    batches = list(data.eval_batches(name, batch_size=2, image_size=size, data_dir=str(tmp_path)))
  assert len(batches) == 2 and batches[0]["image"].shape == shape
  assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False]]
  assert batches[0]["label"].max() < data.get_spec(name).num_classes
  if name in ("imagenet_r", "imagenet_a"):
    assert len(data.get_spec(name).class_subset) == 200


def test_eval_only_sets_have_no_train_iterator():
  with pytest.raises(ValueError, match="evaluation-only"):
    data.train_iterator("imagenet_r", global_batch_size=8, seed=0)


# ------------------------------------------------------------------------------------------------
# Missing data.

def test_missing_dataset_names_data_dir(tmp_path):
  where = str(tmp_path / "empty")
  with pytest.raises(data.DatasetNotFoundError) as err:
    data.eval_batches("cifar10", batch_size=8, data_dir=where)
  assert isinstance(err.value, FileNotFoundError)
  assert where in str(err.value) and f"tfds build cifar10 --data_dir={where}" in str(err.value)
  with pytest.raises(data.DatasetNotFoundError, match="downloads/manual") as err:
    data.train_iterator({"name": "imagenet2012", "data_dir": where}, global_batch_size=8, seed=0)
  assert where in str(err.value)
  with pytest.raises(data.DatasetNotFoundError, match="tfds build imagenet_r"):
    data.eval_batches("imagenet_r", batch_size=8, data_dir=where)
