"""partrain: data-parallel training of pure-NumPy neural networks on multicore machines."""

from . import functional, layers, optim, zoo
from .gradcheck import gradcheck
from .layers import Context
from .model import Sequential, load

__version__ = "0.1.0"

__all__ = ["Context", "Sequential", "functional", "gradcheck", "layers", "load", "optim", "zoo",
           "__version__"]
