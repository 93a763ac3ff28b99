"""`pid-run` end to end: golden decodes through the CLI, and one clear line for each bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import CASES, export_cases, export_root, golden_exports, golden_tensors  # noqa: F401 (fixtures)
from PIL import Image
from safetensors.torch import save_file

from pid_runtime.cli import main
from pid_runtime.metadata import MODEL_METADATA
from pid_runtime.trt_library import library_status

CASE = "tiny_v1_16ch_sr4_b2"  # 16-ch latent [2,16,3,2] -> 2 x 96x64 px, text dim 40
REL_TOL = 1e-4


def tensorrt_installed() -> bool:
    """A real TensorRT or TensorRT-RTX (not just tensorrt-stubs' empty namespace package)."""
    return library_status()[0] is not None


def run(args: list[str | Path], capfd) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("pid-run: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def export_dir(export_root: Path) -> Path:  # noqa: F811
    return export_cases([CASE])[CASE]


@pytest.fixture
def io_dir(tmp_path: Path) -> Path:
    """Inputs of CASE (latents, captions) in a fresh directory, plus an empty out/ for outputs."""
    golden = golden_tensors(CASE)
    np.save(tmp_path / "lat.npy", golden["lq_latent"].numpy())
    np.save(tmp_path / "y.npy", golden["y"].numpy())
    (tmp_path / "out").mkdir()
    return tmp_path


def outputs(io_dir: Path) -> list[str]:
    return sorted(p.name for p in (io_dir / "out").iterdir())


def edited_export(export_dir: Path, where: Path, **changes) -> Path:
    """A copy of the export whose metadata says something else (release name, size range, scale)."""
    copy = where / "edited_export"
    shutil.copytree(export_dir, copy)
    meta = json.loads((copy / MODEL_METADATA).read_text())
    meta.update(changes)
    (copy / MODEL_METADATA).write_text(json.dumps(meta))
    return copy


# ---------------------------------------------------------------------------
# Golden decodes


@pytest.mark.parametrize("case", CASES)
def test_pid_run_reproduces_golden_sampled_image(case, golden_exports, tmp_path, capfd):  # noqa: F811
    golden = golden_tensors(case)
    np.save(tmp_path / "lat.npy", golden["lq_latent"].numpy())
    np.save(tmp_path / "y.npy", golden["y"].numpy())
    save_file({"noise": golden["sampler_noise"], "eps": golden["sampler_eps"]}, str(tmp_path / "n.safetensors"))
    sigma = ",".join(repr(float(s)) for s in golden["degrade_sigma"])
    out = tmp_path / "out.npy"
    code, stdout, err = run([golden_exports[case] / "model.onnx", tmp_path / "lat.npy",
                             "--caption-embeds", tmp_path / "y.npy", "--sigma", sigma,
                             "--noise", tmp_path / "n.safetensors", "--out", out], capfd)
    assert code == 0, err
    image, reference = np.load(out), golden["sampled_image"].numpy()
    assert image.dtype == np.float32 and image.shape == reference.shape
    assert rel_error(image, reference) < REL_TOL
    assert "step 4/4" in stdout and "total" in stdout


def test_default_caption_is_the_exports_empty_caption(export_dir, io_dir, capfd):
    export = edited_export(export_dir, io_dir)
    np.save(export / "empty_caption.npy", np.zeros((1, 12, 40), np.float32))
    code, stdout, err = run([export, io_dir / "lat.npy", "--steps", "1", "--out", io_dir / "out" / "img.png"], capfd)
    assert code == 0, err
    assert "unconditional caption" in stdout and "step 1/1" in stdout
    code, _, err = run([export, io_dir / "lat.npy", "--steps", "1", "--bit-depth", "16",
                        "--out", io_dir / "out" / "deep.png"], capfd)
    assert code == 0, err
    assert outputs(io_dir) == ["deep_0.png", "deep_1.png", "img_0.png", "img_1.png"]
    for i in range(2):  # Pillow reads the 16-bit file (reduced to 8 bits): the same picture
        with Image.open(io_dir / "out" / f"img_{i}.png") as eight, Image.open(io_dir / "out" / f"deep_{i}.png") as deep:
            assert eight.size == deep.size == (64, 96)
            diff = np.abs(np.asarray(eight, np.int16) - np.asarray(deep.convert("RGB"), np.int16))
            assert diff.max() <= 1


def test_model_and_latents_alone_write_a_png_beside_the_latents(export_dir, tmp_path, capfd):
    """`pid-run DIR/model.onnx latents.npy`, as users type it: the export's unconditional caption,
    seed 0, `latents.png` beside the latents; a second run never overwrites it."""
    export = edited_export(export_dir, tmp_path)
    golden = golden_tensors(CASE)
    np.save(export / "empty_caption.npy", golden["y"][:1].numpy())
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "latents.npy", golden["lq_latent"][:1].numpy())

    code, stdout, err = run([export / "model.onnx", data / "latents.npy"], capfd)
    assert code == 0, err
    assert sorted(p.name for p in data.iterdir()) == ["latents.npy", "latents.png"]
    assert f"wrote {data / 'latents.png'}" in stdout
    assert f"unconditional caption (empty-prompt embedding) {export / 'empty_caption.npy'}" in stdout
    first = (data / "latents.png").read_bytes()

    # The same decode spelled out (seed 0, the same caption) gives the same picture.
    np.save(tmp_path / "y.npy", golden["y"][:1].numpy())
    code, _, err = run([export / "model.onnx", data / "latents.npy", "--caption-embeds", tmp_path / "y.npy",
                        "--seed", "0", "--out", tmp_path / "explicit.png"], capfd)
    assert code == 0, err
    with Image.open(data / "latents.png") as auto, Image.open(tmp_path / "explicit.png") as explicit:
        assert np.array_equal(np.asarray(auto), np.asarray(explicit))

    code, stdout, err = run([export / "model.onnx", data / "latents.npy"], capfd)
    assert code == 0, err
    assert (data / "latents.png").read_bytes() == first
    assert (data / "latents-2.png").is_file() and f"wrote {data / 'latents-2.png'}" in stdout

    np.save(data / "pair.npy", golden["lq_latent"].numpy())  # batch 2: one file per item
    (data / "pair_1.png").write_bytes(b"taken")  # one item's name is taken: the whole batch moves on
    code, stdout, err = run([export / "model.onnx", data / "pair.npy"], capfd)
    assert code == 0, err
    assert (data / "pair_1.png").read_bytes() == b"taken"
    assert {p.name for p in data.glob("pair-2_*.png")} == {"pair-2_0.png", "pair-2_1.png"}
    assert not (data / "pair_0.png").exists()


# ---------------------------------------------------------------------------
# Bad input: one line, exit != 0, no output file


def test_latent_channels_not_matching_the_model(export_dir, io_dir, capfd):
    np.save(io_dir / "lat4.npy", np.zeros((2, 4, 3, 2), np.float32))
    code, _, err = run([export_dir, io_dir / "lat4.npy", "--caption-embeds", io_dir / "y.npy",
                        "--out", io_dir / "out" / "o.png"], capfd)
    assert_one_line_error(code, err, "4 channels", "16-channel")
    assert outputs(io_dir) == []


def test_output_size_outside_the_exports_range_names_the_variant(export_dir, io_dir, capfd):
    # What pid-export records for the flux/2k release (its backbone's variants from the registry).
    export = edited_export(export_dir, io_dir, release="PiD_res2k_sr4x_official_flux_distill_4step",
                           min_size=[1536, 1536], max_size=[2688, 2688], backbone="flux", variant="2k",
                           variant_sides={"2k": [1536, 2688], "2kto4k": [1536, 4096], "2kto4k-v1.5": [1536, 4096]})
    np.save(io_dir / "lat4k.npy", np.zeros((1, 16, 120, 120), np.float32))  # 3840x3840 px
    code, _, err = run([export, io_dir / "lat4k.npy", "--caption-embeds", io_dir / "y.npy",
                        "--out", io_dir / "out" / "o.png", "--tile", "off"], capfd)  # auto would tile it
    assert_one_line_error(code, err, "3840x3840", "1536x1536 to 2688x2688", "2k variant", "2kto4k")
    assert outputs(io_dir) == []


def test_output_size_not_a_multiple_of_16(export_dir, io_dir, capfd):
    export = edited_export(export_dir, io_dir, sr_factor=1)  # 8 px per latent cell
    np.save(io_dir / "odd.npy", np.zeros((1, 16, 3, 2), np.float32))  # -> 24x16 px
    code, _, err = run([export, io_dir / "odd.npy", "--caption-embeds", io_dir / "y.npy",
                        "--out", io_dir / "out" / "o.png"], capfd)
    assert_one_line_error(code, err, "24x16", "not a multiple of 16")
    assert outputs(io_dir) == []


@pytest.mark.parametrize("mismatch", ["captions", "sigma", "noise"])
def test_batch_mismatch(mismatch, export_dir, io_dir, capfd):
    args = [export_dir, io_dir / "lat.npy", "--caption-embeds", io_dir / "y.npy", "--out", io_dir / "out" / "o.npy"]
    if mismatch == "captions":
        np.save(io_dir / "y3.npy", np.zeros((3, 9, 40), np.float32))
        args[3] = io_dir / "y3.npy"
        expected = "caption embeddings have 3"
    elif mismatch == "sigma":
        args += ["--sigma", "0,0.1,0.2"]
        expected = "sigma values have 3"
    else:
        save_file({"noise": torch.zeros(1, 3, 96, 64), "eps": torch.zeros(3, 1, 3, 96, 64)},
                  str(io_dir / "n1.safetensors"))
        args += ["--noise", io_dir / "n1.safetensors"]
        expected = "noise is [1, 3, 96, 64]"
    code, _, err = run(args, capfd)
    assert_one_line_error(code, err, "batch mismatch", expected)
    assert outputs(io_dir) == []


@pytest.mark.parametrize("which", ["latents", "caption embeddings", "noise"])
def test_nan_or_inf_in_inputs(which, export_dir, io_dir, capfd):
    args = [export_dir, io_dir / "lat.npy", "--caption-embeds", io_dir / "y.npy", "--out", io_dir / "out" / "o.npy"]
    if which == "latents":
        latents = np.load(io_dir / "lat.npy")
        latents[1, 3, 0, 0] = np.nan
        np.save(io_dir / "lat.npy", latents)
    elif which == "caption embeddings":
        caption = np.load(io_dir / "y.npy")
        caption[0, 2, 5] = np.inf
        np.save(io_dir / "y.npy", caption)
    else:
        eps = torch.zeros(3, 2, 3, 96, 64)
        eps[2, 1, 0, 5, 5] = float("-inf")
        save_file({"noise": torch.zeros(2, 3, 96, 64), "eps": eps}, str(io_dir / "n.safetensors"))
        args += ["--noise", io_dir / "n.safetensors"]
        which = "eps"
    code, _, err = run(args, capfd)
    assert_one_line_error(code, err, which, "NaN or Inf")
    assert outputs(io_dir) == []


@pytest.mark.parametrize("sigma", ["1.5", "-0.1", "0,2", "nan"])
def test_sigma_outside_0_1(sigma, export_dir, io_dir, capfd):
    code, _, err = run([export_dir, io_dir / "lat.npy", "--caption-embeds", io_dir / "y.npy", "--sigma", sigma,
                        "--out", io_dir / "out" / "o.npy"], capfd)
    assert_one_line_error(code, err, "sigma must be within [0, 1]")
    assert outputs(io_dir) == []


def test_missing_caption_embedding_says_how_to_give_one(export_dir, io_dir, capfd):
    code, _, err = run([export_dir, io_dir / "lat.npy", "--out", io_dir / "out" / "o.npy"], capfd)
    assert_one_line_error(code, err, "no caption given", "--caption-embeds FILE", "--prompt TEXT",
                          "empty_caption.npy")
    assert outputs(io_dir) == []


def test_wrong_text_dim(export_dir, io_dir, capfd):
    np.save(io_dir / "y32.npy", np.zeros((1, 9, 32), np.float32))
    code, _, err = run([export_dir, io_dir / "lat.npy", "--caption-embeds", io_dir / "y32.npy",
                        "--out", io_dir / "out" / "o.npy"], capfd)
    assert_one_line_error(code, err, "dim 32", "takes 40")
    assert outputs(io_dir) == []


def test_engine_file_that_is_not_a_plan(export_dir, io_dir, capfd):
    (io_dir / "empty.plan").write_bytes(b"")
    code, _, err = run([io_dir / "empty.plan", io_dir / "lat.npy", "--out", io_dir / "out" / "o.png"], capfd)
    assert_one_line_error(code, err, "empty, not a TensorRT engine")
    shutil.copy(io_dir / "lat.npy", io_dir / "latents.plan")
    code, _, err = run([io_dir / "latents.plan", io_dir / "lat.npy", "--out", io_dir / "out" / "o.png"], capfd)
    assert_one_line_error(code, err, "NumPy .npy file, not a TensorRT engine")
    shutil.copy(export_dir / "model.onnx", io_dir / "renamed.engine")
    code, _, err = run([io_dir / "renamed.engine", io_dir / "lat.npy", "--out", io_dir / "out" / "o.png"], capfd)
    assert_one_line_error(code, err, "an ONNX model", "not a TensorRT engine")
    (io_dir / "model.bin").write_bytes(b"\x00" * 16)
    code, _, err = run([io_dir / "model.bin", io_dir / "lat.npy", "--out", io_dir / "out" / "o.png"], capfd)
    assert_one_line_error(code, err, "cannot tell what kind of model", ".plan/.engine", ".onnx")
    assert outputs(io_dir) == []


@pytest.mark.skipif(not tensorrt_installed(), reason="no TensorRT library is installed: a plan cannot be deserialized")
def test_garbage_plan_is_refused_by_tensorrt(export_dir, io_dir, capfd):
    plan = io_dir / "engine.plan"
    plan.write_bytes(b"\x00" * 4096)  # nothing probe_plan recognises: TensorRT must refuse it
    shutil.copy(export_dir / MODEL_METADATA, io_dir / MODEL_METADATA)
    code, _, err = run([plan, io_dir / "lat.npy", "--caption-embeds", io_dir / "y.npy",
                        "--out", io_dir / "out" / "o.png"], capfd)
    assert_one_line_error(code, err)
    assert outputs(io_dir) == []


def pid_run_command() -> list[str]:
    script = Path(sys.executable).parent / "pid-run"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pid_runtime.cli"]


@pytest.mark.skipif(tensorrt_installed() and torch.cuda.is_available(),
                    reason="checks the behaviour without TensorRT or without a GPU")
@pytest.mark.parametrize("files_exist", [True, False])
def test_plan_without_tensorrt_fails_with_one_line(files_exist, tmp_path):
    """The installed `pid-run` where no engine can run (no TensorRT library, or TensorRT-RTX but
    no GPU): one line, no traceback, no file."""
    if files_exist:
        (tmp_path / "some.plan").write_bytes(b"\x00" * 256)
        np.save(tmp_path / "latents.npy", np.zeros((1, 16, 3, 2), np.float32))
    proc = subprocess.run(pid_run_command() + ["some.plan", "latents.npy", "--out", "o.png"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "some.plan")
    if files_exist:
        expected = "runs engines on a CUDA GPU and none is visible" if tensorrt_installed() else \
            "no TensorRT library is installed"
        assert expected in proc.stderr
    assert not (tmp_path / "o.png").exists()


def test_import_pid_runtime_needs_neither_tensorrt_nor_pid_export():
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorrt', 'pid_export'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pid_runtime, pid_runtime.cli, pid_runtime.decode, pid_runtime.io, pid_runtime.backends\n"
        "import pid_runtime.backends.onnxruntime, pid_runtime.backends.tensorrt\n"
        "assert not any(m.split('.')[0] in ('tensorrt', 'pid_export') for m in sys.modules)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("problem", ["missing latents", "corrupt latents", "unknown latents format",
                                     "missing caption file", "missing model", "noise without eps",
                                     "unwritable output", "model without metadata"])
