"""The seed's augmentation, twice: per image with albumentations 2.x, and batched
on tensors on the training device. Both take the same AugmentConfig.

albumentations 2.x pitfalls avoided here:
- CoarseDropout's 1.x arguments (max_holes, max_height, fill_value, ...) are
  only warned about and ignored; 2.x wants num_holes_range, hole_*_range, fill.
- ShiftScaleRotate is a deprecated subclass of Affine whose border default
  became constant black; we build Affine directly with an explicit border.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..config import AugmentConfig
from .sources import ChannelStats


def _cv2_border(mode: str) -> int:
    import cv2

    # BORDER_REFLECT_101 is what ShiftScaleRotate used in 1.x (and what the seed trained with).
    return cv2.BORDER_REFLECT_101 if mode == "reflect" else cv2.BORDER_CONSTANT


def albumentations_train(cfg: AugmentConfig, stats: ChannelStats):
    import albumentations as A
    import cv2

    mean_pixel = tuple(round(255.0 * m) for m in stats.mean)
    border = _cv2_border(cfg.border_mode)
    steps = [A.HorizontalFlip(p=cfg.hflip_p)]
    if cfg.crop_p > 0:
        # Only when enabled, so that recipes without it draw what they drew before.
        # A whole-pixel translation with nearest sampling is exactly a crop of the
        # padded image, without needing to know the image size.
        steps.append(A.Affine(
            translate_px=(-cfg.crop_padding, cfg.crop_padding),
            interpolation=cv2.INTER_NEAREST,
            border_mode=border,
            fill=0,
            p=cfg.crop_p,
        ))
    return A.Compose(steps + [
        A.Affine(
            translate_percent=(-cfg.shift_limit, cfg.shift_limit),
            scale=(1.0 - cfg.scale_limit, 1.0 + cfg.scale_limit),
            rotate=(-cfg.rotate_limit, cfg.rotate_limit),
            border_mode=border,
            fill=0,
            p=cfg.affine_p,
        ),
        A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=(cfg.cutout_size, cfg.cutout_size),
            hole_width_range=(cfg.cutout_size, cfg.cutout_size),
            fill=mean_pixel,
            p=cfg.cutout_p,
        ),
        A.Normalize(mean=stats.mean, std=stats.std, max_pixel_value=255.0),
    ])


def albumentations_eval(stats: ChannelStats):
    import albumentations as A

    return A.Compose([A.Normalize(mean=stats.mean, std=stats.std, max_pixel_value=255.0)])


def _stats_tensors(stats: ChannelStats, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(stats.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(stats.std, device=device).view(1, 3, 1, 1)
    return mean, std


def _shifted_indices(offset: torch.Tensor, size: int, reflect: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Source index of each output pixel along one axis, shifted by a per-sample
    offset (n,) -> (n, size), and whether it fell inside the image. Reflection
    leaves out the edge pixel, as cv2's BORDER_REFLECT_101 does."""
    index = torch.arange(size, device=offset.device).view(1, size) + offset.view(-1, 1)
    inside = (index >= 0) & (index < size)
    if reflect:
        index = torch.where(index < 0, -index, torch.where(index >= size, 2 * (size - 1) - index, index))
    return index.clamp(0, size - 1), inside


