"""The TensorRT layer: engine profile, plan checks, the TensorRT-absent path, typing, and
(where TensorRT and a GPU exist) engine build + decode against the golden vectors.

Without TensorRT only the parts that need no TensorRT run; everything that needs it
is marked `tensorrt` and skips with the reason.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GOLDEN, golden_net, golden_tensors, rel_err
from pid_export import PidConfig
from pid_export.engine import (
    EngineError,
    EngineProfile,
    onnx_sha256,
    parse_hw,
    profile_shapes,
    tensorrt_status,
    write_atomic,
)
from pid_runtime.backends.base import BackendError
from pid_runtime.backends.tensorrt import (
    TensorRTBackend,
    check_plan_compatibility,
    load_engine_metadata,
    probe_plan,
    profile_violation,
    tensorrt_problem,
)
from pid_runtime.metadata import ModelMetadata

REPO = Path(__file__).resolve().parents[1]
RELEASES = json.loads((GOLDEN / "released_checkpoints.json").read_text()) if GOLDEN.exists() else {}


def real_tensorrt_present() -> bool:
    """Decided here, independently of the code under test: a real TensorRT has a Builder."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return False
    return hasattr(tensorrt, "Builder")


no_real_tensorrt = pytest.mark.skipif(real_tensorrt_present(), reason="TensorRT is installed here")


def release_config(name: str) -> PidConfig:
    if name not in RELEASES:
        pytest.skip(f"{GOLDEN}/released_checkpoints.json with {name} is not available")
    return PidConfig.from_dict(RELEASES[name]["network"])


# ---------------------------------------------------------------------------
# Engine profile shapes (pure)

PROFILE_CASES = [
    # release, (min, opt, max) HxW, expected lq_latent (channels, min hw, opt hw, max hw)
    ("PiD_res2k_sr4x_official_flux_distill_4step", ((1536, 1536), (2048, 2048), (2688, 2688)),
     (16, (48, 48), (64, 64), (84, 84))),
    ("PiD_res2k_sr4x_official_flux2_distill_4step", ((1536, 1536), (2048, 2048), (2688, 2688)),
     (128, (24, 24), (32, 32), (42, 42))),
    ("PiD_res2k_sr8x_official_siglip_distill_4step", ((1536, 1536), (2048, 2048), (2688, 2688)),
     (1152, (12, 12), (16, 16), (21, 21))),
    ("PiD_res2kto4k_sr4x_official_sdxl_distill_4step", ((2048, 2048), (3072, 4096), (4096, 4096)),
     (4, (64, 64), (96, 128), (128, 128))),
    ("PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step", ((2048, 2048), (3840, 3840), (4096, 4096)),
     (128, (32, 32), (60, 60), (64, 64))),
]


@pytest.mark.parametrize("release, sizes, latent", PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES])
def test_profile_shapes_for_released_configs(release, sizes, latent):
    profile = EngineProfile.for_config(release_config(release), *sizes)
    shapes = profile_shapes(profile)
    channels, *latent_hw = latent
    assert list(shapes) == ["x", "t", "y", "lq_latent", "degrade_sigma"]
    for (height, width), (lh, lw), got in zip(sizes, latent_hw, zip(*shapes.values())):
        x, t, y, lq, sigma = got
        assert x == (1, 3, height, width)
        assert t == (1,) and sigma == (1,)
        assert y == (1, 300, 2304)  # caption length fixed at the released max
        assert lq == (1, channels, lh, lw)


def test_profile_batch_and_caption_range():
    cfg = release_config("PiD_res2k_sr4x_official_flux_distill_4step")
    profile = EngineProfile.for_config(cfg, (1536, 1536), (2048, 2048), (2048, 2048), max_batch=4,
                                       opt_batch=2, min_text_length=1)
    shapes = profile_shapes(profile)
    assert shapes["y"] == ((1, 1, 2304), (2, 300, 2304), (4, 300, 2304))
    assert shapes["t"] == ((1,), (2,), (4,))
    assert shapes["x"][2] == (4, 3, 2048, 2048)
    # The sidecar form carries the same shapes as lists.
    assert profile.to_dict()["shapes"]["lq_latent"] == {"min": [1, 16, 48, 48], "opt": [2, 16, 64, 64],
                                                       "max": [4, 16, 64, 64]}


