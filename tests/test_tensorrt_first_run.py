"""What would break on the first GPU run (issue 20, items 1-6 and 8), tested where the
libraries allow: TensorRT-RTX builds real plans on this CPU (it cannot run them), ONNX
Runtime runs everything on the CPU. What needs a GPU that runs the engine is marked
`tensorrt` and skips with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import GOLDEN, golden_tensors, rel_err
from exports import export_cases, export_root  # noqa: F401 (fixture)
from pid_export import PidConfig
from pid_export.engine import EngineProfile, build_engine, profile_shapes, tensorrt_status, why_engines_cannot_run_here
from pid_runtime.backends import preflight, resolve_model_path
from pid_runtime.backends.base import BackendError, OutOfDeviceMemory
from pid_runtime.backends.onnxruntime import OnnxRuntimeBackend, has_low_precision
from pid_runtime.backends.tensorrt import out_of_memory_line, why_engine_cannot_run
from pid_runtime.metadata import ModelMetadata
from pid_runtime.trt_library import problem_of, select_library

CASE = "tiny_v1pt5_16ch"  # caption length 12 x 40, 32 px per latent cell, golden x 96x64
RTX_MISSING = problem_of("rtx")
needs_rtx = pytest.mark.skipif(RTX_MISSING is not None, reason=f"needs TensorRT-RTX: {RTX_MISSING}")


def _engines_run_here() -> str | None:
    usable, line = tensorrt_status()
    return line if not usable else why_engines_cannot_run_here(select_library())


ENGINE_GPU_MISSING = _engines_run_here()
needs_engine_gpu = pytest.mark.skipif(ENGINE_GPU_MISSING is not None,
                                      reason=f"needs a GPU that runs engines: {ENGINE_GPU_MISSING}")


def _profile() -> EngineProfile:
    cfg = PidConfig.from_dict(json.loads((GOLDEN / f"{CASE}.json").read_text())["network"])
    return EngineProfile.for_config(cfg, (32, 32), (64, 96), (128, 128), max_batch=2)


@pytest.fixture(scope="module")
def rtx_export(export_root, tmp_path_factory):  # noqa: F811
    """The golden case's fp32 export with a TensorRT-RTX plan built here, CPU-only (~20 s)."""
    if RTX_MISSING is not None:
        pytest.skip(f"needs TensorRT-RTX: {RTX_MISSING}")
    out = tmp_path_factory.mktemp("rtx") / "export"
    shutil.copytree(export_cases([CASE], export_root)[CASE], out)
    build_engine(out / "model.onnx", out, _profile(), library="rtx", log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def engine_export(export_root, tmp_path_factory):  # noqa: F811
    """The golden case's fp32 export with a plan of the library that runs engines here."""
    if ENGINE_GPU_MISSING is not None:
        pytest.skip(f"needs a GPU that runs engines: {ENGINE_GPU_MISSING}")
    out = tmp_path_factory.mktemp("engine") / "export"
    shutil.copytree(export_cases([CASE], export_root)[CASE], out)
    build_engine(out / "model.onnx", out, _profile(), workspace_gb=2, log=lambda m: None)
    return out


def _bind_golden(backend, g: dict, height: int = 96, width: int = 64) -> None:
    dev = backend.device
    backend.bind(g["y"].to(dev), g["lq_latent"].to(dev), g["degrade_sigma"].to(dev), height, width)


# ---------------------------------------------------------------------------
# 1. Captions of any length up to the maximum


def test_profiles_cover_captions_from_one_token_tuned_at_the_full_length():
    """The runtime's caption encoder pads to txt_max_length: that is the opt; shorter
    --caption-embeds fit down to one token. Static exports keep one length (None)."""
    y_low, y_opt, y_high = profile_shapes(_profile())["y"]
    assert (y_low[1], y_opt[1], y_high[1]) == (1, 12, 12)
    meta = ModelMetadata(release=None, latent_channels=16, latent_down_factor=8, sr_factor=4, txt_embed_dim=40,
                         txt_max_length=12, precision="fp32", min_size=[32, 32], max_size=[128, 128])
    assert profile_shapes(EngineProfile.for_metadata(meta))["y"] == ((1, 1, 40), (1, 12, 40), (1, 12, 40))
    fixed = dataclasses.replace(EngineProfile.for_metadata(meta), min_text_length=None)
    assert profile_shapes(fixed)["y"][0] == (1, 12, 40)


@needs_rtx
def test_a_plan_built_here_accepts_captions_of_one_to_max_tokens(rtx_export):
    """Read back from the sidecar, which records the builder's own optimization profile
    (`IOptimizationProfile.get_shape` after `set_shape`), not what we asked for."""
    sidecar = json.loads((rtx_export / "engine.json").read_text())
    (profile,) = sidecar["profiles"]
    assert profile["as_built"]["y"] == [[1, 1, 40], [1, 12, 40], [2, 12, 40]]
    assert profile["as_built"]["x"] == [[1, 3, 32, 32], [1, 3, 64, 96], [2, 3, 128, 128]]


# ---------------------------------------------------------------------------
# 2. Specialised kernels from the first run


@needs_rtx
def test_rtx_contexts_ask_for_eager_kernel_specialisation():
    """The value the backend sets on TensorRT-RTX's runtime config is the library's real EAGER."""
    import tensorrt_rtx

    eager = select_library("rtx").eager_kernel_specialization
    assert eager is tensorrt_rtx.DynamicShapesKernelSpecializationStrategy.EAGER
    assert eager != tensorrt_rtx.DynamicShapesKernelSpecializationStrategy.LAZY  # the library's default
    assert hasattr(tensorrt_rtx.IRuntimeConfig, "dynamic_shapes_kernel_specialization_strategy")


@pytest.mark.tensorrt
@needs_engine_gpu
def test_engine_runs_its_specialised_kernels_from_the_first_call(engine_export):
    from pid_runtime.backends.tensorrt import TensorRTBackend

    g = golden_tensors(CASE)
    backend = TensorRTBackend(engine_export / "engine.plan")
    try:
        eager = backend.library.eager_kernel_specialization
        if eager is not None:
            config = backend._context.get_runtime_config()
            assert config.dynamic_shapes_kernel_specialization_strategy == eager
        _bind_golden(backend, g)
        dev = backend.device
        first = backend.velocity(g["x"].to(dev), g["t"].to(dev)).clone()
        later = [backend.velocity(g["x"].to(dev), g["t"].to(dev)).clone() for _ in range(3)]
        assert all(torch.equal(first, v) for v in later)  # one kernel set: bitwise the same
    finally:
        backend.close()


# ---------------------------------------------------------------------------
# 3. The device that will run it is the one checked


@needs_rtx
def test_preflight_checks_the_device_it_is_given(rtx_export):
    plan = rtx_export / "engine.plan"
    with pytest.raises(BackendError, match="TensorRT-RTX runs engines on a CUDA GPU, not on cpu"):
        preflight(plan, device="cpu")
    notes: list[str] = []
    assert resolve_model_path(rtx_export, note=notes.append, device="cpu") == rtx_export / "model.onnx"
    assert "not on cpu" in notes[0] and "using" in notes[0]
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="none is visible"):
            preflight(plan)  # auto: the current CUDA device, and there is none
    else:
        absent = f"cuda:{torch.cuda.device_count()}"
        with pytest.raises(BackendError, match=f"there is no {absent}"):
            preflight(plan, device=absent)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compare devices")
