"""The TensorRT layer: engine profiles (one and several), plan checks, choosing the library
(enterprise TensorRT or TensorRT-RTX), the device discipline, typing, and (where a library
and a GPU that can run its engines exist) engine decode against the golden vectors.

What needs no TensorRT runs everywhere. Engine *builds* with TensorRT-RTX on the CPU are
in test_tensorrt_build.py; everything that runs an engine is marked `tensorrt` and skips
with the reason where no GPU can run it.
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
from exports import export_root, private_export  # noqa: F401 (fixture)
from pid_export import PidConfig
from pid_export.engine import (
    EngineError,
    EngineProfile,
    MissingSizeRange,
    ProfileSpec,
    default_profile_specs,
    engine_profiles,
    onnx_sha256,
    parse_compute_capabilities,
    parse_hw,
    parse_profiles,
    profile_shapes,
    tensorrt_status,
    why_engines_cannot_run_here,
    write_atomic,
)
from pid_export.releases import get_release
from pid_runtime.backends.base import BackendError
from pid_runtime.backends.tensorrt import (
    TensorRTBackend,
    check_plan_compatibility,
    describe_invalidity,
    load_engine_metadata,
    probe_plan,
    profile_violation,
    select_profile,
    union_ranges,
)
from pid_runtime.engine_metadata import EngineMetadata
from pid_runtime.metadata import ModelMetadata
from pid_runtime.trt_library import (
    ENV_VAR,
    LibraryError,
    choose_library,
    library_for_plan,
    normalise_choice,
    select_library,
)

REPO = Path(__file__).resolve().parents[1]
RELEASES = json.loads((GOLDEN / "released_checkpoints.json").read_text()) if GOLDEN.exists() else {}


def real_enterprise_tensorrt_present() -> bool:
    """Decided here, independently of the code under test: a real TensorRT has a Builder."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return False
    return hasattr(tensorrt, "Builder")


def real_tensorrt_rtx_present() -> bool:
    try:
        import tensorrt_rtx
    except (ImportError, OSError):
        return False
    return hasattr(tensorrt_rtx, "Builder")


no_enterprise_tensorrt = pytest.mark.skipif(real_enterprise_tensorrt_present(), reason="TensorRT is installed here")
needs_rtx = pytest.mark.skipif(not real_tensorrt_rtx_present(),
                               reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13==1.7.1.116)")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


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
        # captions of 1..300 tokens, tuned (opt) at the 300 the caption encoder pads to (issue 20 item 1)
        assert y == ((1, 1, 2304) if (height, width) == sizes[0] else (1, 300, 2304))
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
# Several optimization profiles (pure)


def test_parse_profiles():
    assert parse_profiles("2048x2048,3840x3840") == [ProfileSpec((2048, 2048)), ProfileSpec((3840, 3840))]
    assert parse_profiles("1536x1536:2048x2048:2688x2688") == [
        ProfileSpec((2048, 2048), (1536, 1536), (2688, 2688))]
    for bad in ("2048x2048:3840x3840", "2048", "1x1:2x2:3x3:4x4"):
        with pytest.raises(EngineError):
            parse_profiles(bad)


def _release_metadata(release) -> ModelMetadata:
    cfg = release.network
    return ModelMetadata(release=release.name, latent_channels=cfg.lq_latent_channels,
                         latent_down_factor=cfg.latent_spatial_down_factor, sr_factor=cfg.sr_scale,
                         txt_embed_dim=cfg.txt_embed_dim, txt_max_length=cfg.txt_max_length, precision="bf16",
                         trained_sizes=[list(s) for s in release.trained_sizes], min_size=list(release.min_size),
                         max_size=list(release.max_size))


def test_2kto4k_releases_get_a_2k_and_a_4k_profile():
    release = get_release("sd3", "2kto4k")
    meta = _release_metadata(release)
    profiles = engine_profiles(meta, default_profile_specs(release))
    assert [(p.min_hw, p.opt_hw, p.max_hw) for p in profiles] == [
        ((1536, 1536), (2048, 2048), (2688, 2688)),  # 2K class: up to the largest 2K bucket side
        ((1536, 1536), (3840, 3840), (4096, 4096)),  # 4K class: the whole trained range
    ]
    for variant in ("2kto4k", "2kto4k-v1.5"):  # flux2: 64 px per latent cell, the sizes still fit
        flux2 = get_release("flux2", variant)
        assert len(engine_profiles(_release_metadata(flux2), default_profile_specs(flux2))) == 2
    assert default_profile_specs(get_release("flux", "2k")) is None  # one profile, tuned at 2048x2048
    assert default_profile_specs(None) is None  # custom networks: one profile
    with pytest.raises(EngineError, match="--opt or --profiles"):
        engine_profiles(meta, parse_profiles("3840x3840"), opt_hw=(2048, 2048))
    with pytest.raises(MissingSizeRange, match="give --min and --max"):
        engine_profiles(_metadata(), parse_profiles("3840x3840"))


