"""Batches for training and evaluation, one shard per rank.

Training: a DistributedSampler (shuffled, re-seeded each epoch by `set_epoch`)
splits the training split between ranks; incomplete last batches are dropped
so every rank takes the same number of steps. Randomness of augmentation is
seeded from (seed, rank, epoch): different on every rank, reproducible, and
the same for a run resumed inside the epoch. The tensor backend augments the
rank's whole epoch at once, in large chunks on the device (airbench's way), then
mixes its batches (mixup / CutMix, data/mixing.py: the targets become soft labels),
and hands out slices: a step costs no augmentation kernels at all.

Evaluation: rank r takes images r, r + W, r + 2W, ... - no padding, so summed
counts over ranks are exact for any world size.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config import AugmentConfig
from .sources import ChannelStats, ImageSplit
from .mixing import BatchMix, mixing_enabled
from .transforms import BatchAugment, albumentations_eval, albumentations_train, alternate_flips, normalize_batch

# (images, targets): targets are labels (B,), or soft labels (B, classes) when mixing is on.
Batch = Tuple[torch.Tensor, torch.Tensor]

# Images augmented per kernel launch when a whole epoch is prepared: large enough that
# launches do not matter on a GPU, small enough to keep intermediates at ~100 MB.
AUGMENT_CHUNK = 8192


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Distinct, well-spread seeds per (seed, rank, epoch); fits a 63-bit generator seed.
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101) % (2**63 - 1)


class TrainBatches:
    """Shuffled, augmented training batches for one rank."""

    def __init__(self, split: ImageSplit, augment: AugmentConfig, stats: ChannelStats,
                 batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, num_workers: int = 0, channels_last: bool = False,
                 num_classes: int = 10) -> None:
        self.split = split
        self.augment_cfg = augment
        self.stats = stats
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.device = device
        self.num_workers = num_workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.steps_per_epoch = len(self.sampler) // batch_size
        self.epoch = 0
        self.augment_enabled = True
        if augment.backend == "tensor":
            self.images = torch.from_numpy(split.images).to(device)
            self.labels = torch.from_numpy(split.labels).to(device)
            self.batch_augment = BatchAugment(augment, stats)
            self.batch_mix = BatchMix(augment, num_classes) if mixing_enabled(augment) else None
            self.generator = torch.Generator(device=device)
        else:
            self.generator = torch.Generator()

    def set_epoch(self, epoch: int, augment: bool = True) -> None:
        """Select the epoch's shuffle and random draws: both follow from (seed, rank, epoch)
        alone, so a run resumed inside an epoch needs no saved generator state."""
        self.epoch = epoch
        self.augment_enabled = augment
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.rank, epoch))

    def _indices(self) -> torch.Tensor:
        indices = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        return indices[:self.steps_per_epoch * self.batch_size]

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches of this epoch from `start_step` on (for resuming inside an epoch)."""
        indices = self._indices()
        if self.augment_cfg.backend == "tensor":
            yield from self._tensor_batches(indices, start_step)
        else:
            yield from self._albumentations_batches(indices[start_step * self.batch_size:])

    def _tensor_batches(self, indices: torch.Tensor, start_step: int) -> Iterator[Batch]:
        images, labels = self.epoch_tensors(indices)
        for step in range(start_step, self.steps_per_epoch):
            batch = slice(step * self.batch_size, (step + 1) * self.batch_size)
            yield images[batch], labels[batch]

    def epoch_tensors(self, indices: torch.Tensor) -> Batch:
        """The epoch's images, augmented (or only normalized), in the order given, as one
        (N, 3, H, W) tensor. The random parameters of all N images are drawn at once, so the
        chunking below changes nothing but memory use; a resumed run recomputes the whole
        epoch and starts at its step."""
        indices = indices.to(self.device)
        n = len(indices)
        _, height, width, _ = self.images.shape
        params = self.batch_augment.sample(n, height, width, self.generator) if self.augment_enabled else None
        if params is not None and self.augment_cfg.flip == "alternate":
            params["flip"] = alternate_flips(indices, self.epoch, self.seed, len(self.split))
        out = torch.empty((n, 3, height, width), device=self.device).contiguous(memory_format=self.memory_format)
        for start in range(0, n, AUGMENT_CHUNK):
            part = slice(start, start + AUGMENT_CHUNK)
            uint8 = self.images[indices[part]]
            if params is None:
                out[part] = normalize_batch(uint8, self.stats)
            else:
                out[part] = self.batch_augment.apply(uint8, {k: v[part] for k, v in params.items()})
        labels = self.labels[indices]
        if self.batch_mix is None:
            return out, labels
        if not self.augment_enabled:
            # The plain last epochs are not mixed, but their targets keep the mixed epochs'
            # shape (one-hot): a captured step copies them into its (B, classes) buffer.
            return out, F.one_hot(labels, self.batch_mix.num_classes).float()
        return self._mix(out, labels)

    def _mix(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        """Mix the epoch's batches in place, whole batches per chunk (a batch mixes with itself)."""
        _, _, height, width = images.shape
        seed = epoch_seed(self.seed, self.rank, self.epoch)
        batches = len(labels) // self.batch_size
        params = self.batch_mix.to_device(
            self.batch_mix.sample(batches, height, width, self.epoch, seed), self.device)
        targets = torch.empty((len(labels), self.batch_mix.num_classes), device=self.device)
        per_chunk = max(1, AUGMENT_CHUNK // self.batch_size)
        for first in range(0, batches, per_chunk):
            which = slice(first, first + per_chunk)
            part = slice(first * self.batch_size, (first + len(params["lam"][which])) * self.batch_size)
            images[part], targets[part] = self.batch_mix.apply(images[part], labels[part],
                                                               {k: v[which] for k, v in params.items()})
        return images, targets

    def _albumentations_batches(self, indices: torch.Tensor) -> Iterator[Batch]:
        dataset = AlbumentationsDataset(self.split, self.augment_cfg, self.stats, self.augment_enabled)
        # Workers draw their seeds from this generator, which set_epoch re-seeded.
        base_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
        dataset.pipeline.set_random_seed(base_seed)
        loader = DataLoader(
            dataset, batch_size=self.batch_size, sampler=indices.tolist(), drop_last=True,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            worker_init_fn=_seed_albumentations_worker, generator=torch.Generator().manual_seed(base_seed),
            persistent_workers=False,
        )
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


class AlbumentationsDataset(Dataset):
    """The naive path: one image at a time through the albumentations pipeline."""

    def __init__(self, split: ImageSplit, augment: AugmentConfig, stats: ChannelStats,
                 enabled: bool = True) -> None:
        self.split = split
        self.pipeline = albumentations_train(augment, stats) if enabled else albumentations_eval(stats)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self.pipeline(image=self.split.images[index])["image"]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(self.split.labels[index])


def _seed_albumentations_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = int(info.seed % (2**31 - 1))
    info.dataset.pipeline.set_random_seed(seed)


def eval_shard(split: ImageSplit, rank: int, world_size: int) -> ImageSplit:
    """Images rank, rank + W, ... of a split: disjoint shards covering it exactly once."""
    return ImageSplit(split.images[rank::world_size], split.labels[rank::world_size])


class DeviceEvalSplit:
    """An evaluation shard normalised once and kept on the device: a run scores it every
    epoch, and copying and normalising it again each time is time on the critical path
    (float32: 61 MB for 5,000 images)."""

    def __init__(self, shard: ImageSplit, stats: ChannelStats, device: torch.device) -> None:
        self.images = normalize_batch(torch.from_numpy(shard.images).to(device), stats)
        self.labels = torch.from_numpy(shard.labels).to(device)
        self.stats = stats

    def __len__(self) -> int:
        return len(self.labels)


def eval_batches(shard: ImageSplit | DeviceEvalSplit, stats: ChannelStats, batch_size: int,
                 device: torch.device) -> Iterator[Batch]:
    """Normalised batches of `shard` on `device` (a DeviceEvalSplit, normalised already with
    the same `stats`, is sliced as it is)."""
    if isinstance(shard, DeviceEvalSplit):
        assert shard.stats == stats, "a DeviceEvalSplit scored with other statistics than its own"
        for start in range(0, len(shard), batch_size):
            yield shard.images[start:start + batch_size], shard.labels[start:start + batch_size]
        return
    images = torch.from_numpy(shard.images)
    labels = torch.from_numpy(shard.labels)
    for start in range(0, len(labels), batch_size):
        x = normalize_batch(images[start:start + batch_size].to(device), stats)
        yield x, labels[start:start + batch_size].to(device)


__all__ = ["TrainBatches", "AlbumentationsDataset", "DeviceEvalSplit", "eval_shard", "eval_batches"]
