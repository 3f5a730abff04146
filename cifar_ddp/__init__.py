"""cifar_ddp: a distributed PyTorch trainer for compact CNNs on CIFAR-10."""

from .config import Config, load_config
from .errors import ConfigError, UserError
from .receptive_field import ReceptiveFieldError, receptive_field

__all__ = ["Config", "load_config", "ConfigError", "UserError", "ReceptiveFieldError", "receptive_field"]
__version__ = "0.1.0"
