"""Input data: the dataset registry, the bundled `digits` TFDS builder and the tf.data pipelines."""
from adv_soups.data.digits import Digits, prepare_digits
from adv_soups.data.pipeline import (
    DatasetNotFoundError,
    TrainIterator,
    check_available,
    eval_batches,
    get_builder,
    num_eval_batches,
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
    "num_eval_batches", "prepare_digits", "subset_predictions", "train_iterator",
]
