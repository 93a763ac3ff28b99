"""SIGINT and SIGTERM as one exception type, so every `finally` and cleanup runs and the exit code says which.

Not KeyboardInterrupt for SIGINT: click turns that into Abort after printing an empty line,
and the user would see two lines and exit status 1.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Callable, Iterator


class Signalled(BaseException):
    """The process got SIGINT or SIGTERM (a BaseException: `except Exception` lets it through)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum  # 130 / 143, what a shell reports for a process killed by it
        self.what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"


def _raise_signalled(signum: int, frame: object) -> None:
    raise Signalled(signum)


# Cancels of the native calls running now (e.g. ONNX Runtime's RunOptions.terminate). Python runs a
# signal handler only between bytecodes, so while the main thread is inside a long native call
# (a 4K network step on the CPU takes minutes) the handler waits for it; a watcher thread woken
# through signal.set_wakeup_fd calls these instead, the call returns early, and the handler runs.
_cancels: set[Callable[[], None]] = set()


@contextlib.contextmanager
def cancel_on_signal(cancel: Callable[[], None]) -> Iterator[None]:
    """While inside, a SIGINT/SIGTERM (under signals_as_exception) also calls `cancel()` at once."""
    _cancels.add(cancel)
    try:
        yield
    finally:
        _cancels.discard(cancel)


def _watch(reader: socket.socket) -> None:
    while True:
        try:
            woken = reader.recv(64)
        except OSError:
            return
        if not woken:  # the writer was closed: signals_as_exception has ended
            return
        for cancel in list(_cancels):
            cancel()


@contextlib.contextmanager
def signals_as_exception() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM raise Signalled, and cancel the native calls registered with
    cancel_on_signal (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_signalled) for signum in (signal.SIGINT, signal.SIGTERM)}
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(reader,), name="pid-signal-watcher", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        writer.close()
        watcher.join(timeout=1)
        reader.close()


__all__ = ["Signalled", "cancel_on_signal", "signals_as_exception"]
