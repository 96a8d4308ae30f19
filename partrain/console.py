"""What a command-line run prints besides its results: warnings as one-line notes."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def warnings_as_notes(category: type[Warning]) -> Iterator[None]:
    """Within the block, every warning of `category` (all of them, even repeats) is printed
    on stderr as one `note: ...` line when the block ends; other warnings are shown as usual."""
    with warnings.catch_warnings(record=True) as noticed:
        warnings.simplefilter("always", category)
        yield
    for warning in noticed:
        if issubclass(warning.category, category):
            print(f"note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)
