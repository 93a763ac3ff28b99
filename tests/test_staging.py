"""The export transaction (pid_export/staging.py) on real directories: refusal, swap, cleanup.

Fast, in-process checks of what the fault-injection harness (test_export_faults.py)
shows end to end with the CLI: a foreign directory is never touched, an exception
inside the transaction leaves the old export byte-identical, a failed final swap puts
the old export back, and leftovers of dead processes are cleaned up (only those).
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from conftest import golden_net
from pid_export.staging import (OLD, STAGING, ExportTransaction, StagingError, _host_tag, _start_ticks,
                                check_output_dir, remove_stale)
from pid_runtime.metadata import ModelMetadata


def hashes(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def make_export(directory, payload: bytes = b"old weights", timing: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    ModelMetadata(release=None, latent_channels=4, latent_down_factor=8, sr_factor=4, txt_embed_dim=40,
                  txt_max_length=12, precision="fp16").save(directory / "pid_export.json")
    (directory / "model.onnx").write_bytes(payload)
    if timing:
        (directory / "timing.cache").write_bytes(b"timings")
    return directory


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_exception_inside_leaves_the_old_export_and_no_stage(tmp_path):
    out = make_export(tmp_path / "export")
    before = hashes(out)
    with pytest.raises(RuntimeError, match="boom"):
        with ExportTransaction(out) as transaction:
            (transaction.stage / "model.onnx").write_bytes(b"half a new export")
            raise RuntimeError("boom")
    assert hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_commit_replaces_whole_and_keeps_the_timing_cache(tmp_path):
    out = make_export(tmp_path / "export")
    (out / "engine.plan").write_bytes(b"old plan")
    with ExportTransaction(out) as transaction:
        make_export(transaction.stage, b"new weights", timing=False)
        transaction.commit()
    assert (out / "model.onnx").read_bytes() == b"new weights"
    assert not (out / "engine.plan").exists()  # replaced whole: no old plan beside new weights
    assert (out / "timing.cache").read_bytes() == b"timings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_final_swap_restores_the_old_export(tmp_path):
    out = make_export(tmp_path / "export")
    before = hashes(out)
    with pytest.raises(OSError):
        with ExportTransaction(out) as transaction:
            (transaction.stage / "model.onnx").write_bytes(b"new")
            # The stage vanishes (a real failure of the rename that would put it in place).
            for path in transaction.stage.iterdir():
                path.unlink()
            transaction.stage.rmdir()
            transaction.commit()
    assert hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("content", ["user file", "foreign metadata", "export with a user file", "subdirectory"])
def test_foreign_directories_are_refused(tmp_path, content):
    out = tmp_path / "work"
    if content == "user file":
        out.mkdir()
        (out / "thesis.txt").write_text("mine")
    elif content == "foreign metadata":
        out.mkdir()
        (out / "pid_export.json").write_text("[1, 2, 3]")
    elif content == "export with a user file":
        make_export(out)
        (out / "notes.txt").write_text("mine")
    else:
        make_export(out)
        (out / "engine.plan").mkdir()
        (out / "engine.plan" / "data").write_text("mine")
    before = hashes(out)
    with pytest.raises(StagingError, match="refusing to replace"):
        with ExportTransaction(out):
            pass
    assert hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_empty_directory_and_missing_directory_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    check_output_dir(tmp_path / "missing")


def test_export_onnx_refuses_a_foreign_directory_before_tracing(tmp_path):
    """The library call too (it used to rename and delete any directory at out_dir)."""
    from pid_export.onnx_export import export_onnx

    out = tmp_path / "work"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "data.csv").write_text("a,b\n")
    before = hashes(out)
    with pytest.raises(StagingError):
        export_onnx(golden_net("tiny_v1_4ch_sdxl"), out, "fp32")
    assert hashes(out) == before


def test_stale_leftovers_of_dead_processes_only_are_removed(tmp_path):
    out = make_export(tmp_path / "export")
    host, me, my_start = _host_tag(), os.getpid(), _start_ticks(os.getpid())
    dead = dead_pid()
    names = {
        "dead": f".export.{STAGING}-{host}-{dead}-123",
        "reused pid": f".export.{STAGING}-{host}-{me}-{(my_start or 0) + 1}",
        "alive": f".export.{STAGING}-{host}-{me}-{my_start}",
        "other host": f".export.{STAGING}-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}-123",
        "legacy partial": f".export.partial-{dead}",
        "other export": f".other.partial-{dead}",
        "user's": ".export.partial-notes",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x")
    notes: list[str] = []
    remove_stale(out, notes.append)
    left = {label for label, name in names.items() if (tmp_path / name).exists()}
    assert left == {"alive", "other host", "other export", "user's"}
    assert len(notes) == 3 and all("removed" in note for note in notes)


def test_set_aside_export_of_a_dead_swap_is_restored(tmp_path):
    """A process killed (SIGKILL) between its two renames left only the set-aside old export."""
    aside = make_export(tmp_path / f".export.{OLD}-{_host_tag()}-{dead_pid()}-5")
    before = hashes(aside)
    notes: list[str] = []
    with ExportTransaction(tmp_path / "export", notes.append):
        pass
    assert hashes(tmp_path / "export") == before
    assert len(notes) == 1 and "restored" in notes[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
