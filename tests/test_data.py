import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest

from cifar_ddp.config import CIFAR10_CLASSES, DataConfig
from cifar_ddp.data import DataError, channel_stats, load_dataset

from conftest import make_image_folder


def folder_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="folder", root=str(root), **kw)


def test_folder_source_reads_every_image_with_labels(image_folder: Path):
    data = load_dataset(folder_cfg(image_folder))
    assert data.train.images.shape == (30, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.test.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert data.classes == CIFAR10_CLASSES
    # Stats come from the training split itself.
    expected = data.train.images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(data.stats.mean, expected)


def test_folder_source_reads_jpeg_and_caches(tmp_path: Path):
    root = make_image_folder(tmp_path / "jpg", suffix=".jpg")
    first = load_dataset(folder_cfg(root))
    caches = sorted(p.name.split("-")[0] + p.suffix for p in (root / ".cifar_ddp_cache").iterdir())
    assert caches == ["test.crc32", "test.npy", "train.crc32", "train.npy"]
    second = load_dataset(folder_cfg(root))
    assert np.array_equal(first.train.images, second.train.images)
    # A changed file changes the fingerprint: the cache is rebuilt, not trusted.
    from PIL import Image
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "0000.jpg")
    third = load_dataset(folder_cfg(root))
    assert not np.array_equal(first.train.images, third.train.images)


def test_a_changed_listing_deletes_the_older_cache_in_the_roots_folder_only(tmp_path: Path):
    """After a file changes, the root's own cache folder holds one cache per split (the old
    fingerprint's files and an older-format .npz are gone; the other split's are kept); a
    shared data.cache_dir keeps every listing's, as other roots may be using it."""
    from PIL import Image

    root = make_image_folder(tmp_path / "jpg", suffix=".jpg")
    folder, shared = root / ".cifar_ddp_cache", tmp_path / "shared"
    load_dataset(folder_cfg(root))
    first = load_dataset(folder_cfg(root))   # read from the cache: its train images map the file
    assert isinstance(first.train.images, np.memmap)
    first_pixels = decoded_with_pil(root, "train")
    load_dataset(folder_cfg(root, cache_dir=str(shared)))
    (folder / "train-0123456789abcdef.npz").write_bytes(b"an old format's cache")
    before = {p.name for p in folder.iterdir()}
    assert len(before) == 5 and {p.name for p in shared.iterdir()} == before - {"train-0123456789abcdef.npz"}
    # Not caches: a user's file, and another job's cache write under way.
    kept = {"train-notes.txt", ".train-fedcba9876543210.npy.x1y2.tmp"}
    for name in kept:
        (folder / name).write_bytes(b"keep me")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "0000.jpg")
    changed = load_dataset(folder_cfg(root))
    after = {p.name for p in folder.iterdir()} - kept
    tests = {n for n in before if n.startswith("test-")}
    assert len(after) == 4 and tests < after and not (after - tests) & before
    assert all((folder / name).read_bytes() == b"keep me" for name in kept)
    # The job that mapped the deleted cache still reads its images.
    assert np.array_equal(np.asarray(first.train.images), first_pixels)
    [cache] = folder.glob("train-*.npy")
    assert np.array_equal(np.load(cache), changed.train.images) and np.array_equal(
        changed.train.images, decoded_with_pil(root, "train"))
    load_dataset(folder_cfg(root, cache_dir=str(shared)))
    assert len(list(shared.glob("train-*.npy"))) == 2 and len(list(shared.glob("test-*.npy"))) == 1


def decoded_with_pil(root: Path, split: str) -> np.ndarray:
    """The split's images decoded here, independently of the cache: class by class, files by name."""
    from PIL import Image

    files = sorted((root / split).glob("*/*.jpg"), key=lambda p: (CIFAR10_CLASSES.index(p.parent.name), p.name))
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])


def test_cached_images_are_memory_mapped_and_equal_a_fresh_decode_bitwise(tmp_path: Path):
    import warnings

    import torch

    root = make_image_folder(tmp_path / "jpg", suffix=".jpg")
    cache = tmp_path / "cache"
    fresh = load_dataset(folder_cfg(root, cache_dir=str(cache)))        # decodes, writes the cache
    cached = load_dataset(folder_cfg(root, cache_dir=str(cache)))       # maps the cache
    for split in ("train", "test"):
        reference = decoded_with_pil(root, split)
        for data in (fresh, cached):
            images = getattr(data, split).images
            assert images.dtype == np.uint8 and np.array_equal(images, reference)
        mapped = getattr(cached, split).images
        assert isinstance(mapped, np.memmap) and Path(mapped.filename).parent == cache
        assert getattr(cached, split).labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert cached.stats == fresh.stats
    # Copy-on-write: torch takes the array without a copy or a warning, and a write stays
    # in this process - the file, and the next run's images, are unchanged.
    mapped = cached.train.images
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = torch.from_numpy(mapped)
    tensor[0] = 0
    assert mapped[0].max() == 0
    assert np.array_equal(load_dataset(folder_cfg(root, cache_dir=str(cache))).train.images, fresh.train.images)


