"""Ctrl-C or SIGTERM while pid-export is still importing torch: one line, 130 / 143, nothing written.

The console script is pid_export.entry:main; its handlers are in place before the CLI's imports
(which take seconds): the signal is sent as soon as /proc says the process catches SIGTERM.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENTRY = "import sys; from pid_export.entry import main; sys.argv[0] = 'pid-export'; main()"


def _wait_for_sigterm_handler(pid: int, timeout: float = 30.0) -> None:
    """Until the process catches SIGTERM (Python itself catches only SIGINT at start-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)
    raise AssertionError("pid-export never installed its SIGTERM handler")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_start_up_is_one_line(tmp_path: Path, signum: int, code: int):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-c", ENTRY, "--demo", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for_sigterm_handler(proc.pid)  # entry.main has run; the CLI's imports take seconds more
    assert proc.poll() is None, "pid-export ended before the signal"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, (stdout, stderr)
    lines = (stdout + stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pid-export: interrupted by "), lines
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no stage left
