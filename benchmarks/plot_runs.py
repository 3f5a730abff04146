#!/usr/bin/env python
"""Accuracy against epochs and against training time, for runs given by their
training_log.md (the table every run writes into its folder).

Each --run is LABEL=PATH[@IMAGES_PER_S]. The time axis is training time, evaluation
excluded: the run's own per-epoch times (the log's "time (s)" column, summed), or, with
@IMAGES_PER_S, epochs x training images / IMAGES_PER_S: a rate measured for all runs on one
machine (benchmarks/model_speed.py), so that runs logged on different or shared machines are
compared at one machine's pace. Seconds, or minutes when a run is longer than 10 minutes,
for every run alike. Epochs the run did not evaluate (train.eval_every_epochs) are left out;
the accuracy axis names the split the logs scored (test, or val for the validation carve).

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


def read_log(path: Path) -> Tuple[List[int], List[float], List[float], int, str]:
    """(evaluated epochs, their accuracy %, seconds per epoch (every epoch), training images,
    the split scored) from a training_log.md."""
    epochs, accuracy, seconds, images, split = [], [], [], 0, ""
    for line in path.read_text(errors="replace").splitlines():   # a wrong file: "no epoch table"
        match = re.match(r"- train images: (\d+)", line)
        if match:
            images = int(match.group(1))
        match = re.match(r"\| epoch \|.*\| (\w+) acc \|", line)
        if match:
            split = match.group(1)
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            seconds.append(float(cells[6]))
            if cells[5] != "-":          # an epoch without evaluation has no accuracy
                epochs.append(int(cells[0]))
                accuracy.append(float(cells[5].rstrip("%")))
    if not seconds:
        raise ValueError(f"{path} has no epoch table (is it a training_log.md?)")
    return epochs, accuracy, seconds, images, split


def training_seconds(epochs: List[int], seconds: List[float], images: int, rate: str) -> List[float]:
    """Training time at the end of each evaluated epoch: the log's own per-epoch times summed,
    or epochs x images / rate at one measured pace."""
    if rate:
        return [e * images / float(rate) for e in epochs]
    return [sum(seconds[:e]) for e in epochs]


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=PATH[@IMAGES_PER_S]")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    runs, splits = [], set()
    for spec in args.run:
        label, _, rest = spec.partition("=")
        path, _, rate = rest.partition("@")
        if not label or not path:
            parser.error(f"--run {spec!r}: give it as LABEL=PATH[@IMAGES_PER_S]")
        if rate and not _positive_number(rate):
            parser.error(f"--run {spec!r}: the rate after @ must be images per second, a positive number")
        if not Path(path).is_file():
            parser.error(f"--run {spec!r}: no file {path} (a run's training_log.md)")
        try:
            epochs, accuracy, seconds, images, split = read_log(Path(path))
        except ValueError as exc:
            parser.error(str(exc))
        if rate and not images:
            parser.error(f"--run {spec!r}: {path} does not say how many training images an epoch has "
                         "(its '- train images:' line), so @IMAGES_PER_S cannot place it in time")
        runs.append((label, epochs, accuracy, training_seconds(epochs, seconds, images, rate)))
        splits.add(split or "test")
    # One unit for every run: a run in seconds beside one in minutes would be read wrongly.
    longest = max((max(elapsed, default=0.0) for *_, elapsed in runs), default=0.0)
    unit, per_unit = ("min", 60.0) if longest > 600 else ("s", 1.0)
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, epochs, accuracy, elapsed in runs:
        by_epoch.plot(epochs, accuracy, marker=".", label=label)
        by_time.plot([t / per_unit for t in elapsed], accuracy, marker=".", label=label)
    scored = splits.pop() if len(splits) == 1 else "test or val"
    for axis, xlabel in ((by_epoch, "epoch"), (by_time, f"training time ({unit})")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(f"{scored} accuracy (%)")
        axis.grid(alpha=0.3)
        axis.axhline(85, color="grey", lw=0.8, ls="--")
    by_epoch.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))   # no epoch 2.5
    by_epoch.legend(fontsize=8, loc="lower right")
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
