"""pid-batch end to end (the real CLI, local Ray, tiny golden export through ONNX Runtime):
8 good inputs and 1 corrupt one, a rerun, and a run interrupted by a real SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from exports import export_cases, export_root  # noqa: F401 (fixture)
from pid_runtime.batch import item_seed

CASE = "tiny_v1_16ch_sr4"
RUN_TIMEOUT_S = 300


def _script(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def _make_inputs(directory: Path) -> list[str]:
    directory.mkdir()
    gen = np.random.default_rng(0)
    names = [f"item{i}" for i in range(8)]
    for index, name in enumerate(names):
        np.save(directory / f"{name}.npy", gen.standard_normal((1, 16, 2, 2 + index % 2)).astype(np.float32))
        np.save(directory / f"{name}.caption.npy", gen.standard_normal((1, 5, 40)).astype(np.float32))
    (directory / "corrupt.npy").write_bytes(b"\x93NUMPY truncated")
    return names


def _batch(export: Path, inputs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_script("pid-batch", "pid_runtime.batch") + [str(export), str(inputs), str(out),
                          "--seed", "5", *extra], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def export(export_root):  # noqa: F811
    return export_cases([CASE])[CASE]


def test_eight_good_one_corrupt_then_rerun_writes_nothing(export, tmp_path):
    names = _make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    first = _batch(export, tmp_path / "in", out, "--actors", "2")
    assert first.returncode == 1, first.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{n}.png" for n in names)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {r["name"] for r in rows} == set(names) | {"corrupt"}
    bad = [r for r in rows if r["status"] != "ok"]
    assert [r["name"] for r in bad] == ["corrupt"] and "cannot read" in bad[0]["error"]
    assert all(r["seed"] == item_seed(5, r["name"]) for r in rows)
    assert not list(out.glob(".*")), "temporary files left behind"
    # An image equals pid-run of that input alone with the item's seed.
    subprocess.run(_script("pid-run", "pid_runtime.cli") + [str(export), str(tmp_path / "in" / "item3.npy"),
                   "--seed", str(item_seed(5, "item3")), "--caption-embeds", str(tmp_path / "in" / "item3.caption.npy"),
                   "--out", str(tmp_path / "ref.png")], check=True, capture_output=True, timeout=120)
    assert (tmp_path / "ref.png").read_bytes() == (out / "item3.png").read_bytes()

    before = _snapshot(out)
    again = _batch(export, tmp_path / "in", out)
    assert again.returncode == 1 and "8 already decoded, 1 to decode" in again.stderr
    assert _snapshot(out) == before, "the rerun rewrote something"


@pytest.mark.heavy  # three pid-batch runs (~2 min here)
def test_interrupted_run_resumes(export, tmp_path):
    names = _make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    command = _script("pid-batch", "pid_runtime.batch") + [str(export), str(tmp_path / "in"), str(out), "--seed", "5",
                                                          "--actors", "1", "--max-batch", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.png"))) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 130, proc.stderr.read()[-2000:]
    partial = sorted(p.name for p in out.glob("*.png"))
    assert 2 <= len(partial) < 8 and not list(out.glob(".item*")), partial
    resumed = _batch(export, tmp_path / "in", out, "--actors", "2")
    assert resumed.returncode == 1 and f"{len(partial)} already decoded" in resumed.stderr
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{n}.png" for n in names)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 9
