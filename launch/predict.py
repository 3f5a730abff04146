#!/usr/bin/env python
"""Classify image files: `cifar-ddp predict` under its older name (arguments: --help,
cifar_ddp/cli.py).

    python launch/predict.py --model runs/fast85/checkpoints/best.pt cat.png ship.jpg
"""

import sys
from pathlib import Path

# Run from a checkout without installing: make the package next to launch/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.cli import run  # noqa: E402


def main() -> int:
    return run("predict", sys.argv[1:], prog="launch/predict.py")


if __name__ == "__main__":
    sys.exit(main())
