"""tfg_optim: numerical optimizers that run as TensorFlow graph ops."""

from tfg_optim import levenberg_marquardt

__version__ = "0.1.0"

__all__ = ["levenberg_marquardt"]
