"""partrain: data-parallel training of pure-NumPy neural networks on multicore machines."""

import os as _os
import sys as _sys


def _started_as_command() -> bool:
    """Whether this import is the start of `python -m partrain` (argv[0] is "-m" while the
    package is imported to find __main__) or of the `partrain` console script."""
    argv0 = _sys.argv[0] if _sys.argv else ""
    return argv0 == "-m" or _os.path.basename(argv0) == "partrain"


try:
    from . import functional, layers, optim, zoo
    from .callbacks import Callback, EarlyStopping, History
    from .engine import WorkerCrashError
    from .gradcheck import gradcheck
    from .layers import Context
    from .model import Sequential, load
    from .parallel import ParallelismWarning
    from .signals import TrainingInterrupted
    from .trainer import NonFiniteLossError, Trainer
    from .version import __version__

    if _started_as_command():
        from . import cli  # noqa: F401  (the command's own imports, under the same guard)
except KeyboardInterrupt:
    # Ctrl-C while the command is still importing: stop as a Unix tool does, quietly
    # (a library import re-raises: the program importing partrain decides).
    if _started_as_command():
        raise SystemExit(130) from None
    raise


__all__ = [
    "Callback", "Context", "EarlyStopping", "History", "NonFiniteLossError", "ParallelismWarning",
    "Sequential", "Trainer", "TrainingInterrupted", "WorkerCrashError", "functional",
    "gradcheck", "layers", "load", "optim", "zoo", "__version__",
]
