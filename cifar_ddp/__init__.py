"""cifar_ddp: a distributed PyTorch trainer for compact CNNs on CIFAR-10."""

import os

# albumentations (imported later, also in DataLoader workers, which inherit this) asks
# PyPI for a newer version at import unless told not to: on an offline machine - a GPU
# node, a cluster's compute nodes - that is a warning per process and a delay. The
# package never phones home; a user who wants the check sets the variable to 0 themselves.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, UserError  # noqa: E402
from .receptive_field import ReceptiveFieldError, receptive_field  # noqa: E402

__all__ = ["Config", "load_config", "ConfigError", "UserError", "ReceptiveFieldError", "receptive_field",
           "train", "load_model", "TrainResult"]
__version__ = "0.1.0"

_API = ("train", "load_model", "TrainResult")


def __getattr__(name: str):
    # The notebook API (cifar_ddp/api.py) is imported on first use: `import cifar_ddp` stays
    # light, and a launcher that imports the package does not load the trainer through it.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cifar_ddp' has no attribute '{name}'")