def normalize_batch(images: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalized float (B, 3, H, W)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = _stats_tensors(stats, images.device)
    return (x - mean) / std


def alternate_flips(indices: torch.Tensor, epoch: int, seed: int, size: int) -> torch.Tensor:
    """Which of the images `indices` (of a split of `size`) are flipped in `epoch` under
    augment.flip=alternate: a fixed half of the split, drawn from `seed` alone, on even
    epochs and the other half on odd ones (airbench's alternating flip). It depends on
    neither the rank nor the order, so any world size and a resumed run flip alike."""
    gen = torch.Generator(device=indices.device).manual_seed(seed)
    half = torch.zeros(size, dtype=torch.bool, device=indices.device)
    half[torch.randperm(size, generator=gen, device=indices.device)[:size // 2]] = True
    return half[indices] ^ (epoch % 2 == 1)


class BatchAugment:
    """The albumentations pipeline above, applied to a whole uint8 batch at once.

    Per sample, independently: flip with p=hflip_p (augment.flip=alternate replaces these
    draws with `alternate_flips`, in TrainBatches); with p=crop_p a shift by whole
    pixels, up to crop_padding each way, through the padded image; with p=affine_p a rotation,
    scale and shift drawn uniformly from the same ranges, resampled bilinearly
    through an affine grid; with p=cutout_p one cutout_size square hole, fully
    inside the image, set to the dataset mean (0 after normalization).
    Drawing the parameters and applying them are separate steps, so each can be
    checked on its own.
    """

    def __init__(self, cfg: AugmentConfig, stats: ChannelStats) -> None:
        self.cfg = cfg
        self.stats = stats

    def sample(self, n: int, height: int, width: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
        cfg, device = self.cfg, gen.device

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=gen, device=device) * (high - low) + low

        def coin(p: float) -> torch.Tensor:
            return torch.rand(n, generator=gen, device=device) < p

        affine = coin(cfg.affine_p)
        size = cfg.cutout_size
        params = {
            "flip": coin(cfg.hflip_p),
            "affine": affine,
            # Samples without the affine step get the identity.
            "angle": torch.where(affine, uniform(-cfg.rotate_limit, cfg.rotate_limit, n), 0.0),
            "scale": torch.where(affine, uniform(1 - cfg.scale_limit, 1 + cfg.scale_limit, n), 1.0),
            "shift": torch.where(affine.view(n, 1), uniform(-cfg.shift_limit, cfg.shift_limit, n, 2), 0.0),
            "cutout": coin(cfg.cutout_p),
            "top": torch.randint(0, height - size + 1, (n,), generator=gen, device=device),
            "left": torch.randint(0, width - size + 1, (n,), generator=gen, device=device),
        }
        # Drawn last, and only when enabled, so that recipes without the crop draw
        # exactly the numbers they drew before it existed.
        if cfg.crop_p > 0:
            crop, pad = coin(cfg.crop_p), cfg.crop_padding
            offsets = torch.randint(-pad, pad + 1, (2, n), generator=gen, device=device)
            offsets = torch.where(crop, offsets, 0)
        else:
            crop = torch.zeros(n, dtype=torch.bool, device=device)
            offsets = torch.zeros(2, n, dtype=torch.long, device=device)
        params.update(crop=crop, crop_dy=offsets[0], crop_dx=offsets[1])
        return params

    def apply(self, images: torch.Tensor, params: Dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (B, H, W, 3) + drawn parameters -> normalized float (B, 3, H, W)."""
        cfg = self.cfg
        n, height, width, _ = images.shape
        if bool(params["crop"].any()):
            # On the uint8 pixels, before the flip: a mirrored shift is drawn as often
            # as the shift itself, so the order does not change what is sampled.
            reflect = cfg.border_mode == "reflect"
            rows, rows_inside = _shifted_indices(params["crop_dy"], height, reflect)
            cols, cols_inside = _shifted_indices(params["crop_dx"], width, reflect)
            batch = torch.arange(n, device=images.device).view(n, 1, 1)
            images = images[batch, rows.view(n, height, 1), cols.view(n, 1, width)]
            if not reflect:
                inside = rows_inside.view(n, height, 1) & cols_inside.view(n, 1, width)
                images = images * inside.unsqueeze(3).to(images.dtype)
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        x = torch.where(params["flip"].view(n, 1, 1, 1), x.flip(3), x)

        if bool(params["affine"].any()):
            # affine_grid maps output to input coordinates in [-1, 1]: the inverse of
            # "scale, rotate about the centre, then shift by a fraction of the size"
            # (a shift of f of the image is 2f in these coordinates).
            # A positive angle turns the picture counter-clockwise, as albumentations (OpenCV) does.
            angle = params["angle"] * (math.pi / 180.0)
            cos, sin = torch.cos(angle) / params["scale"], torch.sin(angle) / params["scale"]
            inverse = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
            offset = -(inverse @ (2.0 * params["shift"]).unsqueeze(2))
            grid = F.affine_grid(torch.cat([inverse, offset], 2), list(x.shape), align_corners=False)
            padding = "reflection" if cfg.border_mode == "reflect" else "zeros"
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)

        mean, std = _stats_tensors(self.stats, x.device)
        x = (x - mean) / std

        size = cfg.cutout_size
        rows = torch.arange(height, device=x.device).view(1, height, 1)
        cols = torch.arange(width, device=x.device).view(1, 1, width)
        top, left = params["top"].view(n, 1, 1), params["left"].view(n, 1, 1)
        hole = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
        hole &= params["cutout"].view(n, 1, 1)
        return x.masked_fill(hole.unsqueeze(1), 0.0)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, height, width, _ = images.shape
        return self.apply(images, self.sample(n, height, width, gen))
