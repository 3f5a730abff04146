"""CUDA only (skipped without a GPU; `benchmarks/gpu_check.sh` runs them on one): the
captured step against eager, no host sync in the steady state, and torchrun with one
process on nccl."""

from pathlib import Path

import pytest
import torch

from cifar_ddp.config import ModelConfig, TrainConfig
from cifar_ddp.models import build_model
from cifar_ddp.optim import build_optimizer
from cifar_ddp.step import GRAPH_WARMUP_STEPS, TrainStep

from conftest import run_job, tiny_overrides, torchrun

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = torch.device("cuda", 0)


def batches(count: int, n: int = 64):
    g = torch.Generator(device=GPU).manual_seed(0)
    for _ in range(count):
        images = torch.randn(n, 3, 32, 32, generator=g, device=GPU).contiguous(memory_format=torch.channels_last)
        yield images, torch.randint(0, 10, (n,), generator=g, device=GPU)


def run_steps(cuda_graph: bool, optimizer: str = "sgd", steps: int = GRAPH_WARMUP_STEPS + 6):
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0)).to(GPU, memory_format=torch.channels_last)
    cfg = TrainConfig(cuda_graph=cuda_graph, optimizer=optimizer)
    optimizer = build_optimizer(model, cfg, 0.05)
    stream = torch.cuda.Stream(GPU) if cuda_graph else None
    step = TrainStep(model, optimizer, cfg, "fp32", GPU, first_step=0, stream=stream)
    losses, base = [], 0.05 if optimizer == "sgd" else 0.002
    for i, (images, labels) in enumerate(batches(steps)):
        step.set_lr(base * (1 + i % 3))     # the LR changes between replays
        step(images, labels)
        losses.append(step.read()["loss"])
    return losses, step, model


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_captured_step_matches_eager_and_replays(optimizer):
    eager, _, eager_model = run_steps(cuda_graph=False, optimizer=optimizer)
    captured, step, captured_model = run_steps(cuda_graph=True, optimizer=optimizer)
    assert step.graph is not None and step.setup_seconds > 0
    # The warm-up steps are the same eager code; replays follow the LR changes.
    assert captured == pytest.approx(eager, rel=2e-3)
    for a, b in zip(captured_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_steady_state_step_never_syncs_the_host():
    torch.manual_seed(0)
    model = build_model(ModelConfig(dropout=0.0)).to(GPU, memory_format=torch.channels_last)
    for cuda_graph in (False, True):
        cfg = TrainConfig(cuda_graph=cuda_graph)
        step = TrainStep(model, build_optimizer(model, cfg, 0.05), cfg, "bf16", GPU, first_step=0,
                         stream=torch.cuda.Stream(GPU) if cuda_graph else None)
        data = list(batches(GRAPH_WARMUP_STEPS + 8))
        for images, labels in data[:GRAPH_WARMUP_STEPS + 2]:   # warm-up, capture
            step.set_lr(0.05)
            step(images, labels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")   # any synchronizing call now raises
        try:
            for images, labels in data[GRAPH_WARMUP_STEPS + 2:]:
                step.set_lr(0.04)
                step(images, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert step.read()["nonfinite_steps"] == 0


@pytest.mark.parametrize("extra", [{}, {"train.cuda_graph": "true"}])
def test_torchrun_one_gpu_runs_nccl_ddp(tmp_path: Path, extra):
    done = run_job(torchrun(1, tiny_overrides(tmp_path / "run", **{"data.fake_size": 512, "train.batch_size": 32,
                                                                   **extra})))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend: nccl" in done.stdout and "device: cuda:0" in done.stdout
