#!/usr/bin/env python
"""Train a cifar_ddp model. The same script runs under all launchers:

    python launch/train.py --config configs/seed.yaml train.epochs=10
    torchrun --nproc_per_node 2 launch/train.py --config configs/seed.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/train.py --config configs/seed.yaml

Exit status: 0 done, 2 bad config/data/checkpoint (message on stderr),
75 stopped by SIGTERM/SIGINT after writing a checkpoint (resume with train.resume=auto).
"""

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: make the package next to launch/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.launcher import run_training  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/seed.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest good checkpoint in out_dir, and stop if there is none "
                             "(train.resume=latest; train.resume=auto starts fresh instead; a file: train.resume=PATH)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.epochs=10 data.source=fake")
    # Flags may stand anywhere among the key=value overrides.
    args = parser.parse_intermixed_args()
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=latest")
    return run_training(args.config, overrides)


if __name__ == "__main__":
    sys.exit(main())
