"""The frozen patch-whitening stem (model.whiten_stem): its filters against numpy's
eigendecomposition of the patch covariance, worked out here from explicit 2x2 slices; the
± pairs; never trained; fitted by the trainer from the training split after the val carve
and carried by the checkpoint (same logits after loading); what the rules and receptive-
field report say about a network with it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_ddp.config import ModelConfig, RulesConfig, TrainConfig
from cifar_ddp.models import build_model
from cifar_ddp.models.whitening import WHITENING_EPS, PatchMoments, PatchWhitening, whitening_stems


def correlated_images(n: int = 48, size: int = 10, seed: int = 0) -> torch.Tensor:
    """Images whose neighbouring pixels and channels are strongly correlated (as photographs'
    are): white noise, blurred over 2x2, mixed across channels, with a mean per channel."""
    g = np.random.default_rng(seed)
    noise = g.standard_normal((n, 3, size + 1, size + 1))
    blurred = noise[:, :, :-1, :-1] + noise[:, :, 1:, :-1] + 0.5 * noise[:, :, :-1, 1:] + 0.25 * noise[:, :, 1:, 1:]
    mixing = np.array([[1.0, 0.6, 0.3], [0.2, 1.0, 0.5], [0.4, 0.1, 1.0]])
    # Scaled so that eps (5e-4) is small against the smallest eigenvalue (~3).
    images = 3 * np.einsum("oc,nchw->nohw", mixing, blurred) + np.array([0.3, -0.2, 0.1])[None, :, None, None]
    return torch.from_numpy(images.astype(np.float32))


def numpy_patches(images: np.ndarray) -> np.ndarray:
    """Every 2x2 window, stride 1, as a (channel, row, column)-ordered row of 12."""
    n, c, h, w = images.shape
    rows = [images[:, :, i:i + 2, j:j + 2].reshape(n, c * 4) for i in range(h - 1) for j in range(w - 1)]
    return np.concatenate(rows).astype(np.float64)


def fitted_stem(images: torch.Tensor) -> PatchWhitening:
    moments = PatchMoments(2)
    moments.add(images[:20])
    moments.add(images[20:])     # in two chunks: the sums must not care
    stem = PatchWhitening(3)
    stem.fit(*moments.result())
    return stem


def test_patch_moments_are_numpys_mean_and_covariance():
    images = correlated_images()
    patches = numpy_patches(images.numpy())
    moments = PatchMoments(2)
    moments.add(images[:7])
    moments.add(images[7:])
    mean, covariance = moments.result()
    np.testing.assert_allclose(mean.numpy(), patches.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(covariance.numpy(), np.cov(patches, rowvar=False, bias=True), rtol=0, atol=1e-12)


def test_the_stem_whitens_its_patches_with_numpys_eigenvectors():
    images = correlated_images()
    patches = numpy_patches(images.numpy())
    covariance = np.cov(patches, rowvar=False, bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    assert eigenvalues[0] / eigenvalues[-1] > 20          # correlated indeed: far from white
    stem = fitted_stem(images)
    filters = stem.conv.weight.detach().double().reshape(24, 12).numpy()
    # Row i is eigenvector i / sqrt(eigenvalue i + eps), up to the eigenvector's sign.
    scaled = filters[:12] * np.sqrt(eigenvalues + WHITENING_EPS)[:, None]
    signs = np.sign((scaled * eigenvectors.T).sum(1))
    np.testing.assert_allclose(scaled * signs[:, None], eigenvectors.T, rtol=0, atol=1e-5)
    # The conv's outputs (before the GELU), over every position: zero mean, identity covariance.
    out = stem.conv(images).detach().double()              # (N, 24, 9, 9)
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).numpy()
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.cov(flat, rowvar=False, bias=True), np.eye(12), rtol=0, atol=1e-3)
    # eps keeps each direction's variance at eigenvalue / (eigenvalue + eps), just under 1.
    np.testing.assert_allclose(np.diag(np.cov(flat, rowvar=False, bias=True)),
                               eigenvalues / (eigenvalues + WHITENING_EPS), rtol=0, atol=2e-5)
    # The stem itself: GELU of the whitened pairs.
    torch.testing.assert_close(stem(images), torch.nn.functional.gelu(stem.conv(images)))


def test_every_filter_comes_as_a_plus_minus_pair():
    stem = fitted_stem(correlated_images())
    weight, bias = stem.conv.weight.detach(), stem.conv.bias.detach()
    assert weight.shape == (24, 3, 2, 2) and stem.out_channels == 24
    assert torch.equal(weight[12:], -weight[:12]) and torch.equal(bias[12:], -bias[:12])
    assert bias.abs().max() > 0.01                         # the data's mean is removed
    # Unfitted, it whitens white patches: ± unit vectors (scale 1) and no bias.
    fresh = PatchWhitening(3).conv
    assert torch.equal(fresh.weight.reshape(24, 12), torch.cat([torch.eye(12), -torch.eye(12)]))
    assert torch.equal(fresh.bias, torch.zeros(24))


@pytest.mark.parametrize("name", ["seed", "sep_resnet"])
def test_the_stem_is_never_trained(name):
    """No gradient, not in the optimizer, not moved by a step with the lookahead and the
    EMA on; everything else still trains."""
    from cifar_ddp.assembly import build_optimization
    from cifar_ddp.distributed import DistContext
    from cifar_ddp.step import TrainStep

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, whiten_stem=True))
    (stem,) = whitening_stems(model)
    stem.fit(*_moments(correlated_images(n=8, size=32)))
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    cfg = TrainConfig(lookahead_every_steps=1, ema_decay=0.9, precision="fp32")
    optimization = build_optimization(model, cfg, "fp32", DistContext(), total_steps=2)
    held = {id(p) for group in optimization.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in held for p in stem.parameters())
    assert all(id(p) in held for p in model.parameters() if p.requires_grad)
    step = TrainStep(model, optimization.optimizer, cfg, "fp32", torch.device("cpu"), first_step=0,
                     ema=optimization.ema, lookahead=optimization.lookahead)
    step.set_lr(0.1)
    first_conv_name = "c1.1.0.weight" if name == "seed" else "c1.1.1.weight"   # SepResNet's: the pointwise half
    first_conv = dict(model.named_parameters())[first_conv_name].clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        step(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
    assert all(p.grad is None for p in stem.parameters())
    for key, value in stem.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(dict(model.named_parameters())[first_conv_name], first_conv)


def _moments(images: torch.Tensor):
    moments = PatchMoments(2)
    moments.add(images)
    return moments.result()


def test_rules_and_receptive_field_of_the_seed_with_the_stem():
    """The stem sits inside C1: the block rules still hold, the receptive field grows by
    the 2x2 kernel's one pixel (seed 91 -> 92, SepResNet 93 -> 94), the maps are still
    16/8/4 after the strided convs, and the parameter count includes the stem. The seed's
    first conv reads 24 channels instead of 3, over its budget by 3,336, which the report
    says; SepResNet's 3x3 stem conv becomes depthwise-separable and stays inside it."""
    from cifar_ddp import rules
    from cifar_ddp.config import load_config

    seed_rules = load_config("configs/seed.yaml").rules
    # The seed: 24 - 3 more input channels into its 3x3 conv to 16.
    # SepResNet: a dense 3x3 3 -> 48 (1,296) becomes a depthwise 3x3 over 24 (216) and a 1x1 24 -> 48 (1,152).
    for name, rf, params, added, broken in (("seed", 92, 153_912, (24 - 3) * 9 * 16, ["max_params"]),
                                            ("sep_resnet", 94, 148_314, 24 * 9 + 24 * 48 - 3 * 9 * 48, [])):
        model = build_model(ModelConfig(name=name, whiten_stem=True))
        plain = build_model(ModelConfig(name=name))
        # 312 stem parameters (24 2x2x3 filters and biases), and the first conv's change.
        assert sum(p.numel() for p in model.parameters()) == params
        assert params - sum(p.numel() for p in plain.parameters()) == 312 + added
        x = torch.zeros(1, 3, 32, 32)
        sizes = []
        for block in (model.c1, model.c2, model.c3):
            x = block(x)
            sizes.append(x.shape[-1])
        assert sizes == [16, 8, 4]
        results = rules.check_rules(model, seed_rules)
        assert [r.rule for r in results if not r.ok] == broken
        assert len(results) == 10 and sum("dilated" in r.text for r in results) == 4
        texts = {r.rule: r.text for r in results}
        relation = ">" if broken else "<="
        assert texts["max_params"] == f"parameters {params:,} {relation} rules.max_params 150,576"
        assert texts["min_receptive_field"] == f"receptive field {rf} >= rules.min_receptive_field 91"
    assert sum(p.numel() for p in PatchWhitening(3).parameters()) == 312


