#!/usr/bin/env python
"""Accuracy against epochs and against training time, for runs given by their
training_log.md (the table every run writes into its folder).

Each --run is LABEL=PATH[@IMAGES_PER_S]. The time axis is the run's own per-epoch times,
or, with @IMAGES_PER_S, epochs x training images / IMAGES_PER_S: a rate measured for all
runs on one machine (benchmarks/model_speed.py), so that runs logged on different or shared
machines are compared at one machine's pace.

    python benchmarks/plot_runs.py --out docs/sep_resnet_vs_seed.png \\
        --run "seed net=docs/runs/h200_fast85_gpu_seed0.md@293" \\
        --run "SepResNet=docs/runs/cpu_sep_resnet10_seed0.md@168"
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import List, Tuple

import matplotlib

matplotlib.use("Agg")   # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: Path) -> Tuple[List[int], List[float], List[float], int]:
    """(epochs, accuracy %, seconds per epoch, training images) from a training_log.md."""
    epochs, accuracy, seconds, images = [], [], [], 0
    for line in path.read_text().splitlines():
        match = re.match(r"- train images: (\d+)", line)
        if match:
            images = int(match.group(1))
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            epochs.append(int(cells[0]))
            accuracy.append(float(cells[5].rstrip("%")))
            seconds.append(float(cells[6]))
    if not epochs:
        raise SystemExit(f"error: {path} has no epoch table (is it a training_log.md?)")
    return epochs, accuracy, seconds, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=PATH[@IMAGES_PER_S]")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    time_unit = "s"
    for spec in args.run:
        label, _, rest = spec.partition("=")
        path, _, rate = rest.partition("@")
        epochs, accuracy, seconds, images = read_log(Path(path))
        if rate:
            per_epoch = images / float(rate)
            elapsed = [e * per_epoch / 60 for e in epochs]
            time_unit = "min"
        else:
            elapsed = [sum(seconds[:i + 1]) for i in range(len(seconds))]
        by_epoch.plot(epochs, accuracy, marker=".", label=label)
        by_time.plot(elapsed, accuracy, marker=".", label=label)
    for axis, xlabel in ((by_epoch, "epoch"), (by_time, f"training time ({time_unit})")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.axhline(85, color="grey", lw=0.8, ls="--")
    by_epoch.legend(fontsize=8, loc="lower right")
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