@needs_rtx
def test_rtx_plan_is_judged_by_the_given_gpu(rtx_export):
    """A default-targets TensorRT-RTX plan on each visible GPU: refused exactly where that
    GPU's compute capability is not an RTX target (an H100 or H200: 9.0)."""
    lib = select_library("rtx")
    meta = json.loads((rtx_export / "engine.json").read_text())
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        why = why_engine_cannot_run(lib, meta, f"cuda:{index}")
        if f"{major}.{minor}" in ("8.0", "8.6", "8.9") or major >= 12:
            assert why is None
        else:
            assert f"this GPU is {major}.{minor}" in why


# ---------------------------------------------------------------------------
# 4. A backend is usable again after close()


def test_onnxruntime_backend_works_again_after_close(export_root):  # noqa: F811
    g = golden_tensors(CASE)
    backend = OnnxRuntimeBackend(export_cases([CASE], export_root)[CASE] / "model.onnx", device="cpu")
    _bind_golden(backend, g)
    before = backend.velocity(g["x"], g["t"]).clone()
    backend.close()
    with pytest.raises(BackendError, match="before bind"):
        backend.velocity(g["x"], g["t"])
    _bind_golden(backend, g)
    assert torch.equal(backend.velocity(g["x"], g["t"]), before)


@pytest.mark.tensorrt
@needs_engine_gpu
def test_tensorrt_backend_works_again_after_close(engine_export):
    from pid_runtime.backends.tensorrt import TensorRTBackend

    g = golden_tensors(CASE)
    backend = TensorRTBackend(engine_export / "engine.plan")
    dev = backend.device
    try:
        _bind_golden(backend, g)
        before = backend.velocity(g["x"].to(dev), g["t"].to(dev)).clone()
        backend.close()
        with pytest.raises(BackendError, match="before bind"):
            backend.velocity(g["x"].to(dev), g["t"].to(dev))
        _bind_golden(backend, g)  # same shapes as before close(): must allocate again
        assert torch.equal(backend.velocity(g["x"].to(dev), g["t"].to(dev)), before)
    finally:
        backend.close()


