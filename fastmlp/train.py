"""fastmlp.train: the names of fastmlp.training (the trainer package), kept for code that imports them
from here (`from fastmlp.train import train, default_config`)."""

from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401  (re-exported as this module's own)
