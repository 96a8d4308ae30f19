"""The `partrain` command line: train | evaluate | gradcheck | bench.

Exit statuses: 0 success; 1 a failure during the work (a worker error, a NaN loss, gradcheck
FAIL, a file written elsewhere than asked); 2 a usage or input error, reported before any
training; 128 + N after signal N (130 Ctrl-C, 143 SIGTERM, 141 stdout closed).

One module per command (train, evaluate, gradcheck, bench), the parser, what they share
(common: options and data; outputs: the files they write), and this entry point.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

from ..data import DataError
from ..engine import WorkerCrashError
from ..io import FileFormatError
from ..parallel import ParallelismWarning
from ..runlock import CheckpointInUseError
from .common import EXIT_CLOSED_PIPE, EXIT_FAILURE, EXIT_USAGE, UsageError
from .outputs import default_save_name
from .parser import make_parser

__all__ = ["default_save_name", "main", "make_parser"]


class _ClosedPipeSafe:
    """A stand-in for sys.stdout / sys.stderr on which writing to a closed pipe (its reader,
    e.g. `head`, has exited) does not raise BrokenPipeError: the text is dropped, the stream's
    descriptor is pointed at /dev/null (the recipe of Python's signal module documentation,
    "Note on SIGPIPE", so that the interpreter's last flush cannot fail either) and
    `closed_pipe` becomes true. Lines are flushed as they are written, so that a closed
    stdout is noticed at the next line rather than at exit."""

    def __init__(self, stream):
        self._stream = stream
        self.closed_pipe = False

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                self._stream.write(text)
                if "\n" in text:
                    self._stream.flush()
            except BrokenPipeError:
                self._to_devnull()
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._to_devnull()

    def _to_devnull(self) -> None:
        self.closed_pipe = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # e.g. a stream without a descriptor
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ClosedPipeSafe(sys.stdout), _ClosedPipeSafe(sys.stderr)
    try:
        status = _main(argv)
        sys.stdout.flush()
        stdout_closed = sys.stdout.closed_pipe
    finally:
        sys.stdout, sys.stderr = saved
    return EXIT_CLOSED_PIPE if stdout_closed and status == 0 else status


def _main(argv: list[str] | None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    prog = f"partrain {args.command}"
    try:
        with warnings.catch_warnings():  # `train` prints these in its header instead
            warnings.simplefilter("ignore", ParallelismWarning)
            return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileFormatError, DataError,
            ImportError, CheckpointInUseError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (WorkerCrashError, FloatingPointError, OSError) as exc:
        print(f"{prog}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as exc:
        where = f"; checkpoint in {args.checkpoint}" if getattr(args, "checkpoint", None) else ""
        print(f"{prog}: interrupted{where}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
