#!/usr/bin/env python
"""Export a checkpoint's model to ONNX, TorchScript or safetensors: `cifar-ddp export` under
its older name (arguments: --help, cifar_ddp/cli.py).

    python launch/export.py --checkpoint runs/fast85/checkpoints/best.pt --format onnx
"""

import sys
from pathlib import Path

# Run from a checkout without installing: make the package next to launch/ importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cifar_ddp.cli import run  # noqa: E402


def main() -> int:
    return run("export", sys.argv[1:], prog="launch/export.py")


if __name__ == "__main__":
    sys.exit(main())