def _cut_short(path: Path) -> None:      # a file shorter than its header says
    path.write_bytes(path.read_bytes()[:-100])


def _fewer_images(path: Path) -> None:   # a consistent cache (checksum and all) of one image fewer
    images = np.load(path)[:-1]
    np.save(path, images)
    path.with_suffix(".crc32").write_text(str(zlib.crc32(images)))


def _flip_a_pixel(path: Path) -> None:   # same size, same header, one byte of one pixel changed
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not an array at all")


def _no_checksum(path: Path) -> None:    # the crash between writing the images and their checksum
    path.with_suffix(".crc32").unlink()


@pytest.mark.parametrize("damage", [_cut_short, _fewer_images, _flip_a_pixel, _garbage, _no_checksum],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path: Path, damage):
    root = make_image_folder(tmp_path / "jpg", suffix=".jpg")
    cfg = folder_cfg(root, cache_dir=str(tmp_path / "cache"))
    load_dataset(cfg)
    [cache] = (tmp_path / "cache").glob("train-*.npy")
    damage(cache)
    reference = decoded_with_pil(root, "train")
    rebuilt = load_dataset(cfg)
    assert rebuilt.train.images.shape == reference.shape and np.array_equal(rebuilt.train.images, reference)
    assert not isinstance(rebuilt.train.images, np.memmap)          # decoded again ...
    again = load_dataset(cfg).train.images                            # ... and the cache written anew
    assert isinstance(again, np.memmap) and np.array_equal(again, reference)


def test_missing_root(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(folder_cfg(tmp_path / "nope"))


def test_missing_split(tmp_path: Path):
    root = make_image_folder(tmp_path / "d", splits=("train",))
    with pytest.raises(DataError, match="test.*is missing"):
        load_dataset(folder_cfg(root))


def test_unknown_class_folder(image_folder: Path):
    (image_folder / "train" / "unicorn").mkdir()
    with pytest.raises(DataError, match="unknown class folder .*unicorn"):
        load_dataset(folder_cfg(image_folder))


def test_empty_class_folder(image_folder: Path):
    for p in (image_folder / "test" / "dog").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="dog.*holds no"):
        load_dataset(folder_cfg(image_folder))


def test_wrong_image_size(image_folder: Path):
    from PIL import Image
    bad = image_folder / "train" / "cat" / "0001.png"
    Image.fromarray(np.zeros((40, 32, 3), np.uint8)).save(bad)
    with pytest.raises(DataError, match=r"0001\.png.*32x40"):
        load_dataset(folder_cfg(image_folder))


def test_truncated_file(image_folder: Path):
    bad = image_folder / "train" / "ship" / "0002.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cannot read image .*0002\.png"):
        load_dataset(folder_cfg(image_folder))


def test_validation_split_is_carved_from_train(image_folder: Path):
    data = load_dataset(folder_cfg(image_folder, val_size=8))
    assert len(data.train) == 22 and len(data.test) == 8
    full = load_dataset(folder_cfg(image_folder))
    together = np.concatenate([data.train.images, data.test.images]).reshape(30, -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, full.train.images.reshape(30, -1)))


def test_validation_carve_follows_val_seed_not_the_training_seed(image_folder: Path):
    first = load_dataset(folder_cfg(image_folder, val_size=8), seed=0)
    other_seed = load_dataset(folder_cfg(image_folder, val_size=8), seed=5)
    other_carve = load_dataset(folder_cfg(image_folder, val_size=8, val_seed=5), seed=0)
    assert np.array_equal(first.test.images, other_seed.test.images)
    assert not np.array_equal(first.test.images, other_carve.test.images)


def test_fake_source_sizes_and_distinct_splits():
    data = load_dataset(DataConfig(source="fake", fake_size=40), classes=tuple(f"c{i}" for i in range(10)))
    assert data.train.images.shape == (40, 32, 32, 3) and len(data.test) == 40
    assert not np.array_equal(data.train.images, data.test.images)
    labels = data.train.labels
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() <= 9 and len(set(labels.tolist())) >= 5
    again = load_dataset(DataConfig(source="fake", fake_size=40), classes=tuple(f"c{i}" for i in range(10)))
    assert np.array_equal(again.train.images, data.train.images) and np.array_equal(again.train.labels, labels)