def test_a_static_release_export_gets_one_profile_at_its_size():
    """`pid-export --backbone sd3 --variant 2kto4k --static 2048x2048`: not the release's two profiles
    (whose 3840 opt lies outside a 2048-only export), one at the static size, full-length captions."""
    from pid_export.pipeline import EngineOptions, planned_profiles

    release = get_release("sd3", "2kto4k")
    for size in ((2048, 2048), (512, 768)):
        profiles = planned_profiles(release.network, release, EngineOptions(), (1, *size))
        assert [(p.min_hw, p.opt_hw, p.max_hw) for p in profiles] == [(size, size, size)]
        assert profile_shapes(profiles[0])["y"][1] == (1, release.network.txt_max_length, release.network.txt_embed_dim)


def _two_profiles() -> list[dict]:
    """What get_tensor_profile_shape reports for the default sd3/2kto4k engine (batch 1..2)."""
    cfg = get_release("sd3", "2kto4k").network
    return [profile_shapes(EngineProfile.for_config(cfg, low, opt, high, max_batch=2))
            for low, opt, high in (((1536, 1536), (2048, 2048), (2688, 2688)),
                                   ((1536, 1536), (3840, 3840), (4096, 4096)))]


@pytest.mark.parametrize("height, width, expected", [
    (1536, 1536, 0), (2048, 2048, 0), (2048, 2688, 0), (2688, 2688, 0),  # 2K side: both cover, 2K opt nearer
    (2720, 2720, 1), (2880, 2048, 1),  # just past the 2K profile's max: only the 4K one covers
    (3072, 3072, 1), (3840, 3840, 1), (4096, 4096, 1), (4096, 1536, 1),
], ids=lambda v: str(v))
def test_profile_selection_on_both_sides_of_the_boundary(height, width, expected):
    assert select_profile(_decode_shapes(1, height, width), _two_profiles()) == expected


def test_profile_selection_prefers_the_nearest_opt_when_several_cover():
    profiles = _two_profiles()
    # Both cover 2688x2688 (2K's max); 2048 is 1280 px away in H+W, 3840 is 2304: the 2K profile.
    assert select_profile(_decode_shapes(2, 2688, 2688), profiles) == 0
    # A 4K profile listed first changes nothing: nearest opt, not order.
    assert select_profile(_decode_shapes(1, 2304, 1728), profiles[::-1]) == 1


def test_profile_selection_refuses_uncovered_shapes_with_the_union_range():
    profiles = _two_profiles()
    with pytest.raises(BackendError, match=r"output size 4608x4608 is outside the engine profile 1536x1536 \.\. "
                                           r"4096x4096"):
        select_profile(_decode_shapes(1, 4608, 4608), profiles)
    with pytest.raises(BackendError, match=r"batch 3 \(input x\) is outside the engine profile: allowed 1\.\.2"):
        select_profile(_decode_shapes(3, 2048, 2048), profiles)
    assert union_ranges(profiles)["x"] == ((1, 3, 1536, 1536), (2, 3, 4096, 4096))


# ---------------------------------------------------------------------------
# Plan checks the runtime makes before TensorRT sees the file (pure)

BUILT_HERE = {"library": "tensorrt", "library_version": "10.14.1.48", "compute_capabilities": ["9.0"],
              "gpu_name": "NVIDIA H100 80GB HBM3"}
RTX_DEFAULT = {"library": "rtx", "library_version": "1.7.1.116", "compute_capabilities": ["8.0", "8.6", "8.9", "12.0+"],
               "compute_capabilities_source": "library default"}
RTX_FP8 = dict(RTX_DEFAULT, compute_capabilities=["8.9", "12.0"], compute_capabilities_source="--compute-capability")