def test_unreadable_or_missing_files(problem, export_dir, io_dir, capfd):
    model, latents, caption = export_dir, io_dir / "lat.npy", io_dir / "y.npy"
    out = io_dir / "out" / "o.npy"
    extra: list = []
    if problem == "missing latents":
        latents, expected = io_dir / "nope.npy", "does not exist"
    elif problem == "corrupt latents":
        latents = io_dir / "bad.npy"
        latents.write_bytes(b"this is not numpy")
        expected = "cannot read latents file"
    elif problem == "unknown latents format":
        latents = io_dir / "lat.pt"
        latents.write_bytes(b"\x00")
        expected = "must end in .npy, .npz, .safetensors"
    elif problem == "missing caption file":
        caption, expected = io_dir / "nope.npy", "caption embedding file"
    elif problem == "missing model":
        model, expected = io_dir / "nope.onnx", "does not exist"
    elif problem == "noise without eps":
        save_file({"noise": torch.zeros(2, 3, 96, 64)}, str(io_dir / "n.safetensors"))
        extra, expected = ["--noise", io_dir / "n.safetensors"], "no array 'eps'"
    elif problem == "unwritable output":
        out, expected = io_dir / "no_such_dir" / "o.npy", "does not exist"
    else:
        lonely = io_dir / "lonely"
        lonely.mkdir()
        shutil.copy(export_dir / "model.onnx", lonely / "model.onnx")
        model, expected = lonely / "model.onnx", "no pid_export.json beside it"
    code, _, err = run([model, latents, "--caption-embeds", caption, "--out", out, *extra], capfd)
    assert_one_line_error(code, err, expected)
    assert outputs(io_dir) == []
    assert not (io_dir / "no_such_dir").exists()


@pytest.mark.parametrize("args, expected", [
    (["--steps", "5"], "'--steps'"),
    (["--seeed", "1"], "No such option"),
    (["--out", "o.jpg"], "must end in .png or .npy"),
    (["--bit-depth", "16", "--out", "o.npy"], ".png output only"),
    (["--batch-size", "0"], "'--batch-size'"),
    (["--device", "tpu"], "unknown device"),
])
def test_usage_errors_are_one_line(args, expected, export_dir, io_dir, capfd, monkeypatch):
    base = [export_dir, io_dir / "lat.npy", "--caption-embeds", io_dir / "y.npy"]
    if "--out" not in args:
        base += ["--out", io_dir / "out" / "o.npy"]
    monkeypatch.chdir(io_dir / "out")  # relative --out names land in out/
    code, _, err = run(base + args, capfd)
    assert_one_line_error(code, err, expected)
    assert outputs(io_dir) == []