def write_official_batches(root: Path, per_batch: int = 4) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        payload = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                   "labels": rng.integers(0, 10, per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(payload, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return folder


def test_cifar10_source_reads_official_batches(tmp_path: Path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar
    write_official_batches(tmp_path)
    # Our hand-made batches cannot carry the official md5 sums; the reading path is what is tested here.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    data = load_dataset(DataConfig(source="cifar10", root=str(tmp_path), download=False))
    assert data.train.images.shape == (20, 32, 32, 3) and data.test.images.shape == (4, 32, 32, 3)
    assert data.stats == channel_stats(data.train.images)
    # ... and those are the pixels' own mean and std, computed here independently (torch, float64).
    import torch

    pixels = torch.from_numpy(data.train.images).double().div(255.0).reshape(-1, 3)
    assert data.stats.mean == pytest.approx(tuple(pixels.mean(0).tolist()), rel=1e-9)
    assert data.stats.std == pytest.approx(tuple(pixels.std(0, unbiased=False).tolist()), rel=1e-9)


def test_cifar10_source_refuses_batches_failing_integrity(tmp_path: Path):
    write_official_batches(tmp_path)
    with pytest.raises(DataError, match="not found or corrupted"):
        load_dataset(DataConfig(source="cifar10", root=str(tmp_path), download=False))


def test_cifar10_source_missing_without_download(tmp_path: Path):
    with pytest.raises(DataError, match="data.source=folder"):
        load_dataset(DataConfig(source="cifar10", root=str(tmp_path), download=False))


def test_augmentation_seeds_differ_across_ranks_seeds_and_epochs():
    from cifar_ddp.data.loaders import epoch_seed

    seeds = {(s, r, e): epoch_seed(s, r, e) for s in range(3) for r in range(4) for e in range(5)}
    assert len(set(seeds.values())) == len(seeds)
    assert epoch_seed(0, 1, 0) != epoch_seed(0, 0, 0)


def test_two_ranks_draw_different_augmentations_from_the_same_seed():
    import torch

    from cifar_ddp.config import AugmentConfig
    from cifar_ddp.data import ChannelStats
    from cifar_ddp.data.loaders import TrainBatches
    from cifar_ddp.data.sources import ImageSplit

    images = np.zeros((16, 32, 32, 3), dtype=np.uint8)
    split = ImageSplit(images, np.zeros(16, dtype=np.int64))
    stats = ChannelStats(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    draws = []
    for rank in (0, 1):
        batches = TrainBatches(split, AugmentConfig(), stats, batch_size=4, rank=rank, world_size=2, seed=7,
                               device=torch.device("cpu"))
        batches.set_epoch(3)
        draws.append(batches.batch_augment.sample(8, 32, 32, batches.generator))
    assert not torch.equal(draws[0]["angle"], draws[1]["angle"])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_eval_shards_of_all_ranks_partition_the_split(world_size):
    from cifar_ddp.data.loaders import eval_shard
    from cifar_ddp.data.sources import ImageSplit

    n = 23
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(3, axis=3)
    split = ImageSplit(images, np.arange(n, dtype=np.int64))
    shards = [eval_shard(split, rank, world_size) for rank in range(world_size)]
    for rank, shard in enumerate(shards):
        assert shard.labels.tolist() == list(range(rank, n, world_size))     # images rank, rank + W, ...
        assert shard.images[:, 0, 0, 0].tolist() == shard.labels.tolist()
    assert sorted(i for shard in shards for i in shard.labels.tolist()) == list(range(n))


def test_channel_std_is_over_all_pixels_not_a_mean_of_per_image_stds(tmp_path: Path):
    """Flat-colour images: every image's own std is 0, the pooled std is not. Hand-worked:
    two images, one black and one white, give mean 0.5 and std 0.5 in every channel."""
    images = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])
    stats = channel_stats(images)
    assert stats.mean == pytest.approx((0.5, 0.5, 0.5)) and stats.std == pytest.approx((0.5, 0.5, 0.5))
    # And through the folder source: ten flat colours, one per class, two images each.
    from PIL import Image

    colours = np.array([[25 * k, 255 - 25 * k, (70 * k) % 256] for k in range(10)], dtype=np.uint8)
    for split in ("train", "test"):
        for k, name in enumerate(CIFAR10_CLASSES):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.broadcast_to(colours[k], (32, 32, 3)).copy()).save(tmp_path / split / name / f"{i}.png")
    data = load_dataset(folder_cfg(tmp_path))
    expected = colours.astype(np.float64) / 255.0           # every colour weighs the same
    assert data.stats.mean == pytest.approx(tuple(expected.mean(0)), rel=1e-9)
    assert data.stats.std == pytest.approx(tuple(expected.std(0)), rel=1e-9)
    assert min(data.stats.std) > 0.1


@pytest.mark.parametrize("block_pixels", [1 << 20, 1000, 37 * 1024])   # one block; many, the last partial; exact fit
def test_channel_stats_equal_a_float64_computation_on_random_images(block_pixels, monkeypatch):
    from cifar_ddp.data import sources

    monkeypatch.setattr(sources, "_STATS_BLOCK_PIXELS", block_pixels)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    images[:5, :, :, 1] = 255          # a skewed channel
    reference = images.reshape(-1, 3).astype(np.float64) / 255.0
    stats = channel_stats(images)
    assert stats.mean == pytest.approx(tuple(reference.mean(0)), rel=1e-12)
    assert stats.std == pytest.approx(tuple(reference.std(0)), rel=1e-12)
