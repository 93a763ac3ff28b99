"""pid_export.json has one schema, checked on load: a wrong field is one line naming it and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pid_runtime.metadata import (LEGACY_GRAPH_LIMITS, MODEL_METADATA, GraphLimits, MetadataError, ModelMetadata,
                                  plain_file_name)

GOOD = dict(release=None, latent_channels=16, latent_down_factor=8, sr_factor=4, txt_embed_dim=40,
            txt_max_length=12, precision="fp32", trained_sizes=[[256, 256]], min_size=[128, 128],
            max_size=[1024, 1024], any_output_size=True, opset=23, network={"patch_size": 16},
            graph_limits={"max_batch": 64, "max_latent_side": 1024, "max_patches_side": 1024})


def write(tmp_path: Path, **changes) -> Path:
    path = tmp_path / MODEL_METADATA
    path.write_text(json.dumps({**GOOD, **changes}))
    return path


def test_a_good_file_loads_with_its_limits(tmp_path):
    meta = ModelMetadata.load(write(tmp_path))
    assert meta.graph_limits == GraphLimits(64, 1024, 1024)
    assert meta.latent_channels == 16 and meta.patch_size == 16


def test_an_export_made_before_limits_were_recorded_gets_the_bounds_it_was_traced_with(tmp_path):
    data = dict(GOOD)
    del data["graph_limits"]
    path = tmp_path / MODEL_METADATA
    path.write_text(json.dumps(data))
    assert ModelMetadata.load(path).limits == LEGACY_GRAPH_LIMITS


def test_an_export_made_before_backbone_and_variant_were_recorded_loads_without_them(tmp_path):
    meta = ModelMetadata.load(write(tmp_path, release="PiD_res2k_sr4x_official_flux_distill_4step"))
    assert meta.backbone is None and meta.variant is None and meta.variant_sides == {}


def test_recorded_backbone_variant_and_sides_load_back(tmp_path):
    sides = {"2k": [1536, 2688], "2kto4k": [1536, 4096]}
    meta = ModelMetadata.load(write(tmp_path, backbone="sd3", variant="2k", variant_sides=sides))
    assert (meta.backbone, meta.variant, meta.variant_sides) == ("sd3", "2k", sides)


def test_recorded_limits_are_the_bounds_the_exporter_traces_with():
    from pid_export import onnx_export

    assert LEGACY_GRAPH_LIMITS == GraphLimits(onnx_export.MAX_BATCH, onnx_export.MAX_LATENT, onnx_export.MAX_GRID)


@pytest.mark.parametrize("field, value, want", [
    ("latent_channels", "16", "positive integer"),  # was "16 channels but this model takes 16-channel latents"
    ("latent_channels", 16.0, "positive integer"),
    ("latent_channels", True, "positive integer"),
    ("txt_max_length", -1, "positive integer"),  # was: captions cut silently
    ("txt_max_length", 0, "positive integer"),
    ("sr_factor", 0, "positive integer"),  # was: ZeroDivisionError
    ("latent_down_factor", None, "positive integer"),
    ("txt_embed_dim", [40], "positive integer"),
    ("precision", "fp64", "one of fp32"),
    ("release", 7, "release name"),
    ("trained_sizes", [[256]], "[height, width] pairs"),
    ("min_size", "128x128", "[height, width]"),
    ("max_size", [1024, -1], "[height, width]"),
    ("any_output_size", "yes", "true or false"),
    ("network", [], "an object"),  # was: AttributeError ('list' object has no attribute 'get')
    ("opset", "23", "positive integer"),
    ("inputs", {"x": 1}, "list of"),
    ("graph_limits", {"max_batch": 0, "max_latent_side": 1, "max_patches_side": 1}, "positive integer"),
    ("graph_limits", [64], "positive integer"),
    ("backbone", 3, "backbone name"),
    ("variant", ["2k"], "variant name"),
    ("variant_sides", {"2k": [2688, 1536]}, "shortest first"),  # would name no release for any size
    ("variant_sides", {"2k": [1536]}, "[shortest side, longest side]"),
    ("variant_sides", [[1536, 2688]], "{variant:"),
])
def test_a_wrong_type_or_value_is_one_line_naming_the_field_and_the_file(field, value, want, tmp_path):
    path = write(tmp_path, **{field: value})
    with pytest.raises(MetadataError) as info:
        ModelMetadata.load(path)
    message = str(info.value)
    assert f"'{field}'" in message and str(path) in message and want in message
    assert "\n" not in message


def test_network_patch_size_is_checked(tmp_path):
    with pytest.raises(MetadataError, match=r"'network.patch_size' must be a positive integer"):
        ModelMetadata.load(write(tmp_path, network={"patch_size": "16"}))


def test_size_range_must_be_both_or_neither_and_ordered(tmp_path):
    with pytest.raises(MetadataError, match="both"):
        ModelMetadata.load(write(tmp_path, min_size=None))
    with pytest.raises(MetadataError, match="larger than 'max_size'"):
        ModelMetadata.load(write(tmp_path, min_size=[2048, 2048]))


def test_a_missing_required_field_is_named(tmp_path):
    data = dict(GOOD)
    del data["txt_embed_dim"]
    path = tmp_path / MODEL_METADATA
    path.write_text(json.dumps(data))
    with pytest.raises(MetadataError, match="no field 'txt_embed_dim'"):
        ModelMetadata.load(path)


@pytest.mark.parametrize("text", ["[]", "3", '"a"', "{not json"])
def test_a_file_that_is_not_a_json_object_is_one_line(text, tmp_path):
    path = tmp_path / MODEL_METADATA
    path.write_text(text)
    with pytest.raises(MetadataError) as info:
        ModelMetadata.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", "..", ".", "", "~x",
                                  "a\\b", 3, None])
def test_file_names_must_be_plain_names_inside_the_export(name, tmp_path):
    with pytest.raises(MetadataError, match="plain file name"):
        plain_file_name(name, "onnx_name", tmp_path / "engine.json")


def test_plain_file_names_pass():
    assert plain_file_name("model.onnx", "onnx_name", "engine.json") == "model.onnx"
    assert plain_file_name(".hidden.plan", "x", "engine.json") == ".hidden.plan"


def test_file_names_inside_quantization_records_are_checked(tmp_path):
    with pytest.raises(MetadataError, match="quantization.calibration_file"):
        ModelMetadata.load(write(tmp_path, quantization={"calibration_file": "../../x.npy"}))


def test_saved_metadata_loads_back(tmp_path):
    meta = ModelMetadata.load(write(tmp_path))
    meta.save(tmp_path / "again.json")
    assert ModelMetadata.load(tmp_path / "again.json") == meta
