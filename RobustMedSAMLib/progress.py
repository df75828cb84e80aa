"""Progress and cancel for long work (propagation, batch runs, evaluation, downloads,
embedding caches): the callback types every long function takes, in one place.

``progress(done, total)`` is called as work finishes; ``cancel`` is a callable that
returns True to stop, or a ``threading.Event``. A stopped function raises
``errors.CancelledError`` after keeping what it already finished.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from RobustMedSAMLib.errors import InputError

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool] | threading.Event


def cancel_check(cancel: Cancel | None) -> Callable[[], bool]:
    """``cancel`` as a no-argument callable (never cancelled when None)."""
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if not callable(cancel):
        raise InputError(
            f"cancel must be a threading.Event or a function returning True to stop, not {cancel!r}"
        )
    return cancel
