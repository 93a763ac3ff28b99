"""SIGINT / SIGTERM for pid-export: end promptly at any stage, clean up, one line, exit 130 / 143.

`install()` (the CLI calls it) makes both signals raise `Interrupted`, a BaseException
(not KeyboardInterrupt: click would print "Aborted!" and exit 1, and library code that
catches Exception does not swallow it), so every `with`/`finally` on the way out runs
(the export's staging directory is removed). Inside a native call that calls back into
Python (a TensorRT build: its logger and progress monitor), an exception raised in the
callback is swallowed by the library; there `native_calls()` makes the handler only
record the signal, the build's progress monitor sees `requested()` and cancels the
build, and `raise_if_requested()` raises once the call has returned.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

SIGNAL_NAMES: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

_requested: int | None = None
_native_depth = 0


class Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(SIGNAL_NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        self.outcome = ""  # what became of the output (set by the export transaction)


def _handler(signum: int, frame) -> None:
    global _requested
    if _requested is None:
        _requested = signum
    if _native_depth == 0:
        raise Interrupted(_requested)


def install() -> None:
    for signum in SIGNAL_NAMES:
        signal.signal(signum, _handler)


def requested() -> int | None:
    """The signal received so far (None: none); what a cancellable native call polls."""
    return _requested


def raise_if_requested() -> None:
    if _requested is not None:
        raise Interrupted(_requested)


@contextmanager
def native_calls() -> Iterator[None]:
    """A block of native calls with Python callbacks: signals are recorded, raised after it."""
    global _native_depth
    _native_depth += 1
    try:
        yield
    finally:
        _native_depth -= 1
        if _native_depth == 0 and _requested is not None:
            # Replaces what the cancelled call raised (e.g. "could not build the engine").
            raise Interrupted(_requested)


# ---------------------------------------------------------------------------
# Test-only timing hook

PAUSE_AT = "PID_EXPORT_TEST_PAUSE_AT"  # a stage name (see STAGE_NAMES)
RESUME_FILE = "PID_EXPORT_TEST_RESUME"  # the pause ends when this file exists (or on a signal)
STAGE_NAMES = ("tracing", "folding", "onnx-write", "caption", "engine-build", "plan-write", "verify")


def stage_boundary(name: str, log=print) -> None:
    """Where the fault-injection tests time their REAL faults (a signal, a full disk).

    With $PID_EXPORT_TEST_PAUSE_AT == name the process says so and waits (up to 2 min)
    until the file $PID_EXPORT_TEST_RESUME exists or a signal arrives, so a test can send
    a signal or fill the disk at a stage too short to hit by timing. It simulates
    nothing: the fault itself is real. Without the variable this does nothing.
    """
    import os
    import time

    if _native_depth == 0:
        raise_if_requested()  # a signal whose exception a library callback swallowed
    if os.environ.get(PAUSE_AT) != name:
        return
    resume = os.environ.get(RESUME_FILE)
    log(f"test pause at {name}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _requested is None and not (resume and os.path.exists(resume)):
        time.sleep(0.02)
