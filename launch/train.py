#!/usr/bin/env python
"""Train a cifar_ddp model: `cifar-ddp train` under its older name, so that the documented
commands keep working from a checkout without installing:

    python launch/train.py --config configs/seed.yaml train.epochs=10
    torchrun --nproc_per_node 2 launch/train.py --config configs/seed.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml launch/train.py --config configs/seed.yaml

`python launch/train.py --help` lists the arguments (cifar_ddp/cli.py holds them).
"""

import sys
from pathlib import Path

# Run from a checkout without installing: make the package next to launch/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.cli import run  # noqa: E402


def main() -> int:
    return run("train", sys.argv[1:], prog="launch/train.py")


if __name__ == "__main__":
    sys.exit(main())
