"""SIGINT and SIGTERM as one exception type, so every `finally` and cleanup runs and the exit code says which.

Not KeyboardInterrupt for SIGINT: click turns that into Abort after printing an empty line,
and the user would see two lines and exit status 1.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Signalled(BaseException):
    """The process got SIGINT or SIGTERM (a BaseException: `except Exception` lets it through)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum  # 130 / 143, what a shell reports for a process killed by it
        self.what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"


def _raise_signalled(signum: int, frame: object) -> None:
    raise Signalled(signum)


@contextlib.contextmanager
def signals_as_exception() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM raise Signalled (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_signalled) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


__all__ = ["Signalled", "signals_as_exception"]