def test_compatibility_accepts_matching_plan():
    assert check_plan_compatibility(BUILT_HERE, "tensorrt", "10.14.1.48", "9.0") is None
    assert check_plan_compatibility({}, "tensorrt", "10.14.1.48", "9.0") is None  # nothing recorded: TensorRT decides
    # A sidecar from before TensorRT-RTX support (one GPU, `tensorrt_version`) is still read.
    old = {"tensorrt_version": "10.14.1.48", "compute_capability": "9.0"}
    assert check_plan_compatibility(old, "tensorrt", "10.14.1.48", "9.0") is None
    assert "expecting compute 8.9 got compute 9.0" in check_plan_compatibility(old, "tensorrt", "10.14.1.48", "8.9")


def test_compatibility_refuses_other_tensorrt_version_in_tensorrts_words():
    message = check_plan_compatibility(BUILT_HERE, "tensorrt", "10.15.1.29", "9.0")
    assert message is not None
    assert message.startswith("engine plan is not compatible with this version of TensorRT, "
                              "expecting library version 10.15.1.29 got 10.14.1.48")


def test_compatibility_refuses_other_gpu_in_tensorrts_words():
    message = check_plan_compatibility(BUILT_HERE, "tensorrt", "10.14.1.48", "8.9")
    assert message is not None
    assert message.startswith("engine plan was generated on an incompatible device (NVIDIA H100 80GB HBM3), "
                              "expecting compute 8.9 got compute 9.0")


@pytest.mark.parametrize("gpu, fits", [("8.0", True), ("8.6", True), ("8.9", True), ("12.0", True), ("12.1", True),
                                       ("7.5", False), ("9.0", False), ("10.0", False)])
def test_rtx_plan_runs_on_its_default_targets_only(gpu, fits):
    message = check_plan_compatibility(RTX_DEFAULT, "rtx", "1.7.1.116", gpu)
    if fits:
        assert message is None
    else:
        assert message.startswith(f"engine plan targets compute capability 8.0, 8.6, 8.9, 12.0+ and this GPU is {gpu}: "
                                  "TensorRT-RTX engines run on RTX-class GPUs only")


def test_rtx_plan_for_named_targets_runs_on_those_only():
    assert check_plan_compatibility(RTX_FP8, "rtx", "1.7.1.116", "8.9") is None
    assert check_plan_compatibility(RTX_FP8, "rtx", "1.7.1.116", "12.0") is None
    assert "--compute-capability 8.6" in check_plan_compatibility(RTX_FP8, "rtx", "1.7.1.116", "8.6")


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
    assert profile_violation(_decode_shapes(1, 2048, 2048, text=77), ranges) is None  # shorter captions fit
    assert profile_violation(_decode_shapes(1, 2048, 2048, text=301), ranges) == (
        "caption length 301 (input y) is outside the engine profile: allowed 1..300")
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
    assert load_engine_metadata(plan) == EngineMetadata.from_dict(BUILT_HERE)


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "engine.plan"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.plan"]
    (tmp_path / "plain").write_bytes(b"")  # the permissions any new file gets here (not mkstemp's 0600)
    assert target.stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").unlink()
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


@needs_rtx
def test_engine_validity_diagnostics_in_words():
    import tensorrt_rtx

    flags = {name: int(value) for name, value in tensorrt_rtx.EngineInvalidityDiagnostics.__members__.items()}
    assert describe_invalidity(flags["UNSUPPORTED_CC"] | flags["OLD_CUDA_DRIVER"], flags) == (
        "it was not built for this GPU's compute capability; the CUDA driver is too old")
    assert describe_invalidity(flags["VERSION_MISMATCH"], flags) == "it was built by another TensorRT-RTX version"
    assert describe_invalidity(0, flags) == "no reason was given"


# ---------------------------------------------------------------------------
# Choosing the library


def _problems(**usable: bool):
    """`problem(key)` for choose_library: None for the usable libraries, a reason for the others;
    records which libraries were probed."""
    probed: list[str] = []

    def problem(key: str) -> str | None:
        probed.append(key)
        return None if usable.get(key) else f"{key} is not installed"

    return problem, probed


def test_auto_prefers_enterprise_with_a_gpu_and_rtx_without():
    problem, probed = _problems(tensorrt=True, rtx=True)
    assert choose_library("auto", problem, gpu=True) == "tensorrt" and probed == ["tensorrt"]
    problem, probed = _problems(tensorrt=True, rtx=True)
    assert choose_library("auto", problem, gpu=False) == "rtx" and probed == ["rtx"]  # the other is never imported
    problem, _ = _problems(tensorrt=True)
    assert choose_library("auto", problem, gpu=False) == "tensorrt"  # it will say it needs a GPU to build
    problem, _ = _problems(rtx=True)
    assert choose_library(None, problem, gpu=True) == "rtx"