def test_a_model_that_cannot_take_the_stem_is_refused():
    from cifar_ddp.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.whiten_stem=true needs .*seed.*sep_resnet.*drop the setting"):
        build_model(ModelConfig(name="examples/tiny_net.py:TinyNet", whiten_stem=True))


@pytest.mark.slow
def test_the_trainer_fits_the_stem_on_the_training_split_and_the_checkpoint_carries_it(tmp_path: Path):
    """One epoch with a val carve: the checkpoint's stem is the fit of the 64 training images
    left after the carve (not the 96 before it), and load_model rebuilds the very network
    (same logits as the checkpoint's weights in a freshly built model)."""
    import cifar_ddp
    from cifar_ddp import checkpoint as ckpt
    from cifar_ddp.assembly import fit_whitening_stem
    from cifar_ddp.config import load_config
    from cifar_ddp.data.sources import load_dataset

    from conftest import tiny_overrides, train_in_process

    settings = {"model.whiten_stem": "true", "data.val_size": 32, "train.epochs": 1, "train.ema_decay": 0.9}
    train_in_process(tmp_path / "run", **settings)
    path = ckpt.checkpoint_dir(tmp_path / "run") / "last.pt"
    saved = ckpt.load_file(path)
    cfg = load_config(None, tiny_overrides(tmp_path / "x", **settings))
    data = load_dataset(cfg.data, seed=cfg.seed, classes=tuple(f"class{i}" for i in range(10)))
    assert len(data.train) == 64
    expected = build_model(cfg)
    fit_whitening_stem(expected, data)
    for key in ("c1.0.conv.weight", "c1.0.conv.bias"):
        assert torch.equal(saved["model"][key], expected.state_dict()[key]), key
        assert torch.equal(saved["ema"]["module." + key], expected.state_dict()[key]), key
    loaded = cifar_ddp.load_model(path, ema=False)
    rebuilt = build_model(saved["config"])
    rebuilt.load_state_dict(saved["model"])
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))   # load_model takes [0, 1]
    mean = torch.tensor(saved["stats"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(saved["stats"]["std"]).view(1, 3, 1, 1)
    normalised = (images - mean) / std
    loaded.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), rebuilt(normalised))
        # The stem's weights matter: an unfitted one gives other logits.
        unfitted = build_model(saved["config"]).eval()
        unfitted.load_state_dict({k: v for k, v in saved["model"].items() if not k.startswith("c1.0.")}, strict=False)
        assert not torch.allclose(loaded(images), unfitted(normalised))