# ---------------------------------------------------------------------------
# 5. Library failures as one line with the way out


def test_out_of_memory_is_a_backend_error_that_names_the_way_out():
    line = out_of_memory_line({"x": (2, 3, 4096, 4096)}, torch.device("cuda", 1))
    assert issubclass(OutOfDeviceMemory, BackendError)
    assert "out of GPU memory on cuda:1 for batch 2 at 4096x4096" in line and "smaller --size or --batch-size" in line


@pytest.mark.tensorrt
@needs_engine_gpu
def test_profile_switch_failure_and_out_of_memory_are_one_line(engine_export):
    """Real failures: a profile the engine lacks (the bindings raise RuntimeError), and a GPU
    filled by another tenant (torch allocations until it refuses)."""
    from pid_runtime.backends.tensorrt import TensorRTBackend

    g = golden_tensors(CASE)
    backend = TensorRTBackend(engine_export / "engine.plan")
    dev = backend.device
    shapes = {"x": (1, 3, 96, 64), "t": (1,), "y": (1, 12, 40), "lq_latent": (1, 16, 3, 2), "degrade_sigma": (1,)}
    try:
        with pytest.raises(BackendError, match="could not switch to optimization profile 7"):
            backend._allocate(7, shapes)
        hog = []
        for chunk in (1 << 30, 1 << 25, 1 << 21):
            try:
                while True:
                    hog.append(torch.empty(chunk, dtype=torch.uint8, device=dev))
            except torch.OutOfMemoryError:
                pass
        with pytest.raises(OutOfDeviceMemory, match="smaller --size or --batch-size"):
            backend.bind(g["y"].to(dev), g["lq_latent"].to(dev).repeat(2, 1, 1, 1), g["degrade_sigma"].to(dev)
                         .repeat(2), 128, 128)
        del hog
        torch.cuda.empty_cache()
        _bind_golden(backend, g)  # and it recovers once memory is free
        assert torch.isfinite(backend.velocity(g["x"].to(dev), g["t"].to(dev))).all()
    finally:
        backend.close()


# ---------------------------------------------------------------------------
# 8. A bf16 export runs on the CPU through ONNX Runtime


def test_bf16_export_decodes_on_the_cpu_widened(export_root):  # noqa: F811
    """ONNX Runtime's CPU provider has no bf16 Conv: the backend widens the graph, and the
    velocity is the float32 golden one within bf16's weight rounding."""
    onnx_path = export_cases([CASE], export_root, precision="bf16")[CASE] / "model.onnx"
    assert has_low_precision(onnx_path)
    import onnxruntime as ort

    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])  # why widening is needed
    g = golden_tensors(CASE)
    backend = OnnxRuntimeBackend(onnx_path, device="cpu")
    assert backend.widened
    _bind_golden(backend, g)
    assert rel_err(backend.velocity(g["x"], g["t"]), g["velocity"]) < 3e-2
    assert not OnnxRuntimeBackend(export_cases([CASE], export_root)[CASE] / "model.onnx", device="cpu").widened


def test_pid_run_decodes_a_bf16_export_on_the_cpu(export_root, tmp_path):  # noqa: F811
    export = export_cases([CASE], export_root, precision="bf16")[CASE]
    g = golden_tensors(CASE)
    np.save(tmp_path / "latents.npy", g["lq_latent"].numpy())
    np.save(tmp_path / "y.npy", g["y"].numpy())
    proc = subprocess.run([sys.executable, "-m", "pid_runtime.cli", str(export), str(tmp_path / "latents.npy"),
                           "--caption-embeds", str(tmp_path / "y.npy"), "--device", "cpu",
                           "--out", str(tmp_path / "out.png")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.png").stat().st_size > 0
