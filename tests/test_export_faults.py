"""Fault injection for `pid-export`: stopped at each named stage, the previous export survives.

The real CLI (a subprocess) exports the smallest golden network (static 64x64, fp16,
TensorRT-RTX engine built CPU-only, unconditional caption from a tiny local Gemma-2)
over a complete earlier export, and is stopped for real at a named stage by SIGINT,
SIGTERM or a full disk (a small tmpfs mounted here; we are root in CI). Afterwards:

- the earlier export is byte-identical (sha256 of every file, and the same file list);
- no staging directory (or set-aside old export) remains in the parent directory;
- exactly one line was printed after the stop. Counted: the lines of stdout+stderr (one
  stream, in order) that come after the stop and are not progress lines (progress lines
  start with whitespace or "[n] "). Where the stop was timed by a pause (below), the
  process was idle when stopped, so every line after the pause line is counted (strict).
- the exit code is 130 (SIGINT), 143 (SIGTERM) or 1 (full disk), with no traceback.

Timing. The long stages are hit by timing alone: the signal is sent when the stage's own
progress line appears (tracing: "tracing the network", ~10 s; folding: "folding
constants", ~4 s; engine build: "building (CPU-only", i.e. inside the TensorRT-RTX
build). Stages too short to hit that way (writing the ONNX, caption, plan write), and
every full-disk case (the disk must be filled at the stage, before it continues), use the
test-only hook PID_EXPORT_TEST_PAUSE_AT=<stage> (pid_export/interrupts.stage_boundary):
the process says "test pause at <stage>" and waits there until the resume file exists or
a signal arrives. The hook only TIMES the fault; the signal and the full disk are real.
For the engine build the full-disk pause sits inside the build (the progress monitor's
first phase). Verify runs the engine on a GPU: skipped here with a reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import golden_case

CASE = "tiny_v1_4ch_sdxl"  # the smallest golden checkpoint
RUN_TIMEOUT = 900  # seconds for any one pid-export process (a loaded 2-core CPU traced for 200 s)
STAGING_MARKS = ("pid-export-staging", "pid-export-old", ".partial-", ".old-", ".fp8-")
PROGRESS = re.compile(r"^(\s|\[\d+\] )")


def _has_rtx() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        return False
    return True


needs_rtx = pytest.mark.skipif(not _has_rtx(), reason="needs tensorrt_rtx (builds engines CPU-only)")


@dataclass
class Outcome:
    returncode: int
    lines: list[str]  # stdout+stderr, in order
    stop_index: int  # lines[stop_index:] came after the stop
    strict: bool  # the process was paused when stopped: count every line after it

    def after_stop(self) -> list[str]:
        after = self.lines[self.stop_index:]
        return after if self.strict else [line for line in after if not PROGRESS.match(line)]


def tree_hashes(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if any(mark in p.name for mark in STAGING_MARKS)]


def export_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pid_export.cli", "--network-config", str(root / "net.json"),
            "--checkpoint", str(golden_case(CASE)["pth"]), "--precision", "fp16", "--static", "64x64",
            "--trt", "rtx", "--caption-model", str(root / "gemma"), "--out", str(out), *extra]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PID_", "HF_"))}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


def run_and_stop(args: list[str], env: dict[str, str], trigger: str, stop, strict: bool) -> Outcome:
    """Run `args`; when a line contains `trigger`, call `stop(process)`; wait for the end."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               bufsize=1)
    lines: "queue.Queue[str | None]" = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    stop_index = None
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise AssertionError(f"pid-export ran past {RUN_TIMEOUT} s:\n" + "\n".join(seen)) from None
            if line is None:
                break
            seen.append(line)
            if stop_index is None and trigger in line:
                stop(process)
                stop_index = len(seen)
        returncode = process.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    assert stop_index is not None, f"the stage line {trigger!r} never appeared:\n" + "\n".join(seen)
    return Outcome(returncode, seen, stop_index, strict)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A complete export (ONNX, empty caption, engine) of the tiny network, made by pid-export."""
    if not _has_rtx():
        pytest.skip("needs tensorrt_rtx (builds engines CPU-only)")
    from tiny_gemma import save_tiny_gemma

    root = tmp_path_factory.mktemp("faults")
    (root / "net.json").write_text(json.dumps(golden_case(CASE)["network"]))
    save_tiny_gemma(root / "gemma")
    out = root / "template" / "export"
    proc = subprocess.run(export_args(root, out), capture_output=True, text=True, env=clean_env(),
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert {"model.onnx", "pid_export.json", "engine.plan", "engine.json", "empty_caption.npy"} <= set(names), names
    return root


def place_old_export(template: Path, parent: Path) -> tuple[Path, dict[str, str]]:
    out = parent / "export"
    shutil.copytree(template / "template" / "export", out)
    return out, tree_hashes(out)


@pytest.fixture
def tmpfs(tmp_path):
    """A 96 MB tmpfs (room for the old export and a new one, until the test fills it)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96M", "tmpfs", str(mount)], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'}): full-disk cases need one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60)


