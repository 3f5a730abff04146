"""Where images come from: official CIFAR-10, an image-folder tree, or fake data.

Every source ends as the same thing: uint8 arrays (N, 32, 32, 3) and int64
labels per split, plus the class names. Mean and std are computed from the
training split, never pasted in.
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import CIFAR10_CLASSES, DataConfig
from ..errors import UserError
from ..files import atomic_write

IMAGE_SHAPE = (32, 32, 3)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DataError(UserError):
    """Missing, unreadable or malformed data."""


@dataclass
class ImageSplit:
    images: np.ndarray   # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray   # (N,) int64
    # Folder data only: each image's file (the report names it); None for the other sources.
    paths: Optional[Tuple[str, ...]] = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ChannelStats:
    mean: Tuple[float, float, float]   # per channel, on the [0, 1] scale
    std: Tuple[float, float, float]

    @classmethod
    def from_payload(cls, stats: Dict[str, Any]) -> "ChannelStats":
        """From the plain dict a checkpoint stores (lists, as asdict wrote them)."""
        return cls(mean=tuple(stats["mean"]), std=tuple(stats["std"]))


@dataclass
class DatasetArrays:
    train: Optional[ImageSplit]
    test: ImageSplit
    classes: Tuple[str, ...]
    stats: ChannelStats


_STATS_BLOCK_PIXELS = 1 << 20     # 3 MB of uint8, 8 MB as int64 per channel


def channel_stats(images: np.ndarray) -> ChannelStats:
    """Per-channel mean and std over all pixels of a uint8 NHWC array, from each channel's
    histogram of the 256 values: the sums are exact integers (no float64 copy of the
    images, 1.2 GB and 10 s for CIFAR-10's training set), and so is the variance until its
    one final division. Counted a block of pixels at a time: bincount converts its input to
    int64 first, 410 MB per channel of the whole training set (4x slower here)."""
    pixels = images.reshape(-1, images.shape[-1])
    histograms = np.zeros((pixels.shape[1], 256), dtype=np.int64)
    for start in range(0, len(pixels), _STATS_BLOCK_PIXELS):
        block = pixels[start:start + _STATS_BLOCK_PIXELS]
        for channel in range(pixels.shape[1]):
            histograms[channel] += np.bincount(block[:, channel], minlength=256)
    values = np.arange(256, dtype=np.int64)
    means, stds = [], []
    for counts in histograms:
        n, s1, s2 = int(counts.sum()), int(counts @ values), int(counts @ (values * values))
        means.append(s1 / (255.0 * n))
        stds.append(math.sqrt((s2 * n - s1 * s1) / (255.0 * 255.0 * n * n)))
    return ChannelStats(tuple(means), tuple(stds))


# --------------------------------------------------------------------- cifar10


def _load_cifar10(cfg: DataConfig, split: str) -> ImageSplit:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root)
    try:
        dataset = CIFAR10(str(root), train=(split == "train"), download=cfg.download)
    except RuntimeError as exc:
        # torchvision says "Dataset not found or corrupted" when a batch is missing or fails its md5.
        raise DataError(
            f"CIFAR-10 not found or corrupted under '{root}' ({exc}). Either allow the download "
            f"(data.download=true, needs internet), put the official python batches in "
            f"'{root}/cifar-10-batches-py', or use a local image tree with data.source=folder data.root=DIR"
        ) from None
    except OSError as exc:  # URLError and friends: no network
        raise DataError(
            f"could not download CIFAR-10 into '{root}': {exc}. Without internet, use data.source=folder "
            "data.root=DIR (train/<class>/*.png|jpg and test/<class>/*) or copy the official python batches there"
        ) from None
    return ImageSplit(np.ascontiguousarray(dataset.data, dtype=np.uint8),
                      np.asarray(dataset.targets, dtype=np.int64))


# ---------------------------------------------------------------------- folder


def _list_folder_split(split_dir: Path, classes: Sequence[str]) -> List[Tuple[Path, int]]:
    if not split_dir.is_dir():
        raise DataError(
            f"'{split_dir}' is missing; a folder dataset needs {split_dir.name}/<class>/*.png|jpg "
            f"with the class folders {', '.join(classes)}"
        )
    found = sorted(p for p in split_dir.iterdir() if not p.name.startswith("."))
    for entry in found:
        if not entry.is_dir():
            raise DataError(f"'{entry}' is not a class folder; '{split_dir}' must hold only the class folders {', '.join(classes)}")
        if entry.name not in classes:
            raise DataError(f"unknown class folder '{entry}'; expected the class names {', '.join(classes)}")
    names = {p.name for p in found}
    missing = [c for c in classes if c not in names]
    if missing:
        raise DataError(f"'{split_dir}' has no folder for class(es) {', '.join(missing)}; expected one per class: {', '.join(classes)}")
    files: List[Tuple[Path, int]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not images:
            raise DataError(f"class folder '{class_dir}' holds no .png/.jpg images")
        files.extend((p, label) for p in images)
    return files


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: a truncated file fails here, not later
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for broken files
        raise DataError(f"cannot read image '{path}': {exc}. Replace or delete the file") from None
    if array.shape != IMAGE_SHAPE:
        raise DataError(f"image '{path}' is {array.shape[1]}x{array.shape[0]}; expected 32x32 RGB as in CIFAR-10")
    return array


def _fingerprint(files: Sequence[Tuple[Path, int]]) -> str:
    digest = hashlib.sha256()
    for path, label in files:
        stat = path.stat()
        digest.update(f"{path.name}|{path.parent.name}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


class _ArrayCache:
    """One split's decoded images as a `.npy` file, memory-mapped when read: the pages come
    from the page cache (shared by every process on the machine; `read` checks all of
    them once) instead of a 150 MB copy per process out of an archive. Copy-on-write (`mmap_mode="c"`):
    the array is writable, so torch.from_numpy takes it without a copy or a warning,
    and a write stays in the process, never reaching the file.

    Named for the listing's fingerprint; the labels and paths come from the listing
    itself, so the images are all a cache holds. Beside it, the CRC-32 of its pixels:
    a half-written, truncated or altered file (or a missing checksum) is
    rebuilt, never trusted. In the root's own cache folder a split's caches of other
    listings (and of the older `.npz` format) are deleted once this one is written."""

    def __init__(self, folder: Path, split: str, fingerprint: str) -> None:
        self.images = folder / f"{split}-{fingerprint}.npy"
        self.checksum = folder / f"{split}-{fingerprint}.crc32"

    def read(self, count: int) -> Optional[np.ndarray]:
        """The cached images if they are `count` intact CIFAR images, else None."""
        try:
            images = np.load(self.images, mmap_mode="c")
            # The listing's count: a cache of fewer (or other) images is not this split's.
            intact = (images.dtype == np.uint8 and images.shape == (count, *IMAGE_SHAPE)
                      and zlib.crc32(images) == int(self.checksum.read_text()))
        except Exception:  # missing, shorter than its header says, torn header, no checksum: several types
            return None
        return images if intact else None

    def write(self, images: np.ndarray) -> None:
        """Each file atomically (temp, fsync, rename), the checksum last: a crash between
        the two leaves images without their checksum, which `read` refuses."""
        buffer = io.BytesIO()
        np.save(buffer, images)
        atomic_write(self.images, buffer.getvalue())
        atomic_write(self.checksum, str(zlib.crc32(images)).encode())

    def remove_older(self) -> None:
        """Delete this split's caches of other listings (older fingerprints, and the older
        `.npz` format): after a file changed, each would keep 150 MB nobody reads again. A
        job of this machine still mapping one keeps its pages (unlinking leaves an open
        file readable); one about to read it finds it gone and decodes. On NFS a job of
        another machine mapping it can lose its pages (a stale handle): README says to
        keep data.cache_dir on a local disk there (it is never pruned)."""
        split = self.images.name.split("-")[0]
        for path in self.images.parent.glob(f"{split}-*"):
            if path.suffix in (".npy", ".crc32", ".npz") and path not in (self.images, self.checksum):
                path.unlink(missing_ok=True)


def _load_folder_split(cfg: DataConfig, split: str, classes: Sequence[str]) -> ImageSplit:
    root = Path(cfg.root)
    files = _list_folder_split(root / split, classes)
    # data.cache_dir may be shared by several roots, so only the root's own folder is pruned.
    cache = _ArrayCache(Path(cfg.cache_dir) if cfg.cache_dir else root / ".cifar_ddp_cache", split,
                        _fingerprint(files))
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    paths = tuple(str(p) for p, _ in files)
    images = cache.read(len(files))
    if images is None:
        images = np.stack([_decode(p) for p, _ in files])
        try:
            # Another job may have written the cache while this one decoded (and mapped it
            # since): an intact file is never replaced under a reader's map (on NFS the
            # reader's pages would go stale).
            if cache.read(len(files)) is None:
                cache.write(images)
            if not cfg.cache_dir:
                cache.remove_older()
        except OSError:
            pass  # read-only data root: decoding again next time is slower but correct
    return ImageSplit(images, labels, paths)


# ------------------------------------------------------------------------ fake


def _load_fake(cfg: DataConfig, split: str, num_classes: int, seed: int) -> ImageSplit:
    from torchvision.datasets import FakeData

    # Different offsets keep the test images distinct from the training images.
    offset = seed * 2 + (0 if split == "train" else 1)
    dataset = FakeData(size=cfg.fake_size, image_size=(3, 32, 32), num_classes=num_classes,
                       random_offset=offset * cfg.fake_size)
    images = np.stack([np.asarray(dataset[i][0], dtype=np.uint8) for i in range(len(dataset))])
    labels = np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)
    return ImageSplit(images, labels)


# ------------------------------------------------------------------- interface


def _load_split(cfg: DataConfig, split: str, classes: Sequence[str], seed: int) -> ImageSplit:
    if cfg.source != "fake" and Path(cfg.root).is_file():
        raise DataError(f"data.root '{cfg.root}' is a file, not a folder; point it at the folder that holds "
                        + ("train/ and test/" if cfg.source == "folder" else "cifar-10-batches-py (or will)"))
    if cfg.source == "cifar10":
        return _load_cifar10(cfg, split)
    if cfg.source == "folder":
        if not Path(cfg.root).is_dir():
            raise DataError(f"data.root '{cfg.root}' does not exist; point it at a folder holding train/ and test/")
        return _load_folder_split(cfg, split, classes)
    return _load_fake(cfg, split, len(classes), seed)


def _carve_validation(train: ImageSplit, size: int, seed: int) -> Tuple[ImageSplit, ImageSplit]:
    if size >= len(train):
        raise DataError(f"data.val_size={size} leaves no training images (the split has {len(train)}); lower it")
    order = np.random.default_rng(seed).permutation(len(train))
    val, rest = order[:size], np.sort(order[size:])
    def paths(which: np.ndarray) -> Optional[Tuple[str, ...]]:
        return None if train.paths is None else tuple(train.paths[i] for i in which)

    return (ImageSplit(train.images[rest], train.labels[rest], paths(rest)),
            ImageSplit(train.images[val], train.labels[val], paths(val)))


def load_dataset(cfg: DataConfig, seed: int = 0, with_train: bool = True,
                 stats: Optional[ChannelStats] = None, classes: Sequence[str] = CIFAR10_CLASSES) -> DatasetArrays:
    """Load the splits `cfg` names. `with_train=False` loads only the test split and
    then needs `stats` (e.g. from a checkpoint), since they come from training data."""
    if not with_train and cfg.val_size:
        with_train = True  # the validation split is carved from the training images
    train = _load_split(cfg, "train", classes, seed) if with_train else None
    if train is not None and cfg.val_size:
        train, test = _carve_validation(train, cfg.val_size, cfg.val_seed)
    else:
        test = _load_split(cfg, "test", classes, seed)
    if stats is None:
        if train is None:
            raise DataError("dataset statistics need the training split; pass them from the checkpoint")
        stats = channel_stats(train.images)
    return DatasetArrays(train=train, test=test, classes=tuple(classes), stats=stats)


__all__ = ["ImageSplit", "ChannelStats", "DatasetArrays", "DataError", "channel_stats", "load_dataset"]
