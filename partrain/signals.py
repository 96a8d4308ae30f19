"""Ctrl-C and SIGTERM, acted on only at safe points: one mechanism for the trainer and the CLI.

Raising from a signal handler can interrupt any line: a lock acquisition inside the process
pool's bookkeeping (a deadlock seen with loky's manager thread), an optimizer update half
applied, a file half written. So while a `SignalGate` is installed, SIGINT and SIGTERM raise
`TrainingInterrupted` at once only where nothing is in progress; inside `held()` they are
recorded, and raised by `check()` at the next safe point or when the outermost held block ends.

The trainer installs one for the whole of `fit`, held throughout (it calls `check()` before
each step and while waiting for workers); the command line installs one for the whole command,
held while it writes files. A gate stands in for the handlers in place (default or Python
ones, such as another gate's) and gives them back on `restore()`; a signal the process ignores
(e.g. SIGINT of a background job) stays ignored; outside the main thread nothing is installed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped training; the state is that of the last step."""

    def __init__(self, signum: int):
        super().__init__(f"training interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class SignalGate:
    """SIGINT/SIGTERM as `TrainingInterrupted`, raised at once or, inside `held()`, at safe
    points (`check()`) and at the end of the held block."""

    def __init__(self) -> None:
        self.depth = 0  # nesting of held() blocks
        self.pending: int | None = None  # a signal recorded while held, not yet raised
        self._previous: dict = {}

    def install(self) -> None:
        """Take over SIGINT and SIGTERM (unless ignored, or off the main thread)."""
        self.pending = None
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            handler = signal.getsignal(signum)
            if handler is signal.SIG_DFL or callable(handler):  # not ignored, not C-level
                self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Give the handlers in place before `install` back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
        else:
            raise TrainingInterrupted(signum)

    def check(self) -> None:
        """A safe point: raise TrainingInterrupted if a signal was recorded."""
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise TrainingInterrupted(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Record signals during the block; one that came is raised when it ends normally."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth:
            self.check()

    @contextlib.contextmanager
    def installed_and_held(self) -> Iterator[SignalGate]:
        """`install()`, hold for the block, `restore()`: how the trainer guards `fit`."""
        self.install()
        try:
            with self.held():
                yield self
        finally:
            self.restore()
