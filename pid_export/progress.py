"""Progress inside the ONNX export step: what it is doing, a heartbeat while it traces, and where the time went.

The exporter says `tracing the network ...`, then `traced in N s; folding constants`, then
`wrote model.onnx ... ; checking`: each message's tail after "; " names the next phase. This
wraps that progress callback, so the step's total can be shown split by phase (the `done in`
line alone hid ~25 s of folding and checking), and tracing, silent for up to minutes, gets
a line saying how long it usually takes plus a note every HEARTBEAT_S seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

HEARTBEAT_S = 30.0
TRACING_HINT = ("(torch.onnx records every operation of the network once: usually 20-60 s for the demo's built-in "
                "model and ~2 min for a full-size 1.36B release on a 2-core CPU; nothing is printed meanwhile but "
                f"a note every {HEARTBEAT_S:.0f} s)")


class PhaseTimer:
    """Use `say` as the exporter's progress callback; `summary()` afterwards gives the per-phase times."""

    def __init__(self, log: Callable[[str], None], heartbeat_s: float = HEARTBEAT_S) -> None:
        self.log = log
        self.heartbeat_s = heartbeat_s
        self.phases: list[tuple[str, float]] = []  # (name, start time)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._end: float | None = None

    def say(self, message: str) -> None:
        now = time.perf_counter()
        if not self.phases:
            self.phases.append((message.split(" ")[0], now))  # "tracing the network ..." -> "tracing"
            self.log(message)
            if self.phases[0][0] == "tracing":
                self.log(TRACING_HINT)
            self._start_heartbeat()
            return
        if "; " in message:
            self.phases.append((message.rsplit("; ", 1)[1].strip(), now))
        self.log(message)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                name, start = self.phases[-1]
                self.log(f"still {name}: {time.perf_counter() - start:.0f} s so far")

        thread = threading.Thread(target=beat, name="export-heartbeat", daemon=True)
        thread.start()
        self._thread = thread  # only once started: a signal inside start() leaves nothing to join

    def __enter__(self) -> "PhaseTimer":
        return self

    def __exit__(self, *exc) -> None:
        self._end = time.perf_counter()
        self._stop.set()
        if self._thread is not None and self._thread.ident is not None:
            self._thread.join()

    def summary(self) -> str:
        """`tracing 63.0 s, folding constants 9.1 s, checking 2.9 s` (each phase until the next one started)."""
        end = self._end if self._end is not None else time.perf_counter()
        bounds = [start for _, start in self.phases[1:]] + [end]
        return ", ".join(f"{name} {stop - start:.1f} s" for (name, start), stop in zip(self.phases, bounds))
