#!/usr/bin/env python
"""LR range test: suggest a peak learning rate (train.lr) for a config.

    python launch/lr_find.py --config configs/fast85.yaml data.root=/path/to/cifar10-jpeg
    torchrun --nproc_per_node 2 launch/lr_find.py --config configs/fast85.yaml --steps 300

Trains a fresh model for --steps steps (default 200) with the learning rate growing
exponentially from --start to --end, with the config's batch, optimizer, precision and
augmentation; stops early when the smoothed loss exceeds 4x its best. Saves the plot
(default: OUT_DIR/lr_find.png) and prints the suggestion - the LR of the steepest fall of
the smoothed loss - as the train.lr to put in the config (train.lr is for a global batch
of train.lr_reference_batch, 256, and is scaled linearly with the real one).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.launcher import run_lr_find  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/seed.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="steps of the sweep (default %(default)s)")
    parser.add_argument("--start", type=float, default=1e-5, help="first LR (default %(default)s)")
    parser.add_argument("--end", type=float, default=10.0, help="last LR (default %(default)s)")
    parser.add_argument("--out", help="the plot to write (default: OUT_DIR/lr_find.png)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args()
    return run_lr_find(args.config, args.overrides, args.steps, args.start, args.end, args.out)


if __name__ == "__main__":
    sys.exit(main())
