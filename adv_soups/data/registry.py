"""Which datasets exist, and what each one is: TFDS name, splits, classes, image size, preprocessing.

Nothing here touches the disk. Names accepted by `get_spec` (and so by `config.data.name` and the
evaluation / sweep CLIs):

  digits, cifar10, imagenet2012                     (train + eval)
  imagenet_v2, imagenet_r, imagenet_a, imagenet_sketch   (eval only, ImageNet label space)
  imagenet2012_corrupted/<corruption>_<severity>    (eval only; TFDS config names, e.g. gaussian_noise_1)
  cifar10_corrupted/<corruption>_<severity>         (eval only; e.g. frosted_glass_blur_3)
  any name given to `adv_soups.data.memory.register_arrays` (numpy arrays, this process only)

Label spaces. TFDS labels ImageNet-R and ImageNet-A with the *1000-way ImageNet index* (their
`label` is a `ClassLabel` built from ImageNet's synset list: an integer in [0, 1000)), not with a
200-way index. Both sets hold only 200 of the 1000 classes, and their authors score a 1000-way
classifier by restricting its logits to those 200 classes before the argmax
(hendrycks/imagenet-r `eval.py`: `output[:, imagenet_r_mask]`; hendrycks/natural-adv-examples
`eval.py`: `output[:, indices_in_1k]`). `DatasetSpec.class_subset` holds those 200 indices (sorted,
1000-way); `subset_predictions` does the restricted argmax and returns 1000-way predictions, directly
comparable with the TFDS labels.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

# The 15 benchmark corruptions (Hendrycks & Dietterich 2019), as TFDS names its configs. TFDS spells
# two of CIFAR-10-C's differently from ImageNet-C's (frosted_glass_blur, elastic).
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression")
CIFAR10_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "frosted_glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic",
    "pixelate", "jpeg_compression")
# The 4 "extra" corruptions TFDS also builds (accepted by name, left out of the standard average).
EXTRA_CORRUPTIONS = ("gaussian_blur", "saturate", "spatter", "speckle_noise")
SEVERITIES = (1, 2, 3, 4, 5)

# ImageNet-R's 200 classes as 1000-way ImageNet indices (hendrycks/imagenet-r, eval.py).
IMAGENET_R_CLASSES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99,
    100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163,
    171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251,
    254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308,
    309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355,
    361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435,
    437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570,
    579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768,
    774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907,
    928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967,
    980, 981, 983, 988)

# ImageNet-A's 200 classes as 1000-way ImageNet indices (hendrycks/natural-adv-examples, eval.py:
# the keys of `thousand_k_to_200` whose value is not -1).
IMAGENET_A_CLASSES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97,
    99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277,
    283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324,
    326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411,
    416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492,
    496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589,
    606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719,
    736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804,
    813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897,
    900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980,
    981, 984, 986, 987, 988)

_TFDS_BUILD = "tfds build {tfds_name} --data_dir={data_dir}"
_IMAGENET_MANUAL = (
    "ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar (from image-net.org) in {data_dir}/downloads/manual, then run `"
    + _TFDS_BUILD + "`")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipelines need to know about one dataset.

  Attributes:
    name: our name (the `config.data.name` value).
    tfds_name: TFDS builder name, with config if any ('imagenet2012_corrupted/fog_3').
    train_split: TFDS split for training; None for evaluation-only sets.
    eval_split: TFDS split for evaluation.
    num_classes: size of the model's output (1000 for every ImageNet-family set).
    image_size: default side length in pixels of the model input (square images).
    channels: 1 (digits) or 3.
    preprocess: 'digits' | 'cifar' | 'imagenet' | 'imagenet_c' (which train augmentation / eval
      preprocessing the pipelines apply).
    class_subset: None, or the sorted 1000-way indices the logits must be restricted to.
    label_space: what the TFDS labels index: 'full' means 0..num_classes-1 (for imagenet_r /
      imagenet_a that is the 1000-way ImageNet index, not a 200-way one).
    prepare_hint: how to prepare it, with `{data_dir}` to fill in.
    source: 'tfds' (read with tf.data; digits falls back to 'memory' where TensorFlow is not
      installed) or 'memory' (numpy arrays registered in this process, no TensorFlow).
  """
  name: str
  tfds_name: str
  train_split: str | None
  eval_split: str
  num_classes: int
  image_size: int
  channels: int
  preprocess: str
  class_subset: tuple[int, ...] | None = None
  label_space: str = "full"
  prepare_hint: str = ""
  source: str = "tfds"

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the model input at the default image size."""
    return (self.image_size, self.image_size, self.channels)


def _imagenet_like(name, tfds_name, eval_split="test", class_subset=None, hint=_TFDS_BUILD,
                   preprocess="imagenet", train_split=None):
  return DatasetSpec(
      name=name, tfds_name=tfds_name, train_split=train_split, eval_split=eval_split,
      num_classes=1000, image_size=224, channels=3, preprocess=preprocess,
      class_subset=class_subset, prepare_hint=hint.replace("{tfds_name}", tfds_name))


_STATIC = {
    "digits": DatasetSpec(
        name="digits", tfds_name="digits", train_split="train", eval_split="test", num_classes=10,
        image_size=8, channels=1, preprocess="digits",
        prepare_hint="prepared automatically from scikit-learn's bundled copy (no download)"),
    "cifar10": DatasetSpec(
        name="cifar10", tfds_name="cifar10", train_split="train", eval_split="test",
        num_classes=10, image_size=32, channels=3, preprocess="cifar",
        prepare_hint=_TFDS_BUILD.replace("{tfds_name}", "cifar10")),
    "imagenet2012": _imagenet_like(
        "imagenet2012", "imagenet2012", eval_split="validation", train_split="train",
        hint=_IMAGENET_MANUAL),
    "imagenet_v2": _imagenet_like("imagenet_v2", "imagenet_v2"),
    "imagenet_r": _imagenet_like("imagenet_r", "imagenet_r", class_subset=IMAGENET_R_CLASSES),
    "imagenet_a": _imagenet_like("imagenet_a", "imagenet_a", class_subset=IMAGENET_A_CLASSES),
    "imagenet_sketch": _imagenet_like("imagenet_sketch", "imagenet_sketch"),
}
_CORRUPTED = {
    "imagenet2012_corrupted": IMAGENET_C_CORRUPTIONS + EXTRA_CORRUPTIONS,
    "cifar10_corrupted": CIFAR10_C_CORRUPTIONS + EXTRA_CORRUPTIONS,
}


_REGISTERED: dict[str, DatasetSpec] = {}  # in-memory sets added by `register` (this process)


def register(spec: DatasetSpec) -> DatasetSpec:
  """Adds an in-memory dataset's spec (see `adv_soups.data.memory.register_arrays`) under
  `spec.name` for this process; a fixed or corrupted-family name is refused (ValueError)."""
  if spec.name in _STATIC or spec.name.partition("/")[0] in _CORRUPTED:
    raise ValueError(f"dataset name {spec.name!r} is taken by a built-in dataset")
  _REGISTERED[spec.name] = spec
  return spec


def dataset_names() -> list[str]:
  """The accepted names: the fixed ones, then the corrupted families as `family/<corruption>_<s>`,
  then in-memory sets registered in this process."""
  return (list(_STATIC) + [f"{family}/<corruption>_<1..5>" for family in _CORRUPTED]
          + list(_REGISTERED))


def corrupted_datasets(base: str = "imagenet2012") -> list[str]:
  """All 75 standard corrupted-set names (15 corruptions x severities 1..5) of `base`.

  Args:
    base: 'imagenet2012' (ImageNet-C) or 'cifar10' (CIFAR-10-C).
  Returns:
    names like 'imagenet2012_corrupted/gaussian_noise_1', corruption-major, severity-minor.
  """
  corruptions = {"imagenet2012": IMAGENET_C_CORRUPTIONS, "cifar10": CIFAR10_C_CORRUPTIONS}
  if base not in corruptions:
    raise ValueError(f"No corrupted version of {base!r}; choose from {sorted(corruptions)}")
  return [f"{base}_corrupted/{c}_{s}" for c in corruptions[base] for s in SEVERITIES]


def _unknown(name: str, why: str = "") -> ValueError:
  return ValueError(f"Unknown dataset {name!r}{why}. Allowed names: {', '.join(dataset_names())}")


def get_spec(name: str) -> DatasetSpec:
  """The `DatasetSpec` of `name`; ValueError naming it and listing the allowed names if unknown."""
  if not isinstance(name, str):
    raise _unknown(str(name))
  if name in _STATIC:
    return _STATIC[name]
  if name in _REGISTERED:
    return _REGISTERED[name]
  family, _, config = name.partition("/")
  if family in _CORRUPTED:
    corruption, _, severity = config.rpartition("_")
    if corruption not in _CORRUPTED[family] or severity not in {str(s) for s in SEVERITIES}:
      raise _unknown(name, f" (corruptions of {family}: {', '.join(_CORRUPTED[family])}; "
                     "severities 1..5)")
    if family == "imagenet2012_corrupted":
      # Built from the ImageNet validation tar (manual download), already centre-cropped to 224.
      return _imagenet_like(
          name, name, eval_split="validation", preprocess="imagenet_c",
          hint=("needs ILSVRC2012_img_val.tar in {data_dir}/downloads/manual, then `"
                + _TFDS_BUILD + "`"))
    return DatasetSpec(
        name=name, tfds_name=name, train_split=None, eval_split="test", num_classes=10,
        image_size=32, channels=3, preprocess="cifar",
        prepare_hint=_TFDS_BUILD.replace("{tfds_name}", name))
  raise _unknown(name)


def dataset_info(name: str, image_size: int | None = None) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, image_shape (H, W, C)) of the model input for `name`, without touching disk.

  `image_size` (pixels) overrides the dataset's default side length.
  """
  spec = get_spec(name)
  size = image_size or spec.image_size
  return spec.num_classes, (size, size, spec.channels)


def subset_predictions(logits: Any, class_subset: Sequence[int] | None) -> Any:
  """Argmax of `logits` [..., num_classes] restricted to `class_subset`, as full-space labels [...].

  With `class_subset=None` this is the plain argmax. jit-friendly (jax.numpy).
  """
  import jax.numpy as jnp  # local import: the registry itself needs no jax
  if class_subset is None:
    return jnp.argmax(logits, axis=-1)
  subset = jnp.asarray(class_subset)
  return subset[jnp.argmax(jnp.take(logits, subset, axis=-1), axis=-1)]
