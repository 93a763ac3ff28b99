"""What every example checks before minutes of loading, and how it fails: one line, no traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

INSTALL = "pip install 'pid-export[diffusers,caption]'"


def preflight(prog: str, pid: str, device: str, pipeline_model: str) -> None:
    """Exit with one line when this run cannot work here: no export, no GPU, no diffusers, weights out of reach."""
    from pid_runtime.caption import default_caption_model
    from pid_runtime.hub import why_model_unavailable

    problems: list[Callable[[], str | None]] = [
        lambda: None if Path(pid).exists() else f"--pid {pid} does not exist: export the release first (see --help)",
        lambda: (f"--device {device}: no CUDA GPU is visible (this example is meant for one; --device cpu works "
                 "but a 4K decode takes a long time)")
        if device.startswith("cuda") and not torch.cuda.is_available() else None,
        _diffusers_missing,
        lambda: why_model_unavailable(pipeline_model, "pipeline", "--model DIR (a local copy)"),
        lambda: why_model_unavailable(default_caption_model(), "PiD's caption model", "$PID_CAPTION_MODEL=DIR (a local copy)"),
    ]
    for check in problems:
        problem = check()
        if problem is not None:
            fail(prog, problem)


def _diffusers_missing() -> str | None:
    import importlib.util

    for name in ("diffusers", "transformers"):  # found, not imported: importing diffusers takes seconds
        if importlib.util.find_spec(name) is None:
            return f"needs {name}: {INSTALL}"
    return None


def fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(1)


def run_reporting_errors(prog: str, body: Callable[[], None]) -> None:
    """body(); a failure the user can act on (a load error, bad input, disk full) ends as one line."""
    from pid_runtime.errors import first_line

    try:
        body()
    except KeyboardInterrupt:
        fail(prog, "interrupted")
    except (OSError, ValueError, RuntimeError) as exc:  # diffusers/hub load errors, pid_runtime's errors
        fail(prog, f"{type(exc).__name__}: {first_line(exc)}")
