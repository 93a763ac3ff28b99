"""A signal ends pid-run during a long network call, not after it.

Python runs signal handlers only between bytecodes, so without help a SIGINT that arrives inside
ONNX Runtime's `run` waits for the whole network step (seconds on a tiny network at 1536x1536,
minutes for the full-size one at 4K). pid_runtime.signals wakes a watcher thread that sets the
run's RunOptions.terminate. Measured here: one step's duration, then the time from a SIGINT sent
1 s into the first step to the process's exit.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from exports import export_cases, export_root  # noqa: F401 (fixture)

CASE = "tiny_v1_16ch_sr4"  # x32 px per latent cell: a 48x48 latent decodes to 1536x1536


def _pid_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pid_runtime.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_sigint_inside_a_network_step_ends_pid_run_before_the_step_would(tmp_path: Path, export_root):  # noqa: F811
    export = export_cases([CASE])[CASE]
    rng = np.random.default_rng(0)
    np.save(tmp_path / "lat.npy", rng.standard_normal((1, 16, 48, 48), dtype=np.float32))
    np.save(tmp_path / "cap.npy", rng.standard_normal((1, 8, 40), dtype=np.float32))
    common = [str(export), str(tmp_path / "lat.npy"), "--caption-embeds", str(tmp_path / "cap.npy"),
              "--tile", "off", "--steps", "1"]

    whole = _pid_run(*common, "--out", str(tmp_path / "whole.png"))
    started = None
    for line in whole.stdout:  # type: ignore[union-attr]
        if line.startswith("decoding"):
            started = time.perf_counter()
    assert whole.wait(timeout=600) == 0
    assert started is not None
    step_seconds = time.perf_counter() - started

    interrupted = _pid_run(*common, "--out", str(tmp_path / "cut.png"))
    lines, sent = [], None
    for line in interrupted.stdout:  # type: ignore[union-attr]
        lines.append(line.rstrip())
        if line.startswith("decoding"):
            time.sleep(min(1.0, step_seconds / 4))
            sent = time.perf_counter()
            interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=600) == 130, lines
    assert sent is not None
    after_signal = time.perf_counter() - sent
    assert lines[-1] == "pid-run: error: interrupted", lines
    assert not (tmp_path / "cut.png").exists()
    # The step had most of its time left when the signal came; waiting for it would take that long.
    assert after_signal < 0.5 * step_seconds, (after_signal, step_seconds)
