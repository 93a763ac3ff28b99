"""engine.json as a typed record (runtime/engine_metadata.py): checked on load, file names
kept inside the export directory, written by the build and read back the same."""

from __future__ import annotations

import json

import pytest

from pid_runtime.backends.base import BackendError
from pid_runtime.backends.tensorrt import load_engine_metadata, why_plan_cannot_run_here
from pid_runtime.engine_metadata import EngineMetadata, EngineMetadataError

SIDECAR = {"format": 2, "library": "rtx", "library_version": "1.7.1.116", "compute_capabilities": ["8.9", "12.0"],
           "compute_capabilities_source": "--compute-capability", "precision": "bf16", "onnx_name": "model.onnx",
           "stripped": False, "profiles": [{"min_hw": [32, 32], "opt_hw": [64, 96], "max_hw": [128, 128],
                                            "min_batch": 1, "opt_batch": 1, "max_batch": 2, "text_length": 12}]}


def _write(tmp_path, data) -> object:
    (tmp_path / "engine.plan").write_bytes(b"ftrt" + bytes(64))
    (tmp_path / "engine.json").write_text(json.dumps(data))
    return tmp_path / "engine.plan"


def test_sidecar_round_trips_through_save_and_load(tmp_path):
    meta = EngineMetadata.from_dict(SIDECAR)
    meta.save(tmp_path / "engine.json")
    assert EngineMetadata.load(tmp_path / "engine.json") == meta
    assert meta.compute_capabilities == ["8.9", "12.0"] and not meta.targets_library_defaults
    assert [p.name for p in tmp_path.iterdir()] == ["engine.json"]  # no temp file left


@pytest.mark.parametrize("field, value, words", [
    ("stripped", "yes", "stripped must be true or false"),
    ("compute_capabilities", "8.9", "compute_capabilities must be a list"),
    ("format", "2", "format must be an integer"),
    ("profiles", [{"min_hw": [32]}], "profiles[0].min_hw must be [height, width]"),
    ("profiles", [{"max_batch": 0}], "profiles[0].max_batch must be a positive integer"),
    ("onnx_name", "../other/model.onnx", "onnx_name must be a file name inside the export directory"),
    ("onnx_name", "/etc/passwd", "onnx_name must be a file name inside the export directory"),
    ("library_version", 1.7, "library_version must be a string"),
])
def test_a_wrong_value_is_one_line_naming_field_and_file(tmp_path, field, value, words):
    plan = _write(tmp_path, dict(SIDECAR, **{field: value}))
    with pytest.raises(EngineMetadataError) as info:
        load_engine_metadata(plan)
    message = str(info.value)
    assert words in message and str(tmp_path / "engine.json") in message and "\n" not in message
    assert issubclass(EngineMetadataError, BackendError)
    assert words in why_plan_cannot_run_here(plan)  # pid-run's preflight says the same line


def test_format_1_sidecars_read_into_the_same_record():
    old = EngineMetadata.from_dict({"tensorrt_version": "10.14.1.48", "compute_capability": "9.0",
                                    "profile": SIDECAR["profiles"][0]})
    assert (old.library, old.library_version, old.compute_capabilities) == ("tensorrt", "10.14.1.48", ["9.0"])
    assert old.profiles == SIDECAR["profiles"]


def test_the_sidecar_of_a_plan_built_here_loads(tmp_path):
    """What pid_export.engine writes is what the runtime reads (TensorRT-RTX, CPU-only build)."""
    from pid_runtime.trt_library import problem_of

    if problem_of("rtx") is not None:
        pytest.skip(f"needs TensorRT-RTX: {problem_of('rtx')}")
    import onnx
    from onnx import TensorProto, helper

    from pid_export.engine import EngineProfile, build_engine

    # The smallest graph with PiD's inputs and output: velocity = x (the others unused but bound).
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"]),
              helper.make_tensor_value_info("t", TensorProto.FLOAT, ["b"]),
              helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "l", 8]),
              helper.make_tensor_value_info("lq_latent", TensorProto.FLOAT, ["b", 4, "lh", "lw"]),
              helper.make_tensor_value_info("degrade_sigma", TensorProto.FLOAT, ["b"])]
    output = helper.make_tensor_value_info("velocity", TensorProto.FLOAT, ["b", 3, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["velocity"])], "pid", inputs, [output])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    profile = EngineProfile(latent_channels=4, pixel_scale=16, txt_dim=8, min_hw=(16, 16), opt_hw=(32, 32),
                            max_hw=(64, 64), text_length=6)
    plan = build_engine(tmp_path / "model.onnx", tmp_path, profile, library="rtx", log=lambda m: None)
    meta = load_engine_metadata(plan)
    assert meta is not None and meta.library == "rtx" and meta.onnx_name == "model.onnx"
    assert meta.profiles[0]["as_built"]["y"] == [[1, 1, 8], [1, 6, 8], [1, 6, 8]]
    assert meta == EngineMetadata.from_dict(json.loads((tmp_path / "engine.json").read_text()))
