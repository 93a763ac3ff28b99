"""pid-run under hostile conditions (issue 19, runtime side; issue 22 item 5): real processes, real signals.

- concurrent runs with the default name each get their own complete image;
- SIGINT / SIGTERM mid-decode: one line, exit 130 / 143, no placeholder or temp file left;
- every input check fires before the model is opened (the model file is corrupt, so
  reaching the open would give a different error), and before any large array is read
  (a latent whose header says 1x16x5000x5000: peak RSS of the process stays small).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from exports import export_cases, export_root, golden_tensors  # noqa: F401 (fixtures)
from PIL import Image

from pid_runtime.metadata import MODEL_METADATA, ONNX_NAME

CASE = "tiny_v1_16ch_sr4_b2"  # 16-ch latents, text dim 40, txt_max_length 12, 32 px per latent cell
PID_RUN = [sys.executable, "-m", "pid_runtime.cli"]
RUN_TIMEOUT = 180  # seconds; every process here ends long before on an idle machine
MODEL_OPENED = "model "  # the line pid-run prints once the model is open


@pytest.fixture(scope="module")
def export_dir(export_root: Path) -> Path:  # noqa: F811
    return export_cases([CASE])[CASE]


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """One item of CASE's latents and caption in a fresh directory."""
    golden = golden_tensors(CASE)
    np.save(tmp_path / "lat.npy", golden["lq_latent"][:1].numpy())
    np.save(tmp_path / "y.npy", golden["y"][:1].numpy())
    return tmp_path


