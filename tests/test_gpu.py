"""CUDA only (skipped without a GPU; `benchmarks/gpu_check.sh` runs them on one): the
captured step against eager, no host sync in the steady state (the seed net, and SepResNet
with either model.dilated_depthwise path), both paths against the dilated conv, and torchrun
with one process on nccl."""

from pathlib import Path

import pytest
import torch

from cifar_ddp.config import ModelConfig, TrainConfig
from cifar_ddp.models import build_model
from cifar_ddp.models.blocks import DepthwiseConv2d, set_dilated_depthwise
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


# The networks whose steps are captured here: the seed net, and SepResNet on either path.
MODELS = {"seed": ModelConfig(dropout=0.0),
          "sep_resnet_native": ModelConfig(name="sep_resnet", dropout=0.0, dilated_depthwise="native"),
          "sep_resnet_spread": ModelConfig(name="sep_resnet", dropout=0.0, dilated_depthwise="spread")}


def run_steps(cuda_graph: bool, optimizer: str = "sgd", steps: int = GRAPH_WARMUP_STEPS + 6, model: str = "seed"):
    torch.manual_seed(0)
    model = build_model(MODELS[model]).to(GPU, memory_format=torch.channels_last)
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


@pytest.mark.parametrize("model", ["sep_resnet_native", "sep_resnet_spread"])
def test_sep_resnet_captured_step_matches_eager(model):
    eager, _, eager_model = run_steps(cuda_graph=False, model=model)
    captured, step, captured_model = run_steps(cuda_graph=True, model=model)
    assert step.graph is not None
    assert captured == pytest.approx(eager, rel=2e-3)
    for a, b in zip(captured_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_both_dilated_depthwise_paths_equal_the_dilated_conv_on_the_gpu(channels_last):
    """float64 on the GPU: outputs and input/weight gradients of native and spread against
    nn.Conv2d(dilation=2, groups=c); auto runs native here."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False)
    reference = reference.to(GPU, torch.float64, memory_format=memory_format)
    x = torch.randn(4, 8, 16, 16, device=GPU, dtype=torch.float64).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    out_ref = reference(x)
    grad = torch.randn_like(out_ref)
    dx_ref, dw_ref = torch.autograd.grad(out_ref, (x, reference.weight), grad)
    conv = DepthwiseConv2d(8, 3, dilation=2).to(GPU, torch.float64, memory_format=memory_format)
    conv.load_state_dict(reference.state_dict())
    assert not conv.runs_spread(GPU)
    for choice in ("native", "spread"):
        set_dilated_depthwise(conv, choice)
        out = conv(x)
        dx, dw = torch.autograd.grad(out, (x, conv.weight), grad)
        for got, want in ((out, out_ref), (dx, dx_ref), (dw, dw_ref)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model", list(MODELS))
def test_steady_state_step_never_syncs_the_host(model):
    torch.manual_seed(0)
    model = build_model(MODELS[model]).to(GPU, memory_format=torch.channels_last)
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