def test_explicit_choice_and_environment_override_auto(monkeypatch):
    problem, _ = _problems(tensorrt=True, rtx=True)
    assert choose_library("rtx", problem, gpu=True) == "rtx"
    monkeypatch.setenv(ENV_VAR, "rtx")
    assert choose_library(None, problem, gpu=True) == "rtx"
    assert choose_library("tensorrt", problem, gpu=True) == "tensorrt"  # the option beats the variable
    monkeypatch.setenv(ENV_VAR, "tensorrt_rtx")  # the module name works too
    assert normalise_choice(None) == "rtx"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(LibraryError, match=r"\$PID_TRT='cuda' is not a TensorRT library: use auto, tensorrt, rtx"):
        normalise_choice(None)
    with pytest.raises(LibraryError, match=r"--trt='trt11' is not a TensorRT library"):
        normalise_choice("trt11")


def test_no_library_names_both_and_how_to_get_them():
    problem, _ = _problems()
    with pytest.raises(LibraryError) as info:
        choose_library("auto", problem, gpu=False)
    assert str(info.value) == (
        "no TensorRT library is installed: TensorRT-RTX (RTX GPUs, compute capability 8.0/8.6/8.9/12.0+; builds "
        "without a GPU): pip install 'pid-export[rtx]' (or tensorrt-rtx-cu13==1.7.1.116); or TensorRT (data-centre "
        "and RTX GPUs; builds need that GPU): pip install --extra-index-url https://pypi.nvidia.com 'tensorrt>=10.14'")
    with pytest.raises(LibraryError, match="^rtx is not installed$"):
        choose_library("rtx", problem, gpu=False)


@no_enterprise_tensorrt
def test_asking_for_enterprise_tensorrt_where_it_is_absent_says_how_to_get_it():
    # Real behaviour: enterprise TensorRT cannot be installed here (tensorrt-stubs may be).
    with pytest.raises(LibraryError, match=r"^TensorRT is not installed.*: pip install --extra-index-url "
                                           r"https://pypi.nvidia.com 'tensorrt>=10.14'$"):
        select_library("tensorrt")
    usable, line = tensorrt_status("tensorrt")
    assert not usable and line.startswith("TensorRT is not installed")


def test_a_plan_is_never_handed_to_the_other_library():
    with pytest.raises(LibraryError) as info:
        library_for_plan(EngineMetadata.from_dict(RTX_DEFAULT), "tensorrt", "engine.plan")
    assert str(info.value) == (
        "engine.plan was built with TensorRT-RTX 1.7.1.116 and cannot run with TensorRT (a plan runs only with the "
        "library that built it): rebuild it with pid-export --trt tensorrt, or use TensorRT-RTX")
    with pytest.raises(LibraryError, match="built with TensorRT 10.14.1.48 and cannot run with TensorRT-RTX"):
        library_for_plan(EngineMetadata.from_dict(BUILT_HERE), "rtx", "engine.plan")
    old = {"tensorrt_version": "10.14.1.48"}  # older sidecars: enterprise TensorRT
    with pytest.raises(LibraryError, match="built with TensorRT 10.14.1.48 and cannot run with TensorRT-RTX"):
        library_for_plan(EngineMetadata.from_dict(old), "rtx", "engine.plan")


def _backend_error(tmp_path: Path, sidecar: dict) -> str:
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"vtrt" + bytes(200))
    (tmp_path / "engine.json").write_text(json.dumps(sidecar))
    with pytest.raises(BackendError) as info:
        TensorRTBackend(plan, _metadata())
    assert "\n" not in str(info.value)
    return str(info.value)


@no_enterprise_tensorrt
def test_enterprise_plan_where_enterprise_is_absent_is_refused_with_one_line(tmp_path):
    message = _backend_error(tmp_path, BUILT_HERE)
    assert message.startswith("engine.plan was built with TensorRT 10.14.1.48, which is not usable here (TensorRT is "
                              "not installed")
    assert message.endswith("(pid-run can run the export directory's model.onnx with ONNX Runtime instead)")


