#!/usr/bin/env python
"""Training speed of the registry's networks, each as its recipe trains it, measured in one
run on one device (the GPU when there is one, else the CPU), with the first as baseline.

Each --recipe is LABEL=CONFIG[:OVERRIDE,...]; every recipe is timed with cifar_ddp's own
single-process step (benchmarks/throughput.py's path (2), or (3) with --set
train.cuda_graph=true ...) at its config's batch size unless --batch-size is given. The
recipes are measured in turn, --repeats rounds of them, so that a machine that slows down
or speeds up during the run is charged to every recipe alike; the median round is kept.

Prints images/s, seconds per 50,000-image epoch, and for each recipe after the first
`ratio_vs_<first>=` its speed over the first's (above 1: faster per image).

    python benchmarks/model_speed.py                        # seed net (fast85) vs SepResNet (sep_resnet10)
    python benchmarks/model_speed.py --batch-size 256       # both at one batch size
    python benchmarks/model_speed.py --quick
    python benchmarks/model_speed.py --set train.cuda_graph=true   # on a GPU: the captured step
    python benchmarks/model_speed.py --keep-going --recipe seed=configs/fast85.yaml \
        --recipe sep_native=configs/sep_resnet10.yaml:model.dilated_depthwise=native \
        --recipe sep_spread=configs/sep_resnet10.yaml:model.dilated_depthwise=spread

With --keep-going a recipe that fails (a compile or capture error) prints one FAILED line and
the others are still measured; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from throughput import measure_cifar_ddp  # noqa: E402

from cifar_ddp.assembly import step_options  # noqa: E402
from cifar_ddp.config import load_config  # noqa: E402
from cifar_ddp.errors import UserError, exit_on_user_error, one_line  # noqa: E402
from cifar_ddp.models import build_model  # noqa: E402

DEFAULT_RECIPES = ["seed=configs/fast85.yaml", "sep_resnet=configs/sep_resnet10.yaml"]
EPOCH_IMAGES = 50_000


def fail(message: str) -> None:
    """Bad input: one line naming the problem and the fix, exit status 2 (no traceback,
    errors.exit_on_user_error prints it)."""
    raise UserError(message)


def parse_recipe(text: str):
    """LABEL=CONFIG[:OVERRIDE,...] -> (label, config path, overrides)."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        fail(f"--recipe {text!r} is not LABEL=CONFIG[:OVERRIDE,...]; "
             "e.g. --recipe sep=configs/sep_resnet10.yaml:model.dropout=0.1")
    config, _, overrides = rest.partition(":")
    path = Path(config) if Path(config).is_absolute() else REPO / config
    if not path.is_file():
        fail(f"--recipe {label}: no config file {path}; give one, e.g. configs/sep_resnet10.yaml")
    # Split at the commas that start another key=, not those inside a list value.
    return label, path, [o for o in re.split(r",(?=[\w.]+=)", overrides) if o]


def recipe_args(args: argparse.Namespace, config: Path, overrides: list, device: torch.device) -> argparse.Namespace:
    """throughput.py's arguments for one recipe: its config (model, augmentation, precision)
    with its overrides, at its batch size unless --batch-size is given."""
    try:
        cfg = load_config(config, [*overrides, *args.set])
        # What the trainer would refuse on this device (a CUDA-graph recipe on a CPU) is
        # refused here too, before any recipe is timed.
        step_options(cfg.train, device)
        build_model(cfg)   # a model that cannot be built (a bad name, widths, args) likewise
    except UserError as error:   # ConfigError included
        fail(f"--recipe with {config.name}: {error} (for every recipe: --set KEY=VALUE)")
    batch = args.batch_size or cfg.train.batch_size
    # The same number of images for every recipe, whatever its batch size.
    return argparse.Namespace(config=config, batch_size=batch, steps=-(-args.timed_images // batch),
                              warmup=-(-args.warmup_images // batch), images=args.images,
                              data_root="", set=[*overrides, *args.set])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", default=[], metavar="LABEL=CONFIG[:OVERRIDE,...]",
                        help="a network and its recipe; the first is the baseline (default: "
                             + " and ".join(DEFAULT_RECIPES) + ")")
    parser.add_argument("--batch-size", type=int, default=0, help="per process; default: each config's own")
    parser.add_argument("--timed-images", type=int, default=6144,
                        help="images timed per measurement, rounded up to whole epochs (default %(default)s)")
    parser.add_argument("--warmup-images", type=int, default=2048, help="untimed images first (default %(default)s)")
    parser.add_argument("--images", type=int, default=2048, help="fake images per epoch (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the recipes (default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every recipe, e.g. --set train.precision=fp32")
    parser.add_argument("--quick", action="store_true", help="1,024 images, one round: a smoke run")
    parser.add_argument("--keep-going", action="store_true",
                        help="a recipe that fails prints FAILED and the others go on (exit status 1 at the end)")
    args = parser.parse_args()
    if args.quick:
        args.timed_images, args.warmup_images, args.repeats, args.images = 1024, 512, 1, 1024
    recipes = [parse_recipe(r) for r in (args.recipe or DEFAULT_RECIPES)]
    labels = [label for label, _, _ in recipes]
    if len(set(labels)) != len(labels):
        fail(f"two --recipe share a label ({', '.join(labels)}); give each its own")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = {label: recipe_args(args, config, overrides, device) for label, config, overrides in recipes}

    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device: {device_name}, {args.repeats} rounds, fake data"
          + (f", overrides: {' '.join(args.set)}" if args.set else ""), flush=True)
    speeds = {label: [] for label in runs}
    failed = {}
    baseline = next(iter(runs))
    width = max(14, *map(len, runs))
    for round_ in range(args.repeats):
        for label, run in runs.items():
            if label in failed:
                continue
            try:
                speeds[label].append(measure_cifar_ddp(run))
            except Exception as error:  # noqa: BLE001 - --keep-going: name it, measure the rest
                if not args.keep_going:
                    raise
                traceback.print_exc()   # the whole of it in the log; the summary gets one line
                failed[label] = one_line(error)
                print(f"round {round_ + 1}: {label:>{width}} batch {run.batch_size:4d}: FAILED ({failed[label]})",
                      flush=True)
                continue
            # Against the baseline's speed in this round, as soon as both are known (a run cut
            # off by a time limit still shows the cases it measured).
            versus = (f", ratio_vs_{baseline}={speeds[label][-1] / speeds[baseline][-1]:.2f}"
                      if label != baseline and len(speeds[baseline]) == round_ + 1 else "")
            print(f"round {round_ + 1}: {label:>{width}} batch {run.batch_size:4d}: {speeds[label][-1]:10.1f} images/s"
                  + versus, flush=True)
    ratios = []
    for label, run in runs.items():
        if label in failed:
            print(f"{label:>{width}} batch {run.batch_size:4d}: FAILED ({failed[label]})", flush=True)
            continue
        median = statistics.median(speeds[label])
        print(f"{label:>{width}} batch {run.batch_size:4d}: median {median:10.1f} images/s, "
              f"{EPOCH_IMAGES / median:9.1f} s per {EPOCH_IMAGES:,}-image epoch", flush=True)
        if label != baseline and baseline not in failed:
            ratios.append(f"ratio_vs_{baseline}[{label}]={median / statistics.median(speeds[baseline]):.2f}")
    print(" ".join(ratios) if ratios else "no ratio (one recipe, or the baseline failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
