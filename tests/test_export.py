"""Shipping a trained model: ONNX and TorchScript export with a parity check, and the
predict command, which gives the same answers from the checkpoint and from both files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
