"""`python -m cifar_ddp COMMAND ...`, the same as `cifar-ddp COMMAND ...`; what torchrun runs
with `torchrun --nproc_per_node N -m cifar_ddp train ...`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
