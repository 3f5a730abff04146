"""Data: sources (cifar10, folder, fake), statistics, augmentation, per-rank batches."""

from .loaders import TrainBatches, eval_batches, eval_shard
from .sources import ChannelStats, DataError, DatasetArrays, ImageSplit, channel_stats, load_dataset
from .transforms import BatchAugment, albumentations_eval, albumentations_train, normalize_batch

__all__ = [
    "TrainBatches", "eval_batches", "eval_shard", "ChannelStats", "DataError", "DatasetArrays",
    "ImageSplit", "channel_stats", "load_dataset", "BatchAugment", "albumentations_eval",
    "albumentations_train", "normalize_batch",
]
