"""Batches for training and evaluation, one shard per rank.

Training: a DistributedSampler (shuffled, re-seeded each epoch by `set_epoch`)
splits the training split between ranks; incomplete last batches are dropped
so every rank takes the same number of steps. Randomness of augmentation is
seeded from (seed, rank, epoch): different on every rank, reproducible, and
saved in checkpoints so a run resumed mid-epoch draws the same numbers.

Evaluation: rank r takes images r, r + W, r + 2W, ... - no padding, so summed
counts over ranks are exact for any world size.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config import AugmentConfig
from .sources import ChannelStats, ImageSplit
from .transforms import BatchAugment, albumentations_train, normalize_batch

Batch = Tuple[torch.Tensor, torch.Tensor]


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Distinct, well-spread seeds per (seed, rank, epoch); fits a 63-bit generator seed.
    return (seed * 1_000_003 + rank * 10_007 + epoch * 101) % (2**63 - 1)


class TrainBatches:
    """Shuffled, augmented training batches for one rank."""

    def __init__(self, split: ImageSplit, augment: AugmentConfig, stats: ChannelStats,
                 batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device, num_workers: int = 0) -> None:
        self.split = split
        self.augment_cfg = augment
        self.stats = stats
        self.batch_size = batch_size
        self.rank = rank
        self.seed = seed
        self.device = device
        self.num_workers = num_workers
        self.sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=False)
        self.steps_per_epoch = len(self.sampler) // batch_size
        self.epoch = 0
        self.augment_enabled = True
        if augment.backend == "tensor":
            self.images = torch.from_numpy(split.images).to(device)
            self.labels = torch.from_numpy(split.labels).to(device)
            self.batch_augment = BatchAugment(augment, stats)
            self.generator = torch.Generator(device=device)
        else:
            self.generator = torch.Generator()

    def set_epoch(self, epoch: int, augment: bool = True, reseed: bool = True) -> None:
        """Select the epoch's shuffle. `reseed=False` keeps the augmentation generator
        as it is: a run resumed inside an epoch has just restored its saved state."""
        self.epoch = epoch
        self.augment_enabled = augment
        self.sampler.set_epoch(epoch)
        if reseed:
            self.generator.manual_seed(epoch_seed(self.seed, self.rank, epoch))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])

    def _indices(self, start_step: int) -> torch.Tensor:
        indices = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        used = self.steps_per_epoch * self.batch_size
        return indices[start_step * self.batch_size:used]

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate(start_step=0)

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches of this epoch from `start_step` on (for resuming inside an epoch)."""
        indices = self._indices(start_step)
        if self.augment_cfg.backend == "tensor":
            yield from self._tensor_batches(indices)
        else:
            yield from self._albumentations_batches(indices)

    def _tensor_batches(self, indices: torch.Tensor) -> Iterator[Batch]:
        indices = indices.to(self.device)
        for batch in indices.split(self.batch_size):
            images, labels = self.images[batch], self.labels[batch]
            if self.augment_enabled:
                yield self.batch_augment(images, self.generator), labels
            else:
                yield normalize_batch(images, self.stats), labels

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
        from .transforms import albumentations_eval

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


def eval_batches(shard: ImageSplit, stats: ChannelStats, batch_size: int,
                 device: torch.device, flip: bool = False) -> Iterator[Batch]:
    images = torch.from_numpy(shard.images)
    labels = torch.from_numpy(shard.labels)
    for start in range(0, len(labels), batch_size):
        x = normalize_batch(images[start:start + batch_size].to(device), stats)
        yield (x.flip(3) if flip else x), labels[start:start + batch_size].to(device)


__all__ = ["TrainBatches", "AlbumentationsDataset", "eval_shard", "eval_batches"]
