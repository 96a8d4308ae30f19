"""partrain: data-parallel training of pure-NumPy neural networks on multicore machines."""

from . import functional, layers, optim, zoo
from .callbacks import Callback, EarlyStopping, History
from .chunks import WorkerCrashError
from .gradcheck import gradcheck
from .layers import Context
from .model import Sequential, load
from .parallel import ParallelismWarning
from .trainer import NonFiniteLossError, Trainer, TrainingInterrupted

__version__ = "0.1.0"

__all__ = [
    "Callback", "Context", "EarlyStopping", "History", "NonFiniteLossError", "ParallelismWarning",
    "Sequential", "Trainer", "TrainingInterrupted", "WorkerCrashError", "functional",
    "gradcheck", "layers", "load", "optim", "zoo", "__version__",
]
