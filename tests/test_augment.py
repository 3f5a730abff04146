"""Both augmentation paths: albumentations per image, and the batched tensor twin."""

import warnings

import albumentations as A
import numpy as np
import pytest
import torch

from cifar_ddp.config import AugmentConfig
from cifar_ddp.data import BatchAugment, ChannelStats, albumentations_eval, albumentations_train, normalize_batch

STATS = ChannelStats(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
MEAN_PIXEL = np.round(255 * np.array(STATS.mean))


def only(**probabilities) -> AugmentConfig:
    base = {"hflip_p": 0.0, "affine_p": 0.0, "cutout_p": 0.0}
    base.update(probabilities)
    return AugmentConfig(**base)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def normalized(images: np.ndarray) -> np.ndarray:
    return (images / 255.0 - np.array(STATS.mean)) / np.array(STATS.std)


# ----------------------------------------------------------------- albumentations


def test_pipeline_builds_without_deprecation_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        albumentations_train(AugmentConfig(), STATS)


def test_albumentations_output_shape_dtype_and_eval_is_only_normalized():
    image = random_images(1)[0]
    out = albumentations_train(AugmentConfig(), STATS)(image=image)["image"]
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    plain = albumentations_eval(STATS)(image=image)["image"]
    assert np.allclose(plain, normalized(image), atol=1e-5)


def test_albumentations_flip():
    image = random_images(1)[0]
    out = albumentations_train(only(hflip_p=1.0), STATS)(image=image)["image"]
    assert np.allclose(out, normalized(image[:, ::-1]), atol=1e-5)


def test_albumentations_one_16x16_hole_filled_with_mean():
    pipeline = albumentations_train(only(cutout_p=1.0), STATS)
    pipeline.set_random_seed(0)
    black = np.zeros((32, 32, 3), np.uint8)
    hole_value = normalized(MEAN_PIXEL)
    for _ in range(20):
        out = pipeline(image=black)["image"]
        in_hole = np.all(np.isclose(out, hole_value, atol=1e-4), axis=2)
        ys, xs = np.nonzero(in_hole)
        assert in_hole.sum() == 256
        assert ys.max() - ys.min() == 15 and xs.max() - xs.min() == 15


def test_albumentations_affine_keeps_borders_reflected():
    # A constant image stays constant under reflect padding, whatever the shift/rotation.
    pipeline = albumentations_train(only(affine_p=1.0), STATS)
    image = np.full((32, 32, 3), 200, np.uint8)
    out = pipeline(image=image)["image"]
    assert np.allclose(out, normalized(image), atol=1e-4)


# ------------------------------------------------------------------ batched path


def params_for(cfg: AugmentConfig, n: int = 4000, seed: int = 0):
    return BatchAugment(cfg, STATS).sample(n, 32, 32, torch.Generator().manual_seed(seed))


def test_batched_parameter_rates_and_ranges():
    cfg = AugmentConfig(hflip_p=0.5, affine_p=0.3, cutout_p=0.7, shift_limit=0.1, scale_limit=0.2, rotate_limit=30)
    p = params_for(cfg)
    assert abs(p["flip"].float().mean() - 0.5) < 0.03
    assert abs(p["affine"].float().mean() - 0.3) < 0.03
    assert abs(p["cutout"].float().mean() - 0.7) < 0.03
    on = p["affine"]
    assert p["angle"][on].abs().max() <= 30 and p["angle"][on].abs().max() > 28
    assert (p["scale"][on] - 1).abs().max() <= 0.2 and (p["scale"][on] - 1).abs().max() > 0.19
    assert p["shift"][on].abs().max() <= 0.1 and p["shift"][on].abs().max() > 0.099
    assert torch.all(p["angle"][~on] == 0) and torch.all(p["scale"][~on] == 1)
    assert p["top"].min() == 0 and p["top"].max() == 16 and p["left"].max() == 16


def test_batched_flip_and_normalization_exact():
    images = torch.from_numpy(random_images(64))
    augment = BatchAugment(only(hflip_p=0.5), STATS)
    params = augment.sample(64, 32, 32, torch.Generator().manual_seed(1))
    out = augment.apply(images, params)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    plain = normalize_batch(images, STATS)
    for i in range(64):
        expected = plain[i].flip(2) if params["flip"][i] else plain[i]
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_batched_hole_is_one_square_at_the_mean():
    images = torch.from_numpy(random_images(200)) | 1  # no pixel normalizes to exactly 0 by chance
    augment = BatchAugment(only(cutout_p=0.5, cutout_size=16), STATS)
    params = augment.sample(200, 32, 32, torch.Generator().manual_seed(2))
    out = augment.apply(images, params)
    holes = (out == 0).all(1)
    for i in range(200):
        if params["cutout"][i]:
            ys, xs = torch.nonzero(holes[i], as_tuple=True)
            assert holes[i].sum() == 256 and ys.max() - ys.min() == 15 and xs.max() - xs.min() == 15
        else:
            assert holes[i].sum() == 0


def test_batched_shift_moves_pixels_by_the_drawn_fraction():
    images = torch.from_numpy(random_images(2))
    augment = BatchAugment(only(), STATS)
    params = augment.sample(2, 32, 32, torch.Generator().manual_seed(0))
    params["affine"][:] = True
    params["shift"] = torch.tensor([[4 / 32, 0.0], [0.0, -8 / 32]])
    out = augment.apply(images, params)
    plain = normalize_batch(images, STATS)
    assert torch.allclose(out[0, :, :, 4:], plain[0, :, :, :-4], atol=1e-4)   # 4 px to the right
    assert torch.allclose(out[1, :, :-8, :], plain[1, :, 8:, :], atol=1e-4)   # 8 px up


def test_batched_rotation_turns_the_way_albumentations_does():
    """+90 degrees is a quarter turn counter-clockwise in both paths (OpenCV's convention),
    pixel for pixel; the opposite turn must not pass."""
    images = random_images(1)
    augment = BatchAugment(only(), STATS)
    params = augment.sample(1, 32, 32, torch.Generator().manual_seed(0))
    params["affine"][:] = True
    params["angle"] = torch.tensor([90.0])
    out = augment.apply(torch.from_numpy(images), params)
    reference = A.Affine(rotate=(90, 90), p=1.0)(image=images[0])["image"]
    assert np.array_equal(reference, np.rot90(images[0], 1, axes=(0, 1)))
    expected = normalize_batch(torch.from_numpy(reference.copy())[None], STATS)[0]
    assert torch.allclose(out[0], expected, atol=1e-4)


def test_batched_and_albumentations_agree_in_distribution():
    """Same config, same images: the share of hole pixels, of mirrored images and the
    output mean/std agree between the two paths."""
    cfg = AugmentConfig(hflip_p=0.5, affine_p=0.5, cutout_p=0.5)
    images = random_images(600, seed=3)
    pipeline = albumentations_train(cfg, STATS)
    pipeline.set_random_seed(0)
    reference = np.stack([pipeline(image=im)["image"] for im in images]).transpose(0, 3, 1, 2)
    batched = BatchAugment(cfg, STATS)(torch.from_numpy(images), torch.Generator().manual_seed(0)).numpy()
    hole_value = normalized(MEAN_PIXEL).reshape(1, 3, 1, 1)
    ref_holes = np.all(np.isclose(reference, hole_value, atol=1e-3), axis=1).mean()
    our_holes = np.all(batched == 0, axis=1).mean()
    assert abs(ref_holes - our_holes) < 0.02 and abs(our_holes - 0.125) < 0.02
    assert abs(reference.mean() - batched.mean()) < 0.02
    assert abs(reference.std() - batched.std()) < 0.03


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_batched_border_mode(mode):
    images = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    augment = BatchAugment(only(border_mode=mode), STATS)
    params = augment.sample(1, 32, 32, torch.Generator().manual_seed(0))
    params["affine"][:] = True
    params["shift"] = torch.tensor([[0.25, 0.0]])
    out = augment.apply(images, params)
    left_strip = out[0, :, :, :4]
    black = torch.tensor([(0 - m) / s for m, s in zip(STATS.mean, STATS.std)]).view(3, 1, 1)
    if mode == "reflect":
        assert torch.allclose(left_strip, out[0, :, :, 16:20], atol=1e-4)
    else:
        assert torch.allclose(left_strip, black.expand_as(left_strip), atol=1e-4)


# ----------------------------------------------------------------- random crop


def padded_crop(image: np.ndarray, pad: int, dy: int, dx: int, mode: str) -> np.ndarray:
    """Reference: the image padded by `pad` pixels, cut at offset (dy, dx) from the centre."""
    np_mode = "reflect" if mode == "reflect" else "constant"   # numpy's reflect leaves out the edge, like cv2's 101
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=np_mode)
    return padded[pad + dy:pad + dy + image.shape[0], pad + dx:pad + dx + image.shape[1]]


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_batched_crop_is_a_whole_pixel_shift_of_the_padded_image(mode):
    images = random_images(64)
    augment = BatchAugment(only(crop_p=1.0, crop_padding=4, border_mode=mode), STATS)
    params = augment.sample(64, 32, 32, torch.Generator().manual_seed(0))
    out = augment.apply(torch.from_numpy(images), params)
    offsets = set()
    for i, image in enumerate(images):
        dy, dx = int(params["crop_dy"][i]), int(params["crop_dx"][i])
        offsets.add((dy, dx))
        expected = normalized(padded_crop(image, 4, dy, dx, mode)).transpose(2, 0, 1)
        assert np.allclose(out[i].numpy(), expected, atol=1e-5)
    assert len(offsets) > 20 and all(abs(dy) <= 4 and abs(dx) <= 4 for dy, dx in offsets)


