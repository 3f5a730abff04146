#!/usr/bin/env python
"""Where a recipe's wall time goes, start to exit: runs `launch/train.py` as a user would
(a fresh process each time, in a fresh out_dir), reads the run's own breakdown from its
`final:` line (timing.PhaseClock: start-up, data, build, set-up, training steps,
evaluation, checkpoints, logging, other) and adds what only the outside sees: the time
after the run's end until the process exited (teardown). Medians over --runs.

    python benchmarks/wall_time.py --config fast85_gpu --runs 3
    python benchmarks/wall_time.py --config smoke data.source=fake     # a quick look on a CPU

Last line: training_steps_share=<training steps / start-to-exit wall> (issue 29's goal is
>= 0.6 for fast85_gpu on a GPU, >= 0.85 for fast85 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cifar_ddp.timing import DESCRIPTIONS, PHASES  # noqa: E402


def one_run(config: str, overrides: list, out_dir: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--config", config, *overrides,
                           f"out_dir={out_dir}", "train.progress_bar=false"],
                          capture_output=True, text=True)
    outside = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    final = json.loads([line for line in done.stdout.splitlines() if line.startswith("final: ")][-1][7:])
    parts = dict(final["wall_time_s"])
    # The run's clock stops at its end; the process still leaves the group and exits.
    parts["teardown"] = max(outside - parts["wall"], 0.0)
    parts["start to exit"] = outside
    parts["accuracy"] = final["test_accuracy"]
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="fast85", help="a packaged config's name or a YAML file "
                                                           "(default %(default)s)")
    parser.add_argument("--runs", type=int, default=1, help="runs; the table shows medians (default %(default)s)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep each run's out_dir under DIR (run0, run1, ...) instead of a scratch folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args()
    if args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    runs = []
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        print(f"error: --keep {args.keep} is not empty; name a new folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="wall_time.") as scratch:
        runs_dir = args.keep if args.keep is not None else Path(scratch)
        for i in range(args.runs):
            runs.append(one_run(args.config, args.overrides, runs_dir / f"run{i}"))
            print(f"run {i + 1}/{args.runs}: {runs[-1]['start to exit']:.2f} s start to exit, "
                  f"accuracy {runs[-1]['accuracy']:.4f}", flush=True)
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    wall = median["start to exit"]
    print(f"\n{args.config} {' '.join(args.overrides)}: median of {args.runs} run(s)\n")
    print("| phase | seconds | share | what |\n|---|---:|---:|---|")
    for name in [*PHASES, "teardown"]:
        what = DESCRIPTIONS.get(name, "after the run's end: leaving the process group, interpreter exit")
        print(f"| {name} | {median[name]:.2f} | {100 * median[name] / wall:.1f}% | {what} |")
    print(f"| **start to exit** | **{wall:.2f}** | 100% | measured from outside the process |")
    print(f"\ntraining_steps_share={median['training steps'] / wall:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