@needs_rtx
@no_gpu
def test_rtx_plan_without_a_gpu_says_so_and_points_to_onnx(tmp_path):
    assert _backend_error(tmp_path, RTX_DEFAULT) == (
        "TensorRT-RTX runs engines on a CUDA GPU and none is visible (pid-run can run the export directory's "
        "model.onnx with ONNX Runtime instead)")


def test_backend_refuses_a_file_that_is_not_a_plan(tmp_path):
    (tmp_path / "engine.plan").write_text(json.dumps({"profile": {}}))
    with pytest.raises(BackendError, match=r"is a JSON file, not a TensorRT engine plan"):
        TensorRTBackend(tmp_path / "engine.plan", _metadata())
    (tmp_path / "empty.engine").write_bytes(b"")
    with pytest.raises(BackendError, match=r"is empty, not a TensorRT engine"):
        TensorRTBackend(tmp_path / "empty.engine", _metadata())


def test_compute_capability_lists():
    assert parse_compute_capabilities("8.9,12.0") == ("8.9", "12.0")
    assert parse_compute_capabilities("89, 120") == ("8.9", "12.0")
    assert parse_compute_capabilities("sm86,SM_89,8.6") == ("8.6", "8.9")
    for bad in ("", "ampere", "8", "8.9.1", "123.4"):
        with pytest.raises(EngineError):
            parse_compute_capabilities(bad)


@needs_rtx
@no_gpu
def test_build_targets_cpu_only_and_restricted_for_hardware_specific_graphs():
    from pid_export.engine import build_target
    from pid_export.pipeline import EngineOptions, PipelineError, check_engine_options

    default = build_target("rtx")
    assert (default.compute_capabilities, default.source, default.on_gpu) == (
        ("8.0", "8.6", "8.9", "12.0+"), "library default", False)
    # What the demo and --verify ask before any work: no GPU here, so no engine of any target runs here.
    assert default.why_it_cannot_run_here() == "TensorRT-RTX runs engines on a CUDA GPU and none is visible"
    fp8 = build_target("rtx", ("8.9", "12.0"))
    assert (fp8.rtx_targets, fp8.source) == (("SM89", "SM120"), "--compute-capability")
    # FP8 (what the export checks before any work): Ada + Blackwell by default, older targets refused.
    assert check_engine_options(EngineOptions(library="rtx"), "fp8").rtx_targets == ("SM89", "SM120")
    assert check_engine_options(EngineOptions(library="rtx", compute_capabilities=("12.0",)), "fp8").rtx_targets == (
        "SM120",)
    with pytest.raises(PipelineError, match=r"FP8 needs Ada or newer .* 8\.6"):
        check_engine_options(EngineOptions(library="rtx", compute_capabilities=("8.9", "8.6")), "fp8")
    assert check_engine_options(EngineOptions(library="rtx"), "bf16").source == "library default"
    with pytest.raises(EngineError, match="--strip-weights with TensorRT-RTX needs a CUDA GPU at build time"):
        build_target("rtx", strip_weights=True)


# ---------------------------------------------------------------------------
# Device discipline (issue 10): every TensorRTBackend method that enqueues CUDA work or
# allocates makes the backend's device current. Without a second GPU this can only be
# checked structurally; running on cuda:1 is unverified here.

DEVICE_METHODS = ("bind", "velocity", "sample", "close")


def test_backend_methods_that_touch_the_gpu_run_on_its_device():
    for name in DEVICE_METHODS:
        assert getattr(getattr(TensorRTBackend, name), "runs_on_own_device", False), name
    # ... and nothing else in the class launches work outside them: every torch.cuda / context
    # call sits in one of those methods, in __init__ (inside `with torch.cuda.device(dev)`) or
    # in a helper only they call.
    source = Path(sys.modules[TensorRTBackend.__module__].__file__).read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TensorRTBackend")
    callers: dict[str, set[str]] = {}
    for method in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(method):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                callers.setdefault(node.attr, set()).add(method.name)
    helpers = {"_allocate", "_execute", "_save_runtime_cache"}
    for helper in helpers:
        assert callers[helper] <= set(DEVICE_METHODS) | helpers, (helper, callers[helper])
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    device_block = next(n for n in ast.walk(init) if isinstance(n, ast.With)
                        and "torch.cuda.device" in ast.unparse(n.items[0].context_expr))
    inside = ast.unparse(device_block)
    for call in ("deserialize_cuda_engine", "_create_context", "torch.cuda.Stream"):
        assert call in inside, call


