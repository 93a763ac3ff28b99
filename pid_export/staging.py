"""Exports as transactions: staged beside `--out`, put in place by one rename at the end.

    with ExportTransaction(out_dir, log) as tx:   # refuses a foreign --out before any work
        ...write everything into tx.stage...
        tx.commit()                               # the only moment out_dir changes

The stage is a sibling of `out_dir` (same filesystem, so the final move is a rename)
named `.<out>.pid-export-staging-<host>-<pid>-<start>`; a replaced export is moved
aside as `.<out>.pid-export-old-<host>-<pid>-<start>` for the instant of the swap.
Until `commit()` the previous export is not touched; on any failure before it
(exception, full disk, SIGINT/SIGTERM) the stage is removed and the previous export
is byte-identical. If the swap itself fails, the previous export is renamed back.

An existing `out_dir` is replaced only when it is an export this tool wrote: its
pid_export.json parses as our metadata and every entry in it is a file name the
tool writes. Anything else is refused with one line and left alone. Stages and
set-aside exports of processes that no longer run (the name says which process on
which host, and when it started, so a reused pid is not mistaken for the owner) are
cleaned up by the next run into the same parent directory, with a note.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pid_runtime.metadata import EMPTY_CAPTION_NAME, ENGINE_METADATA, ENGINE_NAME, MODEL_METADATA, ONNX_NAME

from .interrupts import Interrupted

Log = Callable[[str], None]

STAGING = "pid-export-staging"
OLD = "pid-export-old"
KEPT_ACROSS_EXPORTS = ("timing.cache",)  # TensorRT's kernel timings stay valid for a re-export
# Every file name pid-export (and pid-run's engine cache) writes into an export directory.
TOOL_FILES = frozenset({
    ONNX_NAME, ONNX_NAME + ".data", MODEL_METADATA, ENGINE_NAME, ENGINE_METADATA, EMPTY_CAPTION_NAME,
    "rejected-" + ENGINE_NAME, "rejected-" + ENGINE_METADATA, "engine.runtime.cache",
    "demo.png", "demo_latents.npy",  # pid-export --demo: its image and latent (demo.DEMO_*_NAME)
    *KEPT_ACROSS_EXPORTS,
})
_OURS = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>{STAGING}|{OLD})-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-(?P<start>\d+)$")
# What earlier versions left behind: .<out>.partial-<pid> (ONNX stage), .<out>.old-<pid>, .<out>.fp8-<pid>.
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|fp8)-(?P<pid>\d+)$")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StagingError(RuntimeError):
    """The output directory cannot be used (one line)."""


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_ticks(pid)
    return start is None or now is None or now == start  # another start time: the pid was reused


def _owner_tag() -> str:
    return f"{_host_tag()}-{os.getpid()}-{_start_ticks(os.getpid()) or 0}"


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM wait (blocked, then delivered) until the block ends: renames stay paired."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def foreign_reason(out_dir: Path) -> str | None:
    """Why `out_dir` (existing) is not an export this tool may replace; None when it is one."""
    from pid_runtime.metadata import ModelMetadata

    if not out_dir.is_dir() or out_dir.is_symlink():
        return "it exists and is not a directory"
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return None  # an empty directory holds nothing to lose
    if MODEL_METADATA not in entries:
        return f"it is not an export made by pid-export (no {MODEL_METADATA})"
    try:
        ModelMetadata.load(out_dir / MODEL_METADATA)
    except Exception:  # any way of not being our metadata means the same here
        return f"it is not an export made by pid-export ({MODEL_METADATA} is not pid-export's)"
    others = [name for name in entries if name not in TOOL_FILES or not (out_dir / name).is_file()
              or (out_dir / name).is_symlink()]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return f"it holds {len(others)} entr{'y' if len(others) == 1 else 'ies'} pid-export did not write ({shown})"
    return None


def check_output_dir(out_dir: Path) -> None:
    """Refuse (StagingError, one line) an existing `out_dir` that is not a replaceable export."""
    if out_dir.exists() or out_dir.is_symlink():
        why = foreign_reason(out_dir)
        if why is not None:
            raise StagingError(f"refusing to replace {out_dir}: {why}; nothing in it was touched "
                               "(choose another --out, or move it away yourself)")


def remove_stale(out_dir: Path, log: Log) -> None:
    """Remove stages of `out_dir` left by dead processes; restore a set-aside export whose swap died."""
    parent = out_dir.parent
    if not parent.is_dir():
        return
    host = _host_tag()
    for entry in sorted(parent.iterdir()):
        match = _OURS.match(entry.name) or _LEGACY.match(entry.name)
        if match is None or match["name"] != out_dir.name or not entry.is_dir() or entry.is_symlink():
            continue
        groups = match.groupdict()
        if groups.get("host", host) != host:
            continue  # another machine's process: its liveness cannot be checked from here
        start = int(groups["start"]) if groups.get("start") else None
        if _alive(int(groups["pid"]), start):
            continue
        if groups["kind"] in (OLD, "old") and not out_dir.exists():
            # The process died between moving the old export aside and moving the new one in.
            entry.rename(out_dir)
            log(f"note: restored {out_dir} from {entry.name}, left by an interrupted run (pid {groups['pid']})")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        log(f"note: removed {entry}, left by an interrupted pid-export run (pid {groups['pid']})")


class ExportTransaction:
    """A staging directory for `out_dir`; `commit()` swaps it in, leaving without it removes it."""

    def __init__(self, out_dir: Path | str, log: Log = lambda message: None) -> None:
        self.out_dir = Path(out_dir)
        self.log = log
        tag = _owner_tag()
        self.stage = self.out_dir.parent / f".{self.out_dir.name}.{STAGING}-{tag}"
        self._old = self.out_dir.parent / f".{self.out_dir.name}.{OLD}-{tag}"
        self.committed = False

    def __enter__(self) -> "ExportTransaction":
        remove_stale(self.out_dir, self.log)  # may restore out_dir from a swap that died halfway
        check_output_dir(self.out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.stage, ignore_errors=True)  # our own pid and start time: a leftover of ours
        self.stage.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            with signals_deferred():  # a second Ctrl-C must not leave half a stage
                shutil.rmtree(self.stage, ignore_errors=True)
        if isinstance(exc, Interrupted) and not exc.outcome:
            exc.outcome = (f"the new export {self.out_dir} is complete" if self.committed else
                           f"{self.out_dir} is as it was" if self.out_dir.exists() else "nothing was written")

    def commit(self) -> Path:
        """Put the stage in place of `out_dir` (one rename; an old export is moved aside, then removed)."""
        with signals_deferred():
            check_output_dir(self.out_dir)  # still ours? (someone may have written there meanwhile)
            if self.out_dir.is_dir():
                for name in KEPT_ACROSS_EXPORTS:
                    if (self.out_dir / name).is_file() and not (self.stage / name).exists():
                        shutil.copy2(self.out_dir / name, self.stage / name)
                self.out_dir.rename(self._old)
                try:
                    self.stage.rename(self.out_dir)
                except BaseException:
                    self._old.rename(self.out_dir)
                    raise
                self.committed = True
                shutil.rmtree(self._old, ignore_errors=True)
            else:
                self.stage.rename(self.out_dir)
                self.committed = True
        return self.out_dir


__all__ = ["ExportTransaction", "KEPT_ACROSS_EXPORTS", "StagingError", "TOOL_FILES", "check_output_dir",
           "foreign_reason", "remove_stale", "signals_deferred"]


@contextmanager
def staged(out_dir: Path, log: Log, in_place: bool = False) -> Iterator[Path]:
    """The directory to write a complete export into: a stage that replaces `out_dir` when the
    block ends without an error (`ExportTransaction`), or, `in_place`, `out_dir` itself: an
    empty directory that the caller stages (pid-export's whole-run transaction)."""
    if in_place:
        yield out_dir
        return
    with ExportTransaction(out_dir, log) as transaction:
        yield transaction.stage
        transaction.commit()

