"""Shipping a trained model: ONNX and TorchScript export with a parity check, and the
predict command, which gives the same answers from the checkpoint and from both files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_ddp import checkpoint as ckpt

from conftest import REPO, job_env, train_in_process


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def last_pt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train_in_process(out, **{"train.epochs": 2, "model.dropout": 0.0})
    return ckpt.checkpoint_dir(out) / "last.pt"


def pictures(folder: Path) -> list:
    rng = np.random.default_rng(1)
    folder.mkdir()
    paths = []
    for i, (size, suffix) in enumerate([((32, 32), ".png"), ((32, 32), ".jpg"), ((40, 56), ".png")]):
        path = folder / f"image{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_both_formats_export_with_parity_and_predict_like_the_checkpoint(last_pt: Path, tmp_path: Path):
    images = pictures(tmp_path / "pictures")
    answers = {}
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".ts")):
        done = tool(str(REPO / "launch" / "export.py"), "--checkpoint", str(last_pt), "--format", fmt)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "parity on 96 test images" in done.stdout and "top-1 agrees on 96/96" in done.stdout
        assert (last_pt.with_suffix(suffix)).is_file()
    for model in (last_pt, last_pt.with_suffix(".onnx"), last_pt.with_suffix(".ts")):
        done = tool(str(REPO / "launch" / "predict.py"), "--model", str(model), "--json", "--top", "3", *images)
        assert done.returncode == 0, done.stderr[-2000:]
        answers[model.suffix] = json.loads(done.stdout)
    first = answers[".pt"]
    assert [r["image"] for r in first] == images and all(len(r["predictions"]) == 3 for r in first)
    for other in (answers[".onnx"], answers[".ts"]):
        for mine, theirs in zip(first, other):
            assert [p["class"] for p in mine["predictions"]] == [p["class"] for p in theirs["predictions"]]
            assert mine["predictions"][0]["probability"] == pytest.approx(theirs["predictions"][0]["probability"],
                                                                         abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["launch/export.py", "--format", "onnx", "--ema"], "has no EMA weights"),
    (["launch/predict.py", "--model", "{ckpt}", "{missing}"], "does not exist"),
])
def test_bad_requests_get_one_line(last_pt: Path, tmp_path: Path, args, message):
    args = [a.format(ckpt=last_pt, missing=tmp_path / "missing.png") for a in args]
    if args[0] == "launch/export.py":
        args += ["--checkpoint", str(last_pt)]
    done = tool(str(REPO / args[0]), *args[1:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr


def in_process(script: str, monkeypatch, *args: str) -> int:
    """A launch/ script's main() in this process (no interpreter start-up)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *args])
    return runpy.run_path(str(REPO / "launch" / script), run_name="under_test")["main"]()


def error_lines(capsys) -> list:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def folder_listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_export_never_writes_over_its_checkpoint_nor_a_file_it_did_not_make(last_pt: Path, tmp_path: Path,
                                                                             monkeypatch, capsys):
    checkpoints = folder_listing(last_pt.parent)
    for fmt in ("torchscript", "onnx"):
        assert in_process("export.py", monkeypatch, "--checkpoint", str(last_pt), "--format", fmt,
                          "--out", str(last_pt), "--force") == 2
        assert "does not end in" in error_lines(capsys)[0]
    assert folder_listing(last_pt.parent) == checkpoints

    notes = tmp_path / "notes.ts"
    notes.write_text("mine")
    for force, message in (([], "already exists; pass --force"), (["--force"], "is not an exported model")):
        assert in_process("export.py", monkeypatch, "--checkpoint", str(last_pt), "--format", "torchscript",
                          "--out", str(notes), *force) == 2
        assert message in error_lines(capsys)[0]
    assert notes.read_text() == "mine"

    model = tmp_path / "model.ts"
    export_to_model = ["--checkpoint", str(last_pt), "--format", "torchscript", "--out", str(model)]
    assert in_process("export.py", monkeypatch, *export_to_model) == 0
    first = model.read_bytes()
    assert in_process("export.py", monkeypatch, *export_to_model) == 2
    assert "already exists" in error_lines(capsys)[0] and model.read_bytes() == first
    assert in_process("export.py", monkeypatch, *export_to_model, "--force") == 0   # an earlier export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ts", "notes.ts"]   # no temporary file left


