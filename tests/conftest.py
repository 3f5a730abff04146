"""Shared helpers: synthetic image folders, launching real multi-process jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cifar_ddp.config import CIFAR10_CLASSES  # noqa: E402

# Upper bound for one launched job; a hang fails the test instead of CI's whole run.
JOB_TIMEOUT_S = 240


def make_image_folder(root: Path, per_class: int = 3, splits: Sequence[str] = ("train", "test"),
                      suffix: str = ".png", seed: int = 0, classes: Sequence[str] = CIFAR10_CLASSES) -> Path:
    """A train/<class>/*.png, test/<class>/*.png tree of random 32x32 RGB images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}{suffix}")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # Two processes on two cores: one thread each, or they fight over the cores.
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.update(extra or {})
    return env


def run_job(argv: List[str], timeout: float = JOB_TIMEOUT_S, env: Optional[Dict[str, str]] = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env or job_env(), capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, script_args: List[str], extra: Optional[List[str]] = None) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *(extra or []), str(REPO / "launch" / "train.py"), *script_args]


def train_cmd(*args: str) -> List[str]:
    return [sys.executable, str(REPO / "launch" / "train.py"), *args]


def tiny_overrides(out_dir: Path, **extra: object) -> List[str]:
    """A run of a few seconds on fake data."""
    values = {
        "data.source": "fake", "data.fake_size": 96, "train.epochs": 2, "train.batch_size": 16,
        "out_dir": str(out_dir), "train.progress_bar": "false", "model.dropout": 0.1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def assert_same_conv(x, out, weight, out_ref, weight_ref) -> None:
    """A conv's output `out` of `x` and its gradients (input and `weight`) equal to 1e-12 those
    of a reference conv (`out_ref`, `weight_ref`), under one random output gradient (float64)."""
    import torch

    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out_ref)
    dx_ref, dw_ref = torch.autograd.grad(out_ref, (x, weight_ref), grad)
    dx, dw = torch.autograd.grad(out, (x, weight), grad)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)


def record_conv_calls(monkeypatch) -> list:
    """(kernel width, dilation) of every grouped F.conv2d call from now on (which kernel a
    depthwise conv really ran: DepthwiseConv2d may run a dilated one undilated)."""
    import torch

    calls = []
    real_conv2d = torch.nn.functional.conv2d

    def recording_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if groups > 1:
            calls.append((weight.shape[-1], dilation if isinstance(dilation, int) else dilation[0]))
        return real_conv2d(input, weight, bias, stride, padding, dilation, groups)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording_conv2d)
    return calls


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def train_in_process(out_dir: Path, **extra: object):
    """A tiny single-process run inside the test process (no interpreter start-up)."""
    from cifar_ddp.config import load_config
    from cifar_ddp.distributed import DistContext
    from cifar_ddp.trainer import run

    return run(load_config(None, tiny_overrides(out_dir, **extra)), DistContext())


def final_weights(out_dir: Path):
    from cifar_ddp import checkpoint as ckpt

    return ckpt.load_file(ckpt.checkpoint_dir(out_dir) / "last.pt")["model"]


def assert_bitwise_equal(a, b) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
