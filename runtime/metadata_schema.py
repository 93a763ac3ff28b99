"""The schema of pid_export.json: every field's type and range, checked when an export is opened.

A wrong value is one line naming the field and the file, instead of a TypeError (or a
misleading "16 channels but this model takes 16-channel latents") deep in a decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


class MetadataError(ValueError):
    pass


PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "unknown")


def plain_file_name(value: Any, field_name: str, path: Path | str) -> str:
    """A sidecar's file name must be a plain name inside the export directory (no '/', no '..')."""
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value \
            or value.startswith("~") or "\0" in value:
        raise MetadataError(f"{path}: field '{field_name}' must be a plain file name inside the export directory, "
                            f"got {value!r}")
    return value


Check = Callable[[Any], str | None]  # None: fine; else what the value should be


def _positive_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else "a positive integer"


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _of_type(kind: type | tuple[type, ...], text: str) -> Check:
    return lambda value: None if isinstance(value, kind) and not isinstance(value, bool) else text


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _size(value: Any) -> str | None:
    ok = isinstance(value, list) and len(value) == 2 and all(_positive_int(v) is None for v in value)
    return None if ok else "[height, width], two positive integers"


def _sizes(value: Any) -> str | None:
    ok = isinstance(value, list) and all(_size(v) is None for v in value)
    return None if ok else "a list of [height, width] pairs of positive integers"


def _precision(value: Any) -> str | None:
    return None if value in PRECISIONS else f"one of {', '.join(PRECISIONS)}"


def _io_specs(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, dict) and isinstance(v.get("name", ""), str) for v in value)
    return None if ok else "a list of {name, dtype, shape} objects"


def _graph_limits(value: Any) -> str | None:
    names = ("max_batch", "max_latent_side", "max_patches_side")
    ok = isinstance(value, dict) and set(value) == set(names) and all(_positive_int(value[n]) is None for n in names)
    return None if ok else "{" + ", ".join(f'"{n}": positive integer' for n in names) + "}"


def _variant_sides(value: Any) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) and _size(v) is None and v[0] <= v[1]
                                         for k, v in value.items())
    return None if ok else "{variant: [shortest side, longest side]}, positive integers, shortest first"


FIELDS: dict[str, Check] = {
    "release": _optional(_of_type(str, "a release name (string) or null")),
    "latent_channels": _positive_int,
    "latent_down_factor": _positive_int,
    "sr_factor": _positive_int,
    "txt_embed_dim": _positive_int,
    "txt_max_length": _positive_int,
    "precision": _precision,
    "trained_sizes": _sizes,
    "min_size": _optional(_size),
    "max_size": _optional(_size),
    "any_output_size": _bool,
    "opset": _optional(_positive_int),
    "network": _of_type(dict, "an object"),
    "checkpoint_sha256": _optional(_of_type(str, "a hex string or null")),
    "versions": _of_type(dict, "an object"),
    "inputs": _io_specs,
    "outputs": _io_specs,
    "quantization": _optional(_of_type(dict, "an object or null")),
    "accuracy_guard": _optional(_of_type(dict, "an object or null")),
    "graph_limits": _optional(_graph_limits),
    "backbone": _optional(_of_type(str, "a backbone name (string) or null")),
    "variant": _optional(_of_type(str, "a variant name (string) or null")),
    "variant_sides": _variant_sides,
}
# Network fields the runtime reads (the rest only documents the export).
NETWORK_FIELDS: dict[str, Check] = {"patch_size": _positive_int}
FILE_NAME_SUFFIX = "_file"  # any field named like this holds a file of the export directory


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_model_metadata(data: dict[str, Any], path: Path | str) -> None:
    """Raise MetadataError for the first field of `data` (pid_export.json's fields) that breaks the schema."""
    for name, check in FIELDS.items():
        if name in data and (want := check(data[name])) is not None:
            raise MetadataError(f"{path}: field '{name}' must be {want}, got {_shown(data[name])}")
    for name, check in NETWORK_FIELDS.items():
        network = data.get("network") or {}
        if name in network and (want := check(network[name])) is not None:
            raise MetadataError(f"{path}: field 'network.{name}' must be {want}, got {_shown(network[name])}")
    for section in ("quantization", "accuracy_guard"):
        for key, value in (data.get(section) or {}).items():
            if key.endswith(FILE_NAME_SUFFIX) and value is not None:
                plain_file_name(value, f"{section}.{key}", path)
    min_size, max_size = data.get("min_size"), data.get("max_size")
    if (min_size is None) != (max_size is None):
        raise MetadataError(f"{path}: fields 'min_size' and 'max_size' must both be given or both be null")
    if min_size is not None and max_size is not None and not (min_size[0] <= max_size[0] and min_size[1] <= max_size[1]):
        raise MetadataError(f"{path}: field 'min_size' {min_size} is larger than 'max_size' {max_size}")