def test_albumentations_crop_is_a_whole_pixel_shift_of_the_padded_image():
    pipeline = albumentations_train(only(crop_p=1.0, crop_padding=3), STATS)
    pipeline.set_random_seed(0)
    image = random_images(1)[0]
    candidates = {(dy, dx): normalized(padded_crop(image, 3, dy, dx, "reflect"))
                  for dy in range(-3, 4) for dx in range(-3, 4)}
    seen = set()
    for _ in range(60):
        out = pipeline(image=image)["image"]
        match = [shift for shift, ref in candidates.items() if np.allclose(out, ref, atol=1e-5)]
        assert match, "the crop resampled the image instead of shifting whole pixels"
        seen.add(match[0])
    assert len(seen) > 15


def test_crop_draws_come_after_the_others_so_old_recipes_draw_the_same():
    without = BatchAugment(AugmentConfig(), STATS).sample(256, 32, 32, torch.Generator().manual_seed(5))
    with_crop = BatchAugment(AugmentConfig(crop_p=0.5), STATS).sample(256, 32, 32, torch.Generator().manual_seed(5))
    for key in ("flip", "affine", "angle", "scale", "shift", "cutout", "top", "left"):
        assert torch.equal(without[key], with_crop[key]), key
    assert not without["crop"].any() and 0.4 < with_crop["crop"].float().mean() < 0.6
    uncropped = ~with_crop["crop"]
    assert not with_crop["crop_dy"][uncropped].any() and not with_crop["crop_dx"][uncropped].any()


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_the_package_turns_off_albumentations_update_check_unless_the_user_chose(preset, expected):
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    if preset is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = preset
    probe = ("import os, sys, cifar_ddp.data.transforms as t; t.albumentations_train; "
             "assert 'albumentations' not in sys.modules or os.environ['NO_ALBUMENTATIONS_UPDATE']; "
             "print(os.environ.get('NO_ALBUMENTATIONS_UPDATE'))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


def test_batched_crop_offsets_reach_both_ends_symmetrically():
    p = params_for(only(crop_p=1.0, crop_padding=4))
    for key in ("crop_dy", "crop_dx"):
        values = p[key]
        assert values.min() == -4 and values.max() == 4          # -pad and +pad included
        assert abs(values.float().mean()) < 0.15                 # 4000 draws of a symmetric range
        assert len(torch.unique(values)) == 9


def test_batched_scale_and_shift_move_a_square_where_hand_worked():
    """A white 8x8 square in the middle (rows/cols 12-19) of a black image, scaled 2x about
    the centre and then shifted by a quarter of the width to the right: 16x16, rows 8-23 and
    cols 8-23 + 8 = 16-31. (Shifting before scaling would move it 16 px; scale the inverse
    the wrong way and it shrinks to 4x4.)"""
    image = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    image[0, 12:20, 12:20] = 255
    augment = BatchAugment(only(border_mode="constant"), STATS)
    params = augment.sample(1, 32, 32, torch.Generator().manual_seed(0))
    params.update(affine=torch.tensor([True]), angle=torch.tensor([0.0]), scale=torch.tensor([2.0]),
                  shift=torch.tensor([[0.25, 0.0]]))
    out = augment.apply(image, params)
    grey = out[0, 0] * STATS.std[0] + STATS.mean[0]               # back to [0, 1]
    rows, cols = torch.nonzero(grey > 0.5, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 23, 16, 31)
    assert int((grey > 0.5).sum()) == 256
