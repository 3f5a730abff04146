#!/usr/bin/env python
"""Training throughput (images/s), measured in one run on this machine, same model and batch:

  (1) naive    - the usual way: a Dataset applying the albumentations pipeline per image
                 in a DataLoader, fp32, eager, contiguous memory, loss.item() every step
  (2) default  - cifar_ddp's default single-process path: uint8 data in memory, batched
                 augmentation on the device, autocast (bf16 where supported), channels_last
  (3) ddp      - (2) under `torchrun --nproc_per_node 2` (gloo on CPU), one thread each

Last line: speedup_vs_naive=(2)/(1) ddp_efficiency=(3)/(2).

    python benchmarks/throughput.py --quick
    python benchmarks/throughput.py --data-root /tmp/cifar10-jpeg     # real images instead of fake
    python benchmarks/throughput.py --set model.dropout=0             # any config override
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cifar_ddp.config import load_config  # noqa: E402
from cifar_ddp.data.loaders import AlbumentationsDataset, TrainBatches  # noqa: E402
from cifar_ddp.data.sources import load_dataset  # noqa: E402
from cifar_ddp.distributed import init_distributed, shutdown  # noqa: E402
from cifar_ddp.engine import TrainState, resolve_precision, train_one_epoch  # noqa: E402
from cifar_ddp.models import build_model  # noqa: E402
from cifar_ddp.optim import build_optimizer  # noqa: E402
from cifar_ddp.trainer import build_training_model  # noqa: E402


def make_config(args: argparse.Namespace, extra=()):
    overrides = [f"train.batch_size={args.batch_size}", "train.progress_bar=false", *args.set, *extra]
    if args.data_root:
        overrides += ["data.source=folder", f"data.root={args.data_root}"]
    else:
        overrides += ["data.source=fake", f"data.fake_size={args.images}"]
    return load_config(REPO / "configs" / "seed.yaml", overrides)


def measure_naive(args: argparse.Namespace) -> float:
    cfg = make_config(args)
    data = load_dataset(cfg.data, seed=0, classes=tuple(f"c{i}" for i in range(10))) if not args.data_root \
        else load_dataset(cfg.data)
    dataset = AlbumentationsDataset(data.train, cfg.augment, data.stats)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.naive_workers, persistent_workers=args.naive_workers > 0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    seen, started = 0, None
    for step, (images, labels) in enumerate(batches):
        if step == args.warmup:
            started, seen = time.perf_counter(), 0
        if step == args.warmup + args.steps:
            break
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        seen += labels.numel()
    return seen / (time.perf_counter() - started)


def measure_cifar_ddp(args: argparse.Namespace) -> float:
    """cifar_ddp's own step, as the trainer runs it; images/s summed over all ranks."""
    cfg = make_config(args)
    ctx = init_distributed("auto")
    try:
        classes = None if args.data_root else tuple(f"c{i}" for i in range(10))
        data = load_dataset(cfg.data, seed=0, **({"classes": classes} if classes else {}))
        batches = TrainBatches(data.train, cfg.augment, data.stats, cfg.train.batch_size, ctx.rank,
                               ctx.world_size, 0, ctx.device)
        model = build_training_model(cfg, ctx)
        if ctx.is_distributed:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(model, cfg.train, 0.05)
        precision = resolve_precision(cfg.train.precision, ctx.device)

        def stream(count: int):
            epochs = itertools.count()
            def endless():
                for epoch in epochs:
                    batches.set_epoch(epoch)
                    yield from batches.iterate()
            return itertools.islice(endless(), count)

        state = TrainState()
        train_one_epoch(model, stream(args.warmup), optimizer, lambda s: 0.05, state, cfg.train, ctx, precision)
        metrics = train_one_epoch(model, stream(args.steps), optimizer, lambda s: 0.05, state, cfg.train, ctx,
                                  precision)
        return metrics.images_per_second
    finally:
        shutdown(ctx)


def measure_ddp(args: argparse.Namespace) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(Path(__file__).resolve()), "--worker", *sys.argv[1:]]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{done.stderr[-4000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps: under two minutes")
    parser.add_argument("--batch-size", type=int, default=256, help="per process (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--images", type=int, default=8192, help="fake images when no --data-root")
    parser.add_argument("--data-root", default="", help="an image-folder tree (data.source=folder)")
    parser.add_argument("--naive-workers", type=int, default=2, help="DataLoader workers of the naive path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for all three paths, e.g. --set model.dropout=0")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 8 if args.quick else 60
    if args.warmup is None:
        # The first steps of a process pay for allocator growth and kernel selection;
        # 20 steps get past that, so the figure is closer to a real epoch's speed.
        args.warmup = 2 if args.quick else 20

    if args.worker:  # inside torchrun: measure and report from rank 0
        result = measure_cifar_ddp(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({"images_per_s": result}), flush=True)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup}, data: {args.data_root or 'fake'}"
          + (f", overrides: {' '.join(args.set)}" if args.set else ""), flush=True)
    naive = measure_naive(args)
    print(f"(1) naive baseline (albumentations DataLoader, fp32): {naive:8.1f} images/s", flush=True)
    default = measure_cifar_ddp(args)
    print(f"(2) cifar_ddp default, 1 process:                     {default:8.1f} images/s", flush=True)
    ddp = measure_ddp(args)
    print(f"(3) cifar_ddp, torchrun --nproc_per_node 2:           {ddp:8.1f} images/s", flush=True)
    print(f"speedup_vs_naive={default / naive:.2f} ddp_efficiency={ddp / default:.2f}")


if __name__ == "__main__":
    main()
