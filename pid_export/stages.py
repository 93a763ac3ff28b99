"""The export's steps as the user sees them: numbered progress, and failures as one line.

Every step of `pid-export` (pipeline.py and the step modules it calls: load_step,
onnx_step, fp8_export, engine_step) prints `[n] title ...` / `    done in X s` through
`Stages`, and fails with a `PipelineError` whose text is the one line the CLI prints.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

Log = Callable[[str], None]


class PipelineError(RuntimeError):
    """A step failed for a reason the user can act on (one line)."""


class WriteFailure(PipelineError):
    """The export could not be written (full disk, I/O error): a failure of the run, not of its input."""


class Stages:
    """Numbered progress around long steps: `[n] title ...`, then `    done in X s`."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.count = 0

    def __call__(self, title: str) -> "_Stage":
        self.count += 1
        return _Stage(self.log, f"[{self.count}] {title}")

    def detail(self, message: str) -> None:
        self.log(f"    {message}")


def silent_stages() -> Stages:
    """Stages that print nothing (a step called on its own, outside pid-export)."""
    return Stages(lambda message: None)


class _Stage:
    def __init__(self, log: Log, title: str) -> None:
        self.log, self.title = log, title

    def __enter__(self) -> "_Stage":
        self.start = time.perf_counter()
        self.log(f"{self.title} ...")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.log(f"    done in {time.perf_counter() - self.start:.1f} s")


@contextmanager
def one_line_write_errors(out_dir: Path) -> Iterator[None]:
    """A refused output directory, a full disk or any write failure anywhere in the export is
    one line, not a traceback."""
    from .staging import StagingError

    kept = " (the previous export there is unchanged)" if out_dir.exists() else ""
    try:
        yield
    except StagingError as exc:
        raise PipelineError(str(exc)) from None
    except OSError as exc:
        raise WriteFailure(f"cannot write the export to {out_dir}: {exc.strerror or exc}{kept}") from None
