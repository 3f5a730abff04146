#!/usr/bin/env python
"""LR range test: `cifar-ddp lr-find` under its older name (arguments: --help,
cifar_ddp/cli.py).

    python launch/lr_find.py --config configs/fast85.yaml data.root=/path/to/cifar10-jpeg
"""

import sys
from pathlib import Path

# Run from a checkout without installing: make the package next to launch/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.cli import run  # noqa: E402


def main() -> int:
    return run("lr-find", sys.argv[1:], prog="launch/lr_find.py")


if __name__ == "__main__":
    sys.exit(main())
