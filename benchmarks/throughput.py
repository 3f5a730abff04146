#!/usr/bin/env python
"""Training throughput (images/s), every path measured in one run on the same device
(the GPU when there is one, else the CPU), same model and batch:

  (1) naive     - the usual loop: a Dataset applying the albumentations pipeline per image
                  in DataLoader workers (one per core), fp32, eager, contiguous memory,
                  model on the device, loss.item() every step
  (2) default   - cifar_ddp's default single-process path: uint8 data in device memory,
                  the epoch augmented at once on the device, autocast (bf16 where the
                  hardware has it), channels_last, fused SGD, no host sync per step
  (3) compiled  - (2) with train.compile=true, plus train.cuda_graph=true on a GPU
                  (compile/capture time is excluded: it is spent in the untimed warm-up)
  (4) ddp       - (2) under `torchrun --nproc_per_node 2` (gloo on CPU, one thread each;
                  nccl on GPUs): only where there are two devices, else skipped and said why

Last line: speedup_vs_naive=(2)/(1) compiled_vs_default=(3)/(2) ddp_efficiency=(4)/(2)
("skipped" for a path not measured).

    python benchmarks/throughput.py --quick         # on a CPU without (3): compiling takes minutes there
    python benchmarks/throughput.py --data-root /tmp/cifar10-jpeg     # real images instead of fake
    python benchmarks/throughput.py --set model.dropout=0             # any config override
    python benchmarks/throughput.py --batch-size 512 --skip naive     # GPU recipe's batch
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cifar_ddp.config import load_config  # noqa: E402
from cifar_ddp.assembly import (build_optimization, build_step, build_training_model, configure_cudnn, load_data,  # noqa: E402
                                step_options, train_batches)
from cifar_ddp.data.loaders import AlbumentationsDataset  # noqa: E402
from cifar_ddp.data.sources import load_dataset  # noqa: E402
from cifar_ddp.distributed import init_distributed, shutdown  # noqa: E402
from cifar_ddp.engine import EpochMeter, SyncPlan, TrainState, train_one_epoch  # noqa: E402
from cifar_ddp.models import build_model  # noqa: E402
from cifar_ddp.step import GRAPH_WARMUP_STEPS  # noqa: E402


def make_config(args: argparse.Namespace, extra=()):
    overrides = [f"train.batch_size={args.batch_size}", "train.progress_bar=false", *args.set, *extra]
    if args.data_root:
        overrides += ["data.source=folder", f"data.root={args.data_root}"]
    else:
        overrides += ["data.source=fake", f"data.fake_size={args.images}"]
    # The recipe's own config where a caller names one (benchmarks/model_speed.py), else seed.yaml.
    return load_config(getattr(args, "config", None) or REPO / "configs" / "seed.yaml", overrides)


def measure_naive(args: argparse.Namespace) -> float:
    cfg = make_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset(cfg.data, seed=0, classes=tuple(f"c{i}" for i in range(10))) if not args.data_root \
        else load_dataset(cfg.data)
    dataset = AlbumentationsDataset(data.train, cfg.augment, data.stats)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.naive_workers, persistent_workers=args.naive_workers > 0,
                                         pin_memory=device.type == "cuda")
    model = build_model(cfg).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    seen, started = 0, None
    for step, (images, labels) in enumerate(batches):
        if step == args.warmup:
            started, seen = time.perf_counter(), 0
        if step == args.warmup + args.steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        seen += labels.numel()
    return seen / (time.perf_counter() - started)


def measure_cifar_ddp(args: argparse.Namespace, extra=()) -> float:
    """cifar_ddp's own step, as the trainer runs it; images/s summed over all ranks."""
    cfg = make_config(args, extra)
    ctx = init_distributed("auto")
    try:
        train, precision = step_options(cfg.train, ctx.device)
        configure_cudnn(train, ctx.device)    # as the trainer sets it
        model = build_training_model(cfg, ctx)
        data = load_data(cfg, ctx, model)
        batches = train_batches(cfg, train, data, ctx)

        def endless():
            for epoch in itertools.count():
                batches.set_epoch(epoch)
                yield from batches.iterate()

        # One continuous stream, timed over whole epochs: an epoch's augmentation is done
        # at its start, so a window must hold whole epochs to be charged its fair share.
        # Compiling and capturing happen in the warm-up, which is not timed.
        per_epoch = batches.steps_per_epoch
        warmup = max(args.warmup, GRAPH_WARMUP_STEPS + 2) if train.cuda_graph else args.warmup
        warmup, timed = (-(-count // per_epoch) * per_epoch for count in (warmup, args.steps))
        # The run's length, so that a recipe's lookahead (ramped over it) is part of the step timed.
        optimization = build_optimization(model, train, precision, ctx, lr=0.05, total_steps=warmup + timed)
        step = build_step(model, optimization, train, precision, ctx)
        batch_stream, plan, state = endless(), SyncPlan(every=10**9), TrainState()
        train_one_epoch(step, itertools.islice(batch_stream, warmup), lambda s: 0.05, state, plan,
                        EpochMeter(step, ctx))
        metrics = train_one_epoch(step, itertools.islice(batch_stream, timed), lambda s: 0.05, state, plan,
                                  EpochMeter(step, ctx))
        return metrics.images_per_second
    finally:
        shutdown(ctx)


def compiled_overrides() -> list:
    return ["train.compile=true"] + (["train.cuda_graph=true"] if torch.cuda.is_available() else [])


def compiled_skip_reason(args: argparse.Namespace, cuda: bool) -> str:
    if args.quick and not cuda:
        # Compiling on a CPU takes minutes (past 5 on a loaded 2-core machine): --quick
        # would not be quick. Without --quick it is measured.
        return "--quick on a CPU (inductor compiles for minutes); run without --quick to measure it"
    return ""


def ddp_skip_reason() -> str:
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        return f"only {torch.cuda.device_count()} GPU here; DDP over 2 ranks needs 2"
    return ""


def measure_ddp(args: argparse.Namespace) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(Path(__file__).resolve()), "--worker", *sys.argv[1:]]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{done.stderr[-4000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)["images_per_s"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, with the defaults --quick changes filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="8 timed steps per path after 2-4 untimed on 1024 fake images, and no compiled "
                             "path on a CPU: a few minutes at most")
    parser.add_argument("--batch-size", type=int, default=256, help="per process (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--images", type=int, default=None,
                        help="fake images when no --data-root (default 8192; 1024 with --quick)")
    parser.add_argument("--data-root", default="", help="an image-folder tree (data.source=folder)")
    parser.add_argument("--naive-workers", type=int, default=os.cpu_count() or 2,
                        help="DataLoader workers of the naive path (default: one per core, %(default)s here)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every path, e.g. --set model.dropout=0")
    parser.add_argument("--skip", action="append", default=[], choices=["naive", "compiled", "ddp"],
                        help="leave a path out (its ratio then prints as skipped)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.quick else 60
    if args.images is None:
        # Each window is whole epochs (an epoch is augmented at its start): with --quick,
        # 4 steps an epoch (2 per rank under DDP), so the warm-up rounds up to 4 steps, not 8.
        args.images = 1024 if args.quick else 8192
    if args.warmup is None:
        # The first steps of a process pay for allocator growth and kernel selection;
        # 20 steps get past that, so the figure is closer to a real epoch's speed.
        args.warmup = 2 if args.quick else 20
    return args


def main() -> None:
    args = parse_args()
    if args.worker:  # inside torchrun: measure and report from rank 0
        result = measure_cifar_ddp(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"images_per_s": result}), flush=True)
        return

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device: {device}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}, data: {args.data_root or 'fake'}"
          + (f", overrides: {' '.join(args.set)}" if args.set else ""), flush=True)
    default = measure_cifar_ddp(args)
    print(f"(2) cifar_ddp default, 1 process:                     {default:10.1f} images/s", flush=True)
    ratios = {"speedup_vs_naive": "skipped", "compiled_vs_default": "skipped", "ddp_efficiency": "skipped"}
    if "naive" not in args.skip:
        naive = measure_naive(args)
        print(f"(1) naive baseline (albumentations DataLoader, fp32): {naive:10.1f} images/s", flush=True)
        ratios["speedup_vs_naive"] = f"{default / naive:.2f}"
    compiled_skipped = compiled_skip_reason(args, torch.cuda.is_available())
    if "compiled" not in args.skip and compiled_skipped:
        print(f"(3) compiled skipped: {compiled_skipped}", flush=True)
    elif "compiled" not in args.skip:
        extra = compiled_overrides()
        compiled = measure_cifar_ddp(args, extra)
        print(f"(3) cifar_ddp, {' '.join(extra)}: {compiled:10.1f} images/s", flush=True)
        ratios["compiled_vs_default"] = f"{compiled / default:.2f}"
    reason = ddp_skip_reason()
    if "ddp" not in args.skip and not reason:
        ddp = measure_ddp(args)
        print(f"(4) cifar_ddp, torchrun --nproc_per_node 2:           {ddp:10.1f} images/s", flush=True)
        ratios["ddp_efficiency"] = f"{ddp / default:.2f}"
    elif reason:
        print(f"(4) ddp skipped: {reason}", flush=True)
    print(" ".join(f"{k}={v}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