def fill_disk(mount: Path) -> None:
    """Write zeros into `mount` until the filesystem is full (a real ENOSPC for the next write)."""
    block = b"\0" * (1 << 20)
    with open(mount / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError:
            pass
    with open(mount / "filler2", "wb", buffering=0) as handle:  # the last partial block
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


def assert_unharmed(outcome: Outcome, parent: Path, out: Path, before: dict[str, str], code: int, first: str):
    text = "\n".join(outcome.lines)
    assert outcome.returncode == code, text
    assert "Traceback" not in text and "Aborted!" not in text, text
    assert "export ready" not in text, text
    after = outcome.after_stop()
    assert len(after) == 1, f"expected one line after the stop, got {after}\n{text}"
    assert after[0] == outcome.lines[-1] and after[0].startswith(first), text
    assert tree_hashes(out) == before, "the previous export changed"
    assert leftovers(parent) == [], leftovers(parent)


# name -> (pause stage or None, line that starts the stop)
TIMED = {  # long stages: the signal is sent on the stage's own line
    "tracing": "tracing the network",
    "folding": "folding constants",
    "engine-build": "building (CPU-only",
}
PAUSED = ("onnx-write", "caption", "plan-write")
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}


@pytest.mark.heavy  # the signal and full-disk cases: ~20 pid-export runs of a tiny network, minutes on a small CPU
@needs_rtx
@pytest.mark.parametrize("signame", sorted(SIGNALS))
@pytest.mark.parametrize("stage", [*TIMED, *PAUSED])
def test_signal_at_stage_keeps_the_previous_export(template, tmp_path, stage, signame):
    signum, code = SIGNALS[signame]
    out, before = place_old_export(template, tmp_path)
    if stage in TIMED:
        env, trigger, strict = clean_env(), TIMED[stage], False
    else:
        env = clean_env(PID_EXPORT_TEST_PAUSE_AT=stage, PID_EXPORT_TEST_RESUME=str(tmp_path / "never"))
        trigger, strict = f"test pause at {stage}", True
    outcome = run_and_stop(export_args(template, out), env, trigger, lambda p: p.send_signal(signum), strict)
    assert_unharmed(outcome, tmp_path, out, before, code, f"pid-export: interrupted by {signame}")
    if stage == "engine-build":
        assert not any(line.lstrip().startswith("built in") for line in outcome.lines), "the build ran to its end"


@pytest.mark.heavy
@needs_rtx
@pytest.mark.parametrize("stage", ["tracing", "folding", "onnx-write", "caption", "engine-build", "plan-write"])
def test_full_disk_at_stage_keeps_the_previous_export(template, tmp_path, tmpfs, stage):
    out, before = place_old_export(template, tmpfs)
    resume = tmp_path / "resume"  # outside the tmpfs: it must be creatable once the disk is full
    env = clean_env(PID_EXPORT_TEST_PAUSE_AT=stage, PID_EXPORT_TEST_RESUME=str(resume))

    def fill_then_resume(process) -> None:
        fill_disk(tmpfs)
        resume.touch()

    outcome = run_and_stop(export_args(template, out), env, f"test pause at {stage}", fill_then_resume, False)
    assert_unharmed(outcome, tmpfs, out, before, 1, "pid-export: error: cannot write the export")
    assert "No space left on device" in outcome.lines[-1]
    assert sorted(p.name for p in tmpfs.iterdir()) == ["export", "filler", "filler2"]


@pytest.mark.skip(reason="verify runs the engine, which needs a GPU it runs on (pid-export refuses --verify here)")
def test_signal_and_full_disk_during_verify():
    """On a GPU machine: the same as above with --verify, stopped at stage 'verify'."""


def foreign_dir(parent: Path) -> tuple[Path, dict[str, str]]:
    out = parent / "work"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work\n")
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return out, tree_hashes(out)


@pytest.mark.parametrize("kind", ["plain files", "not our metadata", "export plus a user file"])
def test_foreign_out_dir_is_refused_untouched(tmp_path, kind):
    out, _ = foreign_dir(tmp_path)
    if kind == "not our metadata":
        (out / "pid_export.json").write_text('{"name": "someone else\'s tool"}\n')
    elif kind == "export plus a user file":
        from pid_runtime.metadata import ModelMetadata

        for path in (out / "sub" / "data.csv", out / "sub"):
            path.unlink() if path.is_file() else path.rmdir()
        ModelMetadata(release=None, latent_channels=4, latent_down_factor=8, sr_factor=4, txt_embed_dim=40,
                      txt_max_length=12, precision="fp16").save(out / "pid_export.json")
    before = tree_hashes(out)
    (tmp_path / "net.json").write_text(json.dumps(golden_case(CASE)["network"]))
    for args in (["--network-config", str(tmp_path / "net.json"), "--checkpoint", str(golden_case(CASE)["pth"])],
                 ["--demo"]):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pid_export.cli", *args, "--out", str(out)], capture_output=True,
                              text=True, env=clean_env(), timeout=120)
        lines = (proc.stdout + proc.stderr).splitlines()
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert len(lines) == 1 and lines[0].startswith("pid-export: error: refusing to replace"), lines
        assert time.perf_counter() - start < 60  # refused before any work, not after an export
        assert tree_hashes(out) == before
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "net.json") == ["work"]


@pytest.mark.heavy
@needs_rtx
def test_demo_interrupted_in_its_engine_build_keeps_the_previous_demo(tmp_path):
    """pid-export --demo (built-in model) is one transaction too: ONNX, engine and demo.png."""
    out = tmp_path / "demo-builtin-fp32"
    args = [sys.executable, "-m", "pid_export.cli", "--demo", "--trt", "rtx", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, env=clean_env(), timeout=2 * RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"model.onnx", "engine.plan", "demo.png"} <= {p.name for p in out.iterdir()}
    before = tree_hashes(out)
    outcome = run_and_stop(args, clean_env(), TIMED["engine-build"], lambda p: p.send_signal(signal.SIGTERM), False)
    assert_unharmed(outcome, tmp_path, out, before, 143, "pid-export: interrupted by SIGTERM")