# ---------------------------------------------------------------------------
# Static typing against tensorrt-stubs (the CI check for this layer)

TYPED_MODULES = ("pid_export.engine", "pid_export.engine_profiles", "pid_runtime.backends.tensorrt",
                 "pid_runtime.trt_library", "pid_runtime.trt_plan", "pid_runtime.cuda_graph",
                 "pid_runtime.engine_metadata")
# Proves the check is real: these two lines must be flagged, so the stubs and
# pid_runtime were both resolved (not silently treated as Any).
CANARY = '''import tensorrt as trt
from pid_runtime.trt_library import normalise_choice

def f() -> None:
    trt.Builder()
    normalise_choice(3)
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

def _engines_run_here() -> tuple[bool, str]:
    usable, line = tensorrt_status()
    if not usable:
        return False, line
    why = why_engines_cannot_run_here(select_library())
    return why is None, why or line


TRT_USABLE, TRT_REASON = _engines_run_here()
needs_engine_gpu = pytest.mark.skipif(not TRT_USABLE, reason=f"needs a TensorRT library and a CUDA GPU that runs "
                                                             f"its engines: {TRT_REASON}")
CASE = "tiny_v1_16ch_sr4"  # 16-ch latent, 32 px per latent cell, 64x96 output, text length 12
# Relative error vs the fp32 golden velocity; bf16 has 8 mantissa bits, fp16 11.
TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 5e-3}


def _golden_net_and_tensors():
    return golden_net(CASE), golden_tensors(CASE)


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def tiny_engine(request, export_root, tmp_path_factory):  # noqa: F811
    """(precision, dir with engine.plan) for the golden case (cached export), profile 32x32 .. 128x128, batch 1..2."""
    if not TRT_USABLE:
        pytest.skip(f"needs a TensorRT library and a CUDA GPU that runs its engines: {TRT_REASON}")
    precision = request.param
    cfg = PidConfig.from_dict(json.loads((GOLDEN / f"{CASE}.json").read_text())["network"])
    profile = EngineProfile.for_config(cfg, (32, 32), (64, 96), (128, 128), max_batch=2, min_text_length=1)
    out = _export_with_engine(tmp_path_factory.mktemp(f"engine-{precision}") / "export", profile, precision,
                              workspace_gb=2)
    return precision, out


def _export_with_engine(dest: Path, profiles, precision: str = "fp32", **options) -> Path:
    """A private copy of CASE's shared export at `dest`, with an engine of `profiles` built into it."""
    from pid_export.engine import build_engine

    out = private_export(CASE, dest, precision)
    build_engine(out / "model.onnx", out, profiles, log=lambda m: None, **options)
    return out


def _bind_golden(backend: TensorRTBackend, g: dict) -> None:
    dev = backend.device
    backend.bind(g["y"].to(dev), g["lq_latent"].to(dev), g["degrade_sigma"].to(dev),
                 g["x"].shape[2], g["x"].shape[3])


@pytest.mark.tensorrt
@needs_engine_gpu
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
@needs_engine_gpu
def test_engine_sidecar_describes_the_build(tiny_engine):
    precision, out = tiny_engine
    meta = json.loads((out / "engine.json").read_text())
    lib = select_library()
    assert (meta["library"], meta["library_version"]) == (lib.key, lib.module.__version__)
    if meta["library"] == "tensorrt":  # built on this GPU, kernels timed here
        major, minor = torch.cuda.get_device_capability()
        assert meta["compute_capabilities"] == [f"{major}.{minor}"]
        assert (out / "timing.cache").stat().st_size > 0
    assert meta["precision"] == precision
    assert meta["stripped"] is False
    assert [t["name"] for t in meta["inputs"]] == ["x", "t", "y", "lq_latent", "degrade_sigma"]
    assert meta["profiles"][0]["shapes"]["x"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 96],
                                                  "max": [2, 3, 128, 128]}
    data = b"".join(p.read_bytes() for p in sorted(out.glob("model.onnx*")))
    assert meta["onnx_sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.tensorrt
@needs_engine_gpu
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
@needs_engine_gpu
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
@needs_engine_gpu
def test_plan_from_another_tensorrt_or_gpu_is_refused_not_crashed(tiny_engine, tmp_path):
    _, out = tiny_engine
    rtx = json.loads((out / "engine.json").read_text())["library"] == "rtx"
    # A sidecar claiming targets no GPU has: refused from the sidecar, before the plan is read.
    cases = [("compute_capabilities", ["1.0"], "engine plan targets compute capability 1.0" if rtx else
              "engine plan was generated on an incompatible device")]
    if not rtx:
        # Enterprise plans run only with the exact library version, checked from the sidecar.
        # (A TensorRT-RTX plan's version is checked by get_engine_validity on the plan header,
        # which no sidecar edit changes: that refusal needs a plan from another release.)
        cases.append(("library_version", "9.0.0.1", "engine plan is not compatible with this version of TensorRT"))
    for field, value, sentence in cases:
        copy = tmp_path / field
        shutil.copytree(out, copy)
        meta = json.loads((copy / "engine.json").read_text())
        meta[field] = value
        if field == "compute_capabilities":
            meta["compute_capabilities_source"] = "--compute-capability"  # an explicit list, not the defaults
        (copy / "engine.json").write_text(json.dumps(meta))
        with pytest.raises(BackendError, match=sentence):
            TensorRTBackend(copy / "engine.plan")
    garbage = tmp_path / "garbage"
    shutil.copytree(out, garbage)
    (garbage / "engine.json").unlink()
    (garbage / "engine.plan").write_bytes(b"ftrt" + bytes(4096))
    with pytest.raises(BackendError, match="could not be loaded as a TensorRT|cannot run here: the file is damaged"):
        TensorRTBackend(garbage / "engine.plan")


@pytest.mark.tensorrt
@needs_engine_gpu
def test_verify_engine_against_pytorch(tiny_engine):
    from pid_export.verify import require_passed, verify_engine

    precision, out = tiny_engine
    net, _ = _golden_net_and_tensors()
    results = verify_engine(out, net=net, log=lambda m: None)
    assert [r.x_shape for r in results] == [[1, 3, 32, 32], [1, 3, 64, 96], [2, 3, 128, 128]]  # min, opt, max
    assert all(r.finite and r.rel_error < TOLERANCE[precision] for r in results)
    require_passed(results)


@pytest.mark.tensorrt
@needs_engine_gpu
def test_verify_runs_a_size_two_profiles_share_in_each_of_them(export_root, tmp_path):  # noqa: F811
    from pid_export.verify import require_passed, verify_engine, verify_inputs

    net, _ = _golden_net_and_tensors()
    small = EngineProfile.for_config(net.cfg, (32, 32), (64, 64), (96, 96))
    large = EngineProfile.for_config(net.cfg, (32, 32), (128, 128), (160, 160))  # shares its min, 32x32
    out = _export_with_engine(tmp_path / "export", [small, large])
    results = verify_engine(out, net=net, log=lambda m: None)
    assert [r.label for r in results] == [f"{p} of profile {i}" for i in (1, 2) for p in ("min", "opt", "max")]
    require_passed(results)
    backend = TensorRTBackend(out / "engine.plan")

    def bind(height: int, width: int, profile: int) -> None:
        inputs = verify_inputs(large.to_dict(), 1, height, width)
        backend.bind(inputs["y"].cuda(), inputs["lq_latent"].cuda(), inputs["degrade_sigma"].cuda(), height, width,
                     profile=profile)

    with pytest.raises(BackendError, match="optimization profile 1: output size 128x128 is outside"):
        bind(128, 128, profile=0)  # profile 2's opt, beyond profile 1
    bind(32, 32, profile=1)
    backend.close()


@pytest.mark.tensorrt
@needs_engine_gpu
def test_fp32_engine_verifies_against_onnx_runtime_and_weightless_plan_refits(export_root, tmp_path):  # noqa: F811
    from pid_export.verify import verify_engine

    net, g = _golden_net_and_tensors()
    profile = EngineProfile.for_config(net.cfg, (32, 32), (64, 96), (128, 128))
    out = _export_with_engine(tmp_path / "export", profile, strip_weights=True)
    assert json.loads((out / "engine.json").read_text())["stripped"] is True
    results = verify_engine(out, log=lambda m: None)  # ONNX Runtime on model.onnx
    assert all(r.reference.startswith("ONNX Runtime") and r.rel_error < TOLERANCE["fp32"] for r in results)
    backend = TensorRTBackend(out / "engine.plan")  # refits the weights from model.onnx
    _bind_golden(backend, g)
    v = backend.velocity(g["x"].to(backend.device), g["t"].to(backend.device))
    assert rel_err(v, g["velocity"]) < TOLERANCE["fp32"]