def test_a_failed_parity_check_writes_nothing_and_keeps_the_earlier_export(last_pt: Path, tmp_path: Path,
                                                                          monkeypatch, capsys):
    from cifar_ddp import export

    out = tmp_path / "model.ts"
    args = ["--checkpoint", str(last_pt), "--format", "torchscript", "--out", str(out), "--force"]
    assert in_process("export.py", monkeypatch, *args) == 0
    earlier = out.read_bytes()
    monkeypatch.setattr(export, "check_parity", lambda model, path, images: export.Parity(len(images), 0.5, 0))
    assert in_process("export.py", monkeypatch, *args) == 1
    assert "does not match PyTorch; nothing was written" in capsys.readouterr().err
    assert out.read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == ["model.ts"]


@pytest.mark.parametrize("out, extra, message", [
    ("{tmp}", [], "is a folder; name a file in it"),
    ("{tmp}/missing/model.ts", [], "does not exist; create it"),
    ("{tmp}/a_file/model.ts", [], "is a file, not a folder"),
    ("/proc/model.ts", [], "cannot be written"),
    ("{tmp}/model.onnx", [], "does not end in .ts"),
    ("{tmp}/model.ts", ["--parity-images", "0"], "--parity-images is 0"),
    ("{tmp}/model.ts", ["--parity-images", "-5"], "--parity-images is -5"),
    ("{tmp}/model.ts", ["--tolerance", "-1"], "--tolerance is -1"),
    ("{tmp}/model.ts", ["--full-disk"], "cannot write the export in '{tmp}' (No space left on device)"),
])
def test_export_refuses_a_bad_destination_or_value_in_one_line(last_pt: Path, tmp_path: Path, monkeypatch, capsys,
                                                                out, extra, message):
    import errno

    from cifar_ddp import export

    (tmp_path / "a_file").write_text("")
    if extra == ["--full-disk"]:
        def full(model, classes, fmt, path):
            path.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(export, "export", full)
        extra = []
    before = sorted(tmp_path.iterdir())
    assert in_process("export.py", monkeypatch, "--checkpoint", str(last_pt), "--format", "torchscript",
                      "--out", out.format(tmp=tmp_path), *extra) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0]
    assert sorted(tmp_path.iterdir()) == before     # nothing written, nothing half-written


def test_predict_reads_a_folder_and_refuses_damaged_models_and_top_0(last_pt: Path, tmp_path: Path, monkeypatch,
                                                                     capsys):
    images = pictures(tmp_path / "pictures")
    (tmp_path / "pictures" / "notes.txt").write_text("not a picture")
    (tmp_path / "pictures" / "more").mkdir()
    assert in_process("predict.py", monkeypatch, "--model", str(last_pt), "--json", str(tmp_path / "pictures")) == 0
    captured = capsys.readouterr()
    assert [r["image"] for r in json.loads(captured.out)] == sorted(images)
    assert f"note: skipped 2 entries that are not image files in '{tmp_path / 'pictures'}'" in captured.err

    for suffix, garbage, what in ((".onnx", b"\x08\x07garbage", "an ONNX model"),
                                  (".ts", b"PK\x03\x04garbage", "a TorchScript model")):
        damaged = tmp_path / f"damaged{suffix}"
        damaged.write_bytes(garbage)
        assert in_process("predict.py", monkeypatch, "--model", str(damaged), images[0]) == 2
        errors = error_lines(capsys)
        assert len(errors) == 1 and f"'{damaged}' cannot be read as {what}" in errors[0]
    assert in_process("predict.py", monkeypatch, "--model", str(last_pt), "--top", "0", images[0]) == 2
    assert "--top is 0" in error_lines(capsys)[0]


