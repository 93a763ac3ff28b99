"""The `pid-export` console script: signals are one line from the first instant.

Importing the CLI takes seconds (torch, onnx); a Ctrl-C or SIGTERM then would print a
KeyboardInterrupt traceback. Until pid_export.cli installs its own handlers, these end the
process at once with the same line and exit code; nothing has been written yet.
"""

import os
import signal
import sys

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def _during_start_up(signum: int, frame: object) -> None:
    os.write(2, f"pid-export: interrupted by {NAMES[signum]} while starting; nothing was written\n".encode())
    os._exit(128 + signum)


def main() -> None:
    for signum in NAMES:
        signal.signal(signum, _during_start_up)
    from .cli import main as cli_main  # installs the export's own handlers first thing

    cli_main()