def test_profile_rejects_sizes_off_the_patch_grid():
    cfg = release_config("PiD_res2k_sr8x_official_siglip_distill_4step")  # 128 px per latent cell
    with pytest.raises(EngineError, match=r"min width 1720 is not a positive multiple of 16"):
        EngineProfile.for_config(cfg, (2304, 1720), (2048, 2048), (2688, 2688))
    # 1728 px (a trained size) is 13.5 latent cells: any output size is free now, the latent range rounds outward
    profile = EngineProfile.for_config(cfg, (2304, 1728), (2304, 1728), (2688, 2688))
    assert [shape[2:] for shape in profile_shapes(profile)["lq_latent"]] == [(18, 13), (18, 13), (21, 21)]


def test_profile_rejects_unordered_ranges():
    cfg = release_config("PiD_res2k_sr4x_official_flux_distill_4step")
    with pytest.raises(EngineError, match=r"min <= opt <= max, got 2048, 1536, 2688"):
        EngineProfile.for_config(cfg, (2048, 2048), (1536, 2048), (2688, 2688))
    with pytest.raises(EngineError, match=r"batch sizes"):
        EngineProfile.for_config(cfg, (1536, 1536), (2048, 2048), (2688, 2688), max_batch=1, opt_batch=2)


def _metadata(**sizes) -> ModelMetadata:
    return ModelMetadata(release="PiD_res2k_sr4x_official_flux_distill_4step", latent_channels=16,
                         latent_down_factor=8, sr_factor=4, txt_embed_dim=2304, txt_max_length=300,
                         precision="bf16", **sizes)


def test_profile_from_export_metadata():
    meta = _metadata(trained_sizes=[[2048, 2048], [1536, 2688], [2688, 1536]], min_size=[1536, 1536],
                     max_size=[2688, 2688])
    profile = EngineProfile.for_metadata(meta)
    assert (profile.min_hw, profile.opt_hw, profile.max_hw) == ((1536, 1536), (2048, 2048), (2688, 2688))
    assert profile.pixel_scale == 32 and profile.latent_channels == 16 and profile.text_length == 300
    override = EngineProfile.for_metadata(meta, max_hw=(4096, 4096), opt_hw=(3840, 3840), max_batch=2)
    assert (override.opt_hw, override.max_hw, override.max_batch) == ((3840, 3840), (4096, 4096), 2)
    with pytest.raises(EngineError, match="give --min and --max"):
        EngineProfile.for_metadata(_metadata())


def test_parse_hw():
    assert parse_hw("2048x1536") == (2048, 1536)
    assert parse_hw(" 3840X2160 ") == (3840, 2160)
    for bad in ("2048", "2048x", "x2048", "2048*2048", "-32x32"):
        with pytest.raises(EngineError, match="HEIGHTxWIDTH"):
            parse_hw(bad)


# ---------------------------------------------------------------------------
# Plan checks the runtime makes before TensorRT sees the file (pure)

BUILT_HERE = {"tensorrt_version": "10.14.1.48", "compute_capability": "9.0", "gpu_name": "NVIDIA H100 80GB HBM3"}


def test_compatibility_accepts_matching_plan():
    assert check_plan_compatibility(BUILT_HERE, "10.14.1.48", "9.0") is None
    assert check_plan_compatibility({}, "10.14.1.48", "9.0") is None  # nothing recorded: TensorRT decides


def test_compatibility_refuses_other_tensorrt_version_in_tensorrts_words():
    message = check_plan_compatibility(BUILT_HERE, "10.15.1.29", "9.0")
    assert message is not None
    assert message.startswith("engine plan is not compatible with this version of TensorRT, "
                              "expecting library version 10.15.1.29 got 10.14.1.48")


def test_compatibility_refuses_other_gpu_in_tensorrts_words():
    message = check_plan_compatibility(BUILT_HERE, "10.14.1.48", "8.9")
    assert message is not None
    assert message.startswith("engine plan was generated on an incompatible device (NVIDIA H100 80GB HBM3), "
                              "expecting compute 8.9 got compute 9.0")