class Shifted(torch.nn.Module):
    def __init__(self, model, by):
        super().__init__()
        self.model, self.by = model, by

    def forward(self, x):
        return self.model(x) + self.by


@pytest.mark.parametrize("by", [-0.5, 0.5])
def test_parity_fails_on_a_large_difference_of_either_sign(tmp_path: Path, by: float):
    from cifar_ddp import export

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10)).eval()
    path = tmp_path / "shifted.ts"
    export.export(Shifted(model, by).eval(), [f"c{i}" for i in range(10)], "torchscript", path)
    parity = export.check_parity(model, path, torch.rand(6, 3, 32, 32))
    assert parity.max_abs_diff == pytest.approx(0.5, abs=1e-5) and parity.top1_agree == 6
    assert not parity.ok(export.DEFAULT_TOLERANCE)
    assert parity.ok(0.51)


def test_exported_files_equal_the_raw_network_after_a_normalization_done_here(last_pt: Path, tmp_path: Path):
    """Not NormalizedModel against itself: the checkpoint's bare network, fed images that
    this test normalizes with the checkpoint's statistics (float64 numpy), must give the
    logits of the loaded model, of both exported files and of image files read from disk."""
    from cifar_ddp import export
    from cifar_ddp.config import config_from_dict
    from cifar_ddp.inference import load_for_inference, read_images
    from cifar_ddp.models import build_model

    payload = ckpt.load_file(last_pt)
    raw = build_model(config_from_dict(payload["config"]))
    raw.load_state_dict(payload["model"])
    raw.eval()
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mean, std = np.asarray(payload["stats"]["mean"]), np.asarray(payload["stats"]["std"])
    assert not np.allclose(mean, std)
    by_hand = ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        expected = raw(torch.from_numpy(by_hand).float()).numpy()
    paths = []
    for i, picture in enumerate(pixels):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(picture).save(paths[-1])
    inputs = read_images(paths)
    assert torch.equal(inputs, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0)
    trained = load_for_inference(last_pt)
    with torch.no_grad():
        np.testing.assert_allclose(trained.model(inputs).numpy(), expected, atol=1e-4, rtol=0)
    for fmt, suffix in (("torchscript", ".ts"), ("onnx", ".onnx")):
        out = tmp_path / f"model{suffix}"
        export.export(trained.model, trained.classes, fmt, out)
        np.testing.assert_allclose(export.run_exported(out, inputs), expected, atol=1e-4, rtol=0)


def test_checkpoint_weights_picks_the_ema_unless_told_otherwise():
    from cifar_ddp.errors import UserError
    from cifar_ddp.inference import checkpoint_weights

    raw = {"w": torch.zeros(2)}
    ema = {"module.w": torch.ones(2), "n_averaged": torch.tensor(5)}
    state, used = checkpoint_weights({"model": raw, "ema": ema})
    assert used and list(state) == ["w"] and torch.equal(state["w"], torch.ones(2))   # what the run evaluated
    assert checkpoint_weights({"model": raw, "ema": ema}, ema=True)[1]
    state, used = checkpoint_weights({"model": raw, "ema": ema}, ema=False)
    assert not used and state is raw
    assert checkpoint_weights({"model": raw, "ema": None}) == (raw, False)
    with pytest.raises(UserError, match="no EMA weights"):
        checkpoint_weights({"model": raw, "ema": None}, ema=True)


def test_a_larger_picture_is_resized_bilinearly(tmp_path: Path):
    """A 64x64 pixel checkerboard of 0 and 255: bilinear downsizing averages neighbours to
    mid-grey everywhere; nearest would keep pure black or white."""
    from cifar_ddp.inference import read_images

    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    path = tmp_path / "board.png"
    Image.fromarray(np.stack([board] * 3, axis=2)).save(path)
    x = read_images([path])
    assert x.shape == (1, 3, 32, 32)
    assert (x - 0.5).abs().max() < 0.1
