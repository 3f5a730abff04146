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


def test_a_failed_parity_check_deletes_the_file_and_fails(last_pt: Path, tmp_path: Path):
    out = tmp_path / "model.ts"
    done = tool(str(REPO / "launch" / "export.py"), "--checkpoint", str(last_pt), "--format", "torchscript",
                "--out", str(out), "--tolerance", "-1")
    assert done.returncode == 1 and "does not match PyTorch" in done.stderr and not out.exists()


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