def _flux_ranges() -> dict:
    cfg = release_config("PiD_res2k_sr4x_official_flux_distill_4step")
    profile = EngineProfile.for_config(cfg, (1536, 1536), (2048, 2048), (2688, 2688), max_batch=2)
    # What get_tensor_profile_shape reports for an engine built with this profile.
    return {name: (low, high) for name, (low, _, high) in profile_shapes(profile).items()}


def _decode_shapes(batch: int, height: int, width: int, text: int = 300, channels: int = 16) -> dict:
    return {"x": (batch, 3, height, width), "t": (batch,), "y": (batch, text, 2304),
            "lq_latent": (batch, channels, height // 32, width // 32), "degrade_sigma": (batch,)}


def test_profile_violation_names_the_allowed_range():
    ranges = _flux_ranges()
    assert profile_violation(_decode_shapes(1, 2048, 2048), ranges) is None
    assert profile_violation(_decode_shapes(2, 1536, 2688), ranges) is None
    assert profile_violation(_decode_shapes(1, 4096, 4096), ranges) == (
        "output size 4096x4096 is outside the engine profile 1536x1536 .. 2688x2688 (HxW); use an engine "
        "built for it (pid-export --min/--max HxW) or the export's model.onnx")
    assert "outside the engine profile 1536x1536" in profile_violation(_decode_shapes(1, 1024, 2048), ranges)
    assert profile_violation(_decode_shapes(3, 2048, 2048), ranges) == (
        "batch 3 (input x) is outside the engine profile: allowed 1..2")
    assert profile_violation(_decode_shapes(1, 2048, 2048, text=77), ranges) == (
        "caption length 77 (input y) is outside the engine profile: allowed 300")
    assert profile_violation(_decode_shapes(1, 2048, 2048, channels=4), ranges) == (
        "latent channels 4 (input lq_latent) is outside the engine profile: allowed 16")


def test_probe_plan_recognises_files_that_are_not_plans(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    from safetensors.numpy import save_file

    assert probe_plan(tmp_path / "absent.plan") == f"engine file {tmp_path / 'absent.plan'} does not exist"
    assert "is a directory" in probe_plan(tmp_path)
    (tmp_path / "empty.plan").write_bytes(b"")
    assert "is empty, not a TensorRT engine" in probe_plan(tmp_path / "empty.plan")
    (tmp_path / "meta.plan").write_text(json.dumps({"tensorrt_version": "10.14"}))
    assert probe_plan(tmp_path / "meta.plan").endswith("is a JSON file, not a TensorRT engine plan")
    np.save(tmp_path / "latents.npy", np.zeros((1, 16, 4, 4), np.float32))
    assert "NumPy" in probe_plan(tmp_path / "latents.npy")
    np.savez(tmp_path / "latents.npz", a=np.zeros(3))
    assert "zip archive" in probe_plan(tmp_path / "latents.npz")
    save_file({"noise": np.zeros((1, 3, 4, 4), np.float32)}, str(tmp_path / "noise.safetensors"))
    assert "safetensors" in probe_plan(tmp_path / "noise.safetensors")
    # A real ONNX model, under a .plan name: recognised by content.
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(tmp_path / "model_renamed.plan"))
    assert "is an ONNX model" in probe_plan(tmp_path / "model_renamed.plan")
    # Bytes that are none of the above are left to TensorRT to judge.
    (tmp_path / "engine.plan").write_bytes(b"ftrt" + bytes(range(200)))
    assert probe_plan(tmp_path / "engine.plan") is None


def test_engine_sidecar_loading(tmp_path):
    plan = tmp_path / "engine.plan"
    assert load_engine_metadata(plan) is None  # no sidecar: checks are TensorRT's
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(BackendError, match="cannot read engine metadata"):
        load_engine_metadata(plan)
    (tmp_path / "engine.json").write_text(json.dumps(BUILT_HERE))
    assert load_engine_metadata(plan) == BUILT_HERE


def test_tensorrt_version_gate():
    assert "TensorRT is not installed: pip install --extra-index-url https://pypi.nvidia.com" in tensorrt_problem(None)
    assert "TensorRT 10.13.0.35 is too old (need >= 10.14)" in tensorrt_problem("10.13.0.35")
    assert tensorrt_problem("10.14.1.48") is None
    assert tensorrt_problem("11.0.0.12") is None


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "engine.plan"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.plan"]
    with pytest.raises(OSError):
        write_atomic(tmp_path / "missing-dir" / "engine.plan", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.plan"]


def test_onnx_hash_covers_external_weights(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    expected = hashlib.sha256(path.read_bytes() + (tmp_path / "model.onnx.data").read_bytes()).hexdigest()
    assert onnx_sha256(path) == expected
    data = bytearray((tmp_path / "model.onnx.data").read_bytes())
    data[0] ^= 0xFF  # same graph file, different weights
    (tmp_path / "model.onnx.data").write_bytes(bytes(data))
    assert onnx_sha256(path) != expected


# ---------------------------------------------------------------------------
# This machine has no TensorRT: real behaviour, not a simulation


@no_real_tensorrt
def test_status_says_tensorrt_is_missing_and_how_to_get_it():
    usable, reason = tensorrt_status()
    assert not usable
    assert reason == ("TensorRT is not installed: pip install --extra-index-url https://pypi.nvidia.com "
                      "'tensorrt>=10.14' (needs an NVIDIA GPU); engine step skipped")


@no_real_tensorrt
def test_backend_without_tensorrt_says_so_and_points_to_onnx(tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"ftrt" + bytes(200))
    with pytest.raises(BackendError) as info:
        TensorRTBackend(plan, _metadata())
    assert str(info.value) == (
        "TensorRT is not installed: pip install --extra-index-url https://pypi.nvidia.com 'tensorrt>=10.14' "
        "(needs an NVIDIA GPU) (pid-run can run the export directory's model.onnx with ONNX Runtime instead)")


def test_backend_refuses_a_file_that_is_not_a_plan(tmp_path):
    (tmp_path / "engine.plan").write_text(json.dumps({"profile": {}}))
    with pytest.raises(BackendError, match=r"is a JSON file, not a TensorRT engine plan"):
        TensorRTBackend(tmp_path / "engine.plan", _metadata())
    (tmp_path / "empty.engine").write_bytes(b"")
    with pytest.raises(BackendError, match=r"is empty, not a TensorRT engine"):
        TensorRTBackend(tmp_path / "empty.engine", _metadata())


# ---------------------------------------------------------------------------
# Static typing against tensorrt-stubs (the CI check for this layer)

TYPED_MODULES = ("pid_export.engine", "pid_runtime.backends.tensorrt", "pid_runtime.cuda_graph")
# Proves the check is real: these two lines must be flagged, so the stubs and
# pid_runtime were both resolved (not silently treated as Any).
CANARY = '''import tensorrt as trt
from pid_runtime.backends.tensorrt import version_tuple

def f() -> None:
    trt.Builder()
    version_tuple(3)
'''


def _patched_tensorrt_stubs(dest: Path) -> None:
    """Copy tensorrt-stubs 10.13 into `dest`, fixed so mypy can read them.

    As installed they are invisible to mypy (no py.typed, not a `-stubs`
    package) and do not parse (a parameter named `in`; a required parameter
    after defaulted ones in add_scale_nd). Semantic errors inside them are not
    ours to fix, hence `# mypy: ignore-errors` on the copies.
    """
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        pytest.skip("tensorrt-stubs is not installed (pip install 'tensorrt-stubs>=10.13')")
    site = Path(spec.origin).parent.parent
    for package in ("tensorrt", "tensorrt_bindings"):
        (dest / package).mkdir(parents=True)
        for stub in (site / package).glob("*.pyi"):
            text = re.sub(r"([(,]\s*)in: ", r"\1in_: ", stub.read_text())
            text = re.sub(r"(=[^()\n]*,\s*channel_axis: int)\)", r"\1 = ...)", text)
            ast.parse(text, filename=str(stub))  # a new syntax problem in newer stubs fails here
            (dest / package / stub.name).write_text("# mypy: ignore-errors\n" + text)


def test_tensorrt_layer_passes_mypy_against_tensorrt_stubs(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[dev]')")
    stubs = tmp_path / "stubs"
    _patched_tensorrt_stubs(stubs)
    # pid_runtime lives in runtime/ (a package-dir mapping mypy cannot follow through the editable install).
    (stubs / "pid_runtime").symlink_to(REPO / "runtime")
    (stubs / "trt_canary.py").write_text(CANARY)
    config = tmp_path / "mypy.ini"
    config.write_text(f"""[mypy]
python_version = 3.11
mypy_path = {stubs}:{REPO}
follow_imports = silent
warn_unused_ignores = True
warn_redundant_casts = True
cache_dir = {REPO / '.mypy_cache' / 'tensorrt-layer'}

[mypy-{','.join(TYPED_MODULES)}]
disallow_untyped_defs = True
disallow_incomplete_defs = True
check_untyped_defs = True
disallow_any_generics = True
warn_return_any = True

[mypy-onnxruntime.*]
ignore_missing_imports = True
""")
    modules = [arg for name in (*TYPED_MODULES, "trt_canary") for arg in ("-m", name)]
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), *modules],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    canary = [line for line in errors if "trt_canary.py" in line]
    assert len(canary) == 2, f"the stubs or pid_runtime were not resolved:\n{run.stdout}{run.stderr}"
    assert 'Missing positional argument "logger" in call to "Builder"' in canary[0]
    ours = [line for line in errors if "trt_canary.py" not in line]
    assert not ours, "\n".join(ours)


# ---------------------------------------------------------------------------
# With TensorRT and a GPU: build tiny engines, decode, compare with the golden vectors

TRT_USABLE, TRT_REASON = tensorrt_status()
CASE = "tiny_v1_16ch_sr4"  # 16-ch latent, 32 px per latent cell, 64x96 output, text length 12
# Relative error vs the fp32 golden velocity; bf16 has 8 mantissa bits, fp16 11.
TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 5e-3}


def _golden_net_and_tensors():
    return golden_net(CASE), golden_tensors(CASE)


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def tiny_engine(request, tmp_path_factory):
    """(precision, export dir with engine.plan) for the golden case, profile 32x32 .. 128x128, batch 1..2."""
    from pid_export.engine import build_engine
    from pid_export.onnx_export import export_onnx

    precision = request.param
    net, _ = _golden_net_and_tensors()
    out = tmp_path_factory.mktemp(f"engine-{precision}") / "export"
    export_onnx(net, out, precision=precision)
    cfg = PidConfig.from_dict(json.loads((GOLDEN / f"{CASE}.json").read_text())["network"])
    profile = EngineProfile.for_config(cfg, (32, 32), (64, 96), (128, 128), max_batch=2, min_text_length=1)
    build_engine(out / "model.onnx", out, profile, workspace_gb=2, log=lambda m: None)
    return precision, out


def _bind_golden(backend: TensorRTBackend, g: dict) -> None:
    dev = backend.device
    backend.bind(g["y"].to(dev), g["lq_latent"].to(dev), g["degrade_sigma"].to(dev),
                 g["x"].shape[2], g["x"].shape[3])


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_USABLE, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
def test_engine_velocity_matches_golden(tiny_engine):
    precision, out = tiny_engine
    _, g = _golden_net_and_tensors()
    backend = TensorRTBackend(out / "engine.plan")
    _bind_golden(backend, g)
    v = backend.velocity(g["x"].to(backend.device), g["t"].to(backend.device))
    assert v.dtype == torch.float32 and bool(torch.isfinite(v).all())
    assert rel_err(v, g["velocity"]) < TOLERANCE[precision]
    # x written straight into the bound buffer gives the same answer without a copy.
    backend.input_buffer().copy_(g["x"])
    v2 = backend.velocity(backend.input_buffer(), g["t"].to(backend.device))
    assert rel_err(v2, v) < 1e-6


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_USABLE, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
def test_engine_sidecar_describes_the_build(tiny_engine):
    import tensorrt as trt

    precision, out = tiny_engine
    meta = json.loads((out / "engine.json").read_text())
    major, minor = torch.cuda.get_device_capability()
    assert meta["tensorrt_version"] == trt.__version__
    assert meta["compute_capability"] == f"{major}.{minor}"
    assert meta["precision"] == precision
    assert meta["stripped"] is False
    assert [t["name"] for t in meta["inputs"]] == ["x", "t", "y", "lq_latent", "degrade_sigma"]
    assert meta["profile"]["shapes"]["x"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 96], "max": [2, 3, 128, 128]}
    data = b"".join(p.read_bytes() for p in sorted(out.glob("model.onnx*")))
    assert meta["onnx_sha256"] == hashlib.sha256(data).hexdigest()
    assert (out / "timing.cache").stat().st_size > 0


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_USABLE, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda-graph"])
def test_engine_decode_matches_golden_sample(tiny_engine, cuda_graph):
    precision, out = tiny_engine
    _, g = _golden_net_and_tensors()
    backend = TensorRTBackend(out / "engine.plan", cuda_graph=cuda_graph)
    _bind_golden(backend, g)
    image = backend.sample(g["sampler_noise"], list(g["sampler_eps"]), steps=4)
    assert rel_err(image, g["sampled_image"]) < 2 * TOLERANCE[precision]
    again = backend.sample(g["sampler_noise"], list(g["sampler_eps"]), steps=4)  # graph replay / reuse
    assert rel_err(again, image) < 1e-5


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_USABLE, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
def test_engine_refuses_shapes_outside_its_profile(tiny_engine):
    _, out = tiny_engine
    _, g = _golden_net_and_tensors()
    backend = TensorRTBackend(out / "engine.plan")
    dev = backend.device
    lq = torch.zeros(1, 16, 8, 8, device=dev)
    with pytest.raises(BackendError, match=r"output size 256x256 is outside the engine profile 32x32 \.\. 128x128"):
        backend.bind(g["y"].to(dev), lq, g["degrade_sigma"].to(dev), 256, 256)
    with pytest.raises(BackendError, match=r"batch 3 \(input x\) is outside the engine profile: allowed 1\.\.2"):
        backend.bind(g["y"].repeat(3, 1, 1).to(dev), torch.zeros(3, 16, 2, 3, device=dev),
                     torch.zeros(3, device=dev), 64, 96)


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_USABLE, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
def test_plan_from_another_tensorrt_or_gpu_is_refused_not_crashed(tiny_engine, tmp_path):
    _, out = tiny_engine
    for field, value, sentence in (
            ("tensorrt_version", "9.0.0.1", "engine plan is not compatible with this version of TensorRT"),
            ("compute_capability", "1.0", "engine plan was generated on an incompatible device")):
        copy = tmp_path / field
        shutil.copytree(out, copy)
        meta = json.loads((copy / "engine.json").read_text())
        meta[field] = value
        (copy / "engine.json").write_text(json.dumps(meta))
        with pytest.raises(BackendError, match=sentence):
            TensorRTBackend(copy / "engine.plan")
    garbage = tmp_path / "garbage"
    shutil.copytree(out, garbage)
    (garbage / "engine.json").unlink()
    (garbage / "engine.plan").write_bytes(b"ftrt" + bytes(4096))
    with pytest.raises(BackendError, match="could not be loaded as a TensorRT engine"):
        TensorRTBackend(garbage / "engine.plan")


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_USABLE, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
def test_verify_engine_against_pytorch(tiny_engine):
    from pid_export.engine import verify_engine

    precision, out = tiny_engine
    net, _ = _golden_net_and_tensors()
    result = verify_engine(out, net=net, log=lambda m: None)
    assert result.finite
    assert result.x_shape == [1, 3, 32, 32]  # the profile's smallest size
    assert result.rel_error < TOLERANCE[precision]


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_USABLE, reason=f"needs TensorRT and a CUDA GPU: {TRT_REASON}")
def test_fp32_engine_verifies_against_onnx_runtime_and_weightless_plan_refits(tmp_path):
    from pid_export.engine import build_engine, verify_engine
    from pid_export.onnx_export import export_onnx

    net, g = _golden_net_and_tensors()
    out = tmp_path / "export"
    export_onnx(net, out, precision="fp32")
    profile = EngineProfile.for_config(net.cfg, (32, 32), (64, 96), (128, 128))
    build_engine(out / "model.onnx", out, profile, strip_weights=True, log=lambda m: None)
    assert json.loads((out / "engine.json").read_text())["stripped"] is True
    result = verify_engine(out, log=lambda m: None)  # ONNX Runtime on model.onnx
    assert result.reference.startswith("ONNX Runtime") and result.rel_error < TOLERANCE["fp32"]
    backend = TensorRTBackend(out / "engine.plan")  # refits the weights from model.onnx
    _bind_golden(backend, g)
    v = backend.velocity(g["x"].to(backend.device), g["t"].to(backend.device))
    assert rel_err(v, g["velocity"]) < TOLERANCE["fp32"]