def pid_run(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(PID_RUN + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=RUN_TIMEOUT, env=env)


def one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    assert lines[0].startswith("pid-run: error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def leftovers(directory: Path) -> list[str]:
    """Hidden temp files (`.NAME.png.XXXX.png`) and empty placeholders."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(".") or (p.suffix in (".png", ".npy") and p.stat().st_size == 0))


# ---------------------------------------------------------------------------
# Outputs: claimed atomically, never lost


def test_four_concurrent_runs_with_the_default_name_get_four_complete_images(export_dir, inputs):
    procs = [subprocess.Popen(PID_RUN + [str(export_dir), str(inputs / "lat.npy"), "--caption-embeds",
                                         str(inputs / "y.npy"), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [proc.communicate(timeout=RUN_TIMEOUT) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, results
    written = sorted(line.split("wrote ", 1)[1] for out, _ in results for line in out.splitlines()
                     if line.startswith("wrote "))
    expected = sorted(str(inputs / name) for name in ("lat.png", "lat-2.png", "lat-3.png", "lat-4.png"))
    assert written == expected  # four distinct names, each reported by exactly one run
    pixels = []
    for name in expected:
        with Image.open(name) as image:
            image.load()  # a truncated PNG fails here
            pixels.append(np.asarray(image))
    assert all(p.shape == pixels[0].shape and (p == pixels[0]).all() for p in pixels)  # same seed, same image
    assert leftovers(inputs) == []


def test_an_existing_image_is_kept_and_the_next_free_name_used(export_dir, inputs):
    (inputs / "lat.png").write_bytes(b"the user's own file")
    proc = pid_run(export_dir, inputs / "lat.npy", "--caption-embeds", inputs / "y.npy", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (inputs / "lat.png").read_bytes() == b"the user's own file"
    assert f"wrote {inputs / 'lat-2.png'}" in proc.stdout


def _signal_mid_decode(export_dir: Path, inputs: Path, signum: int) -> subprocess.CompletedProcess:
    """Start a decode big enough to take a while, send `signum` once its first step is reported."""
    np.save(inputs / "big.npy", np.random.default_rng(0).standard_normal((1, 16, 24, 24), np.float32))
    proc = subprocess.Popen(PID_RUN + [str(export_dir), str(inputs / "big.npy"), "--caption-embeds",
                                       str(inputs / "y.npy"), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + RUN_TIMEOUT
    assert proc.stdout is not None
    for line in proc.stdout:  # one line per step as it finishes
        seen.append(line)
        if "step 1/" in line or time.monotonic() > deadline:
            break
    assert (inputs / "big.png").exists(), f"the output name is not claimed during the decode: {seen}"
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    took = time.monotonic() - sent
    assert took < 20, f"pid-run took {took:.1f} s to end after the signal"
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_decode_ends_the_run_cleanly(signum, code, word, export_dir, inputs):
    (inputs / "keep.png").write_bytes(b"unrelated")
    proc = _signal_mid_decode(export_dir, inputs, signum)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    one_error_line(proc, word)
    assert "wrote" not in proc.stdout
    assert not (inputs / "big.png").exists()  # its own placeholder removed
    assert leftovers(inputs) == []
    assert (inputs / "keep.png").read_bytes() == b"unrelated"


def test_output_location_problems_are_found_before_the_model_opens(export_dir, inputs, tmp_path):
    (inputs / "adir.png").mkdir()
    proc = pid_run(export_dir, inputs / "lat.npy", "--caption-embeds", inputs / "y.npy", "--out", inputs / "adir.png")
    one_error_line(proc, str(inputs / "adir.png"), "is a directory")
    assert MODEL_OPENED not in proc.stdout
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        proc = pid_run(export_dir, inputs / "lat.npy", "--caption-embeds", inputs / "y.npy",
                       "--out", read_only / "o.png")
        one_error_line(proc, str(read_only / "o.png"), "not writable")
        assert MODEL_OPENED not in proc.stdout
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


# ---------------------------------------------------------------------------
# Every input check before the model is opened


@pytest.fixture(scope="module")
def corrupt_export(export_dir: Path, tmp_path_factory) -> Path:
    """The export with a model.onnx that ONNX Runtime cannot load: reaching the open fails differently."""
    copy = tmp_path_factory.mktemp("corrupt") / "export"
    shutil.copytree(export_dir, copy)
    (copy / ONNX_NAME).write_bytes(b"not an onnx model" * 100)
    (copy / (ONNX_NAME + ".data")).unlink(missing_ok=True)
    return copy


def _npy_header_only(path: Path, shape: tuple[int, ...]) -> None:
    """A .npy whose header says `shape` (float32) and whose data is a hole: sparse, nothing on disk."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        handle.truncate(handle.tell() + int(np.prod(shape)) * 4)


def _bad_inputs(inputs: Path) -> dict[str, tuple[list, str]]:
    """case -> (extra arguments / replaced inputs, fragment of the expected error line)."""
    np.save(inputs / "zero.npy", np.zeros((1, 16, 0, 2), np.float32))
    np.save(inputs / "lat4.npy", np.zeros((1, 4, 3, 2), np.float32))
    np.save(inputs / "int.npy", np.zeros((1, 16, 3, 2), np.int64))
    np.save(inputs / "y32.npy", np.zeros((1, 9, 32), np.float32))
    np.save(inputs / "y3.npy", np.zeros((3, 9, 40), np.float32))
    nan = np.load(inputs / "lat.npy")
    nan[0, 0, 0, 0] = np.nan
    np.save(inputs / "nan.npy", nan)
    _npy_header_only(inputs / "huge.npy", (1, 16, 5000, 5000))
    (inputs / "out_dir").mkdir()
    (inputs / "dir.png").mkdir()
    lat, y = inputs / "lat.npy", inputs / "y.npy"
    return {
        "missing latents": ([inputs / "nope.npy", "--caption-embeds", y], "does not exist"),
        "zero-height latent": ([inputs / "zero.npy", "--caption-embeds", y], "at least 1"),
        "huge latent header": ([inputs / "huge.npy", "--caption-embeds", y], "at most 1024 per side"),
        "wrong channels": ([inputs / "lat4.npy", "--caption-embeds", y], "4 channels"),
        "integer latents": ([inputs / "int.npy", "--caption-embeds", y], "int64"),
        "NaN latents": ([inputs / "nan.npy", "--caption-embeds", y], "NaN or Inf"),
        "size not a multiple of 16": ([lat, "--caption-embeds", y, "--size", "250x384"], "not a multiple of 16"),
        "size beyond the graph": ([lat, "--caption-embeds", y, "--size", "32768x32768"], "beyond what this export"),
        "seed beyond 64 bits": ([lat, "--caption-embeds", y, "--seed", str(2 ** 64)], "out of range"),
        "sigma out of range": ([lat, "--caption-embeds", y, "--sigma", "2"], "sigma must be within"),
        "steps out of range": ([lat, "--caption-embeds", y, "--steps", "9"], "'--steps'"),
        "caption dim": ([lat, "--caption-embeds", inputs / "y32.npy"], "dim 32"),
        "caption batch": ([lat, "--caption-embeds", inputs / "y3.npy"], "caption embeddings have 3"),
        "missing caption file": ([lat, "--caption-embeds", inputs / "nope.npy"], "does not exist"),
        "missing noise": ([lat, "--caption-embeds", y, "--noise", inputs / "nope.safetensors"], "does not exist"),
        "out is a directory": ([lat, "--caption-embeds", y, "--out", inputs / "out_dir"], "must end in"),
        "out is a directory named .png": ([lat, "--caption-embeds", y, "--out", inputs / "dir.png"], "is a directory"),
        "out dir missing": ([lat, "--caption-embeds", y, "--out", inputs / "no" / "o.png"], "does not exist"),
    }


def test_the_corrupt_model_is_only_found_when_opened(corrupt_export, inputs):
    """The control: with good inputs the same command does reach the open and fails there."""
    proc = pid_run(corrupt_export, inputs / "lat.npy", "--caption-embeds", inputs / "y.npy", "--device", "cpu")
    line = one_error_line(proc)
    assert "onnx" in line.lower() or "model" in line.lower(), line
    assert leftovers(inputs) == [] and not (inputs / "lat.png").exists()


BAD_INPUT_CASES = ["missing latents", "zero-height latent", "huge latent header", "wrong channels",
                   "integer latents", "NaN latents", "size not a multiple of 16", "size beyond the graph",
                   "seed beyond 64 bits", "sigma out of range", "steps out of range", "caption dim", "caption batch",
                   "missing caption file", "missing noise", "out is a directory", "out is a directory named .png",
                   "out dir missing"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_every_input_check_fires_before_the_model_is_opened(case, corrupt_export, inputs):
    args, expected = _bad_inputs(inputs)[case]
    before = sorted(p.name for p in inputs.iterdir())
    proc = pid_run(corrupt_export, *args, "--device", "cpu")
    one_error_line(proc, expected)
    assert MODEL_OPENED not in proc.stdout and "decoding" not in proc.stdout
    assert sorted(p.name for p in inputs.iterdir()) == before  # no output, placeholder or temp file


# ---------------------------------------------------------------------------
# Sizes before allocation: peak RSS of the refused process


def _peak_rss_mib(args: list) -> tuple[subprocess.CompletedProcess, float]:
    """Run pid-run in a wrapper process and return its result and the pid-run process's peak RSS (MiB)."""
    code = ("import json, resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps([p.returncode, p.stdout, p.stderr, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")
    wrapper = subprocess.run([sys.executable, "-c", code, *PID_RUN, *[str(a) for a in args]],
                             capture_output=True, text=True, timeout=RUN_TIMEOUT, check=True)
    rc, out, err, max_rss_kib = json.loads(wrapper.stdout)
    return subprocess.CompletedProcess(args, rc, out, err), max_rss_kib / 1024


def _safetensors_header_only(path: Path, shape: tuple[int, ...]) -> None:
    """A .safetensors file whose JSON header says a float32 `shape` and whose data is a sparse hole."""
    size = int(np.prod(shape)) * 4
    header = json.dumps({"lq_latent": {"dtype": "F32", "shape": list(shape), "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(handle.tell() + size)


@pytest.mark.parametrize("kind", ["npy header", "safetensors header", "--size 32768x32768"])
def test_huge_requests_are_refused_before_any_allocation(kind, export_dir, inputs):
    if kind == "npy header":
        latents, extra = inputs / "huge.npy", []
        _npy_header_only(latents, (1, 16, 5000, 5000))  # 1.6 GB if read
    elif kind == "safetensors header":
        latents, extra = inputs / "huge.safetensors", []
        _safetensors_header_only(latents, (1, 16, 5000, 5000))
    else:
        latents, extra = inputs / "lat.npy", ["--size", "32768x32768"]
    proc, peak = _peak_rss_mib([export_dir, latents, "--caption-embeds", inputs / "y.npy", "--device", "cpu", *extra])
    one_error_line(proc, "5000x5000" if "header" in kind else "32768x32768")
    assert MODEL_OPENED not in proc.stdout
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"
    assert leftovers(inputs) == []


# ---------------------------------------------------------------------------
# Edge inputs that decode


def test_captions_longer_than_the_model_reads_get_a_note(export_dir, inputs):
    long_caption = np.random.default_rng(1).standard_normal((1, 20, 40)).astype(np.float32)
    np.save(inputs / "long.npy", long_caption)
    meta = json.loads((export_dir / MODEL_METADATA).read_text())
    proc = pid_run(export_dir, inputs / "lat.npy", "--caption-embeds", inputs / "long.npy", "--device", "cpu",
                   "--out", inputs / "o.npy")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note: caption")]
    assert len(notes) == 1, proc.stdout
    assert f"20 tokens" in notes[0] and f"first {meta['txt_max_length']}" in notes[0]
    assert f"last {20 - meta['txt_max_length']} are cut" in notes[0]
    # and the cut is what the model reads: the same decode as with the first tokens only
    np.save(inputs / "cut.npy", long_caption[:, : meta["txt_max_length"]])
    proc = pid_run(export_dir, inputs / "lat.npy", "--caption-embeds", inputs / "cut.npy", "--device", "cpu",
                   "--out", inputs / "o2.npy")
    assert proc.returncode == 0 and "note:" not in proc.stdout
    assert np.array_equal(np.load(inputs / "o.npy"), np.load(inputs / "o2.npy"))


@pytest.mark.parametrize("seed", [str(2 ** 64), str(-(2 ** 63) - 1)])
def test_seed_beyond_64_bits_is_one_line(seed, export_dir, inputs):
    proc = pid_run(export_dir, inputs / "lat.npy", "--caption-embeds", inputs / "y.npy", "--seed", seed)
    one_error_line(proc, "out of range", seed)
    assert not (inputs / "lat.png").exists()


def test_metadata_with_a_wrong_type_is_one_line_naming_field_and_file(export_dir, inputs, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(export_dir, copy)
    meta = json.loads((copy / MODEL_METADATA).read_text())
    meta["latent_channels"] = "16"  # was: "latents have 16 channels but this model takes 16-channel latents"
    (copy / MODEL_METADATA).write_text(json.dumps(meta))
    proc = pid_run(copy, inputs / "lat.npy", "--caption-embeds", inputs / "y.npy")
    one_error_line(proc, "'latent_channels'", str(copy / MODEL_METADATA), "positive integer")
    assert not (inputs / "lat.png").exists()
