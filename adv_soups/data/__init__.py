"""Input data: the dataset registry, the bundled `digits` (TFDS builder and arrays), the tf.data
pipelines and the in-memory ones (no TensorFlow; `adv_soups.data.memory`). TensorFlow is imported
only when a TFDS pipeline runs."""
from adv_soups.data.digits import prepare_digits
from adv_soups.data.memory import register_arrays
from adv_soups.data.pipeline import (
    DatasetNotFoundError,
    TrainIterator,
    check_available,
    eval_batches,
    get_builder,
    num_eval_batches,
    process_offset,
    split_size,
    train_iterator,
)
from adv_soups.data.registry import (
    CIFAR10_C_CORRUPTIONS,
    IMAGENET_A_CLASSES,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_R_CLASSES,
    DatasetSpec,
    corrupted_datasets,
    dataset_info,
    dataset_names,
    get_spec,
    subset_predictions,
)

__all__ = [
    "CIFAR10_C_CORRUPTIONS", "IMAGENET_A_CLASSES", "IMAGENET_C_CORRUPTIONS", "IMAGENET_R_CLASSES",
    "DatasetNotFoundError", "DatasetSpec", "Digits", "TrainIterator", "check_available",
    "corrupted_datasets",
    "dataset_info", "dataset_names", "eval_batches", "get_builder", "get_spec",
    "num_eval_batches", "prepare_digits", "process_offset", "register_arrays", "split_size",
    "subset_predictions", "train_iterator",
]


def __getattr__(name: str):
  if name == "Digits":  # the TFDS builder class: importing it imports tensorflow_datasets
    from adv_soups.data import digits
    return digits.Digits
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
