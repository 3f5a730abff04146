"""The LR range test: an exponential sweep that stops when the loss diverges, and a
suggestion inside the swept range at the steepest fall of the loss."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cifar_ddp.config import CIFAR10_CLASSES, load_config
from cifar_ddp.distributed import DistContext
from cifar_ddp.lr_find import lr_range_test, suggest

from conftest import REPO, run_job, tiny_overrides


def flat_colour_folder(root: Path, per_class: int = 12) -> Path:
    """Each class one flat colour, with noise: learnable in a few steps (fake data is not)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k, name in enumerate(CIFAR10_CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class if split == "train" else 1):
                picture = np.array([25 * k, 255 - 25 * k, (70 * k) % 256]) + rng.integers(-40, 40, (32, 32, 3))
                Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_the_sweep_is_exponential_and_stops_when_the_loss_diverges(tmp_path: Path, monkeypatch):
    folder = flat_colour_folder(tmp_path / "images")
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"data.source": "folder", "data.root": str(folder),
                                                                 "model.dropout": 0.0}))
    import cifar_ddp.lr_find as lr_find

    asked = []

    def spy(lrs, losses):
        asked.append((list(lrs), list(losses), suggest(lrs, losses)))
        return asked[-1][2]

    monkeypatch.setattr(lr_find, "suggest", spy)
    result = lr_range_test(cfg, DistContext(), steps=40, start=1e-3, end=1e5)
    # The suggestion is the rule (tested on its own below) applied to this sweep's own curve.
    assert asked == [(result.lrs, result.losses, result.suggested_lr)]
    ratios = np.diff(np.log(result.lrs))
    assert np.allclose(ratios, math.log(1e8) / 39)
    assert result.stopped_early and len(result.lrs) < 40
    assert result.lrs[0] <= result.suggested_lr <= result.lrs[-1]
    # Not any swept LR: the one where the smoothed loss falls fastest against log LR (a slope
    # taken here by central differences), before the loss's lowest point.
    losses, log_lr = np.asarray(result.losses), np.log(result.lrs)
    lowest, skip = int(np.argmin(losses)), max(1, len(losses) // 10)
    assert lowest - skip >= 2, f"the sweep must fall for a while before it diverges: {losses.round(3)}"
    chosen = result.lrs.index(result.suggested_lr)
    assert skip <= chosen <= lowest

    def slope(i):   # central inside [skip, lowest], one-sided at its ends
        a, b = max(i - 1, skip), min(i + 1, lowest)
        return (losses[b] - losses[a]) / (log_lr[b] - log_lr[a])

    slopes = {i: slope(i) for i in range(skip, lowest + 1)}
    assert slopes[chosen] < 0 and slopes[chosen] == pytest.approx(min(slopes.values()))


def test_the_suggestion_is_the_steepest_fall_before_the_minimum():
    lrs = list(np.logspace(-4, 1, 101))
    x = np.log10(lrs)
    # Flat, then falling fastest at 1e-2, a minimum at 1e-1, then rising.
    losses = list(2.0 - np.tanh(3 * (x + 2)) + np.where(x > -1, 4 * (x + 1) ** 2, 0))
    assert suggest(lrs, losses) == pytest.approx(1e-2, rel=0.13)


@pytest.mark.slow
def test_lr_find_under_torchrun_two_processes(tmp_path: Path):
    plot = tmp_path / "sweep.png"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "launch" / "lr_find.py"), "--steps", "20", "--out", str(plot),
            *tiny_overrides(tmp_path / "run")]
    done = run_job(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("suggested peak LR") == 1 and plot.stat().st_size > 0


@pytest.mark.parametrize("out, written", [("plots", "plots/lr_find.png"), ("sweep", "sweep.png"),
                                          ("sweep.txt", None)])
def test_the_plot_goes_where_the_message_says_and_a_non_picture_suffix_is_refused(tmp_path: Path, capsys,
                                                                                 out, written):
    from cifar_ddp.launcher import run_lr_find

    (tmp_path / "plots").mkdir()
    code = run_lr_find(None, tiny_overrides(tmp_path / "run"), steps=10, start=1e-3, end=1.0,
                       out=str(tmp_path / out))
    captured = capsys.readouterr()
    if written is None:
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "ends in .txt, which is not a picture format" in errors[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]
        return
    assert code == 0, captured.err[-2000:]
    assert f"; plot: {tmp_path / written}\n" in captured.out and (tmp_path / written).stat().st_size > 0


def test_a_full_disk_while_saving_the_plot_gives_advice_for_lr_find(tmp_path: Path, capsys, monkeypatch):
    import errno

    from cifar_ddp import report
    from cifar_ddp.launcher import run_lr_find

    def full(fig, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(report, "save", full)
    code = run_lr_find(None, tiny_overrides(tmp_path / "run"), steps=10, start=1e-3, end=1.0,
                       out=str(tmp_path / "sweep.png"))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == [f"error: cannot write '{tmp_path / 'sweep.png'}' (No space left on device); free "
                                    "space there or pick another folder, then run lr_find again"]


def test_the_smoothed_loss_is_bias_corrected_from_the_first_step(tmp_path: Path):
    """At tiny LRs nothing is learned: the smoothed loss starts near a fresh 10-class model's
    ln 10 (not 2% of it, as an EMA started at 0 without correction would) and stays there,
    so the sweep runs to its end."""
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"data.fake_size": 64, "train.batch_size": 8,
                                                                 "train.label_smoothing": 0.0}))
    result = lr_range_test(cfg, DistContext(), steps=12, start=1e-7, end=1e-6)
    assert not result.stopped_early and len(result.lrs) == 12
    assert result.losses[0] == pytest.approx(math.log(10), abs=0.35)
    assert max(result.losses) < 1.2 * min(result.losses)
