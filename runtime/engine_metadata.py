"""The engine sidecar `engine.json` (written by `pid_export.engine`, read here).

What a plan was built with: the library and its version, the compute capabilities it
targets, the optimization profiles (as the builder held them), the ONNX it came from.
The runtime reads it before deserialising a plan, to refuse a misfit with one sentence.

Every field is optional on load (sidecars from older builds lack some; a field that is
absent is not checked), but a field that is present must have its type: a wrong one is
one line naming the field and the file. File names in it (`onnx_name`) must be plain
names inside the export directory: a sidecar never makes the runtime read elsewhere.
Format 1 sidecars (before TensorRT-RTX: `tensorrt_version`, one `compute_capability`,
one `profile`) are read into the same record.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .backends.base import BackendError
from .io import atomic_write

ENGINE_METADATA_FORMAT = 2  # 2: library, target compute capabilities, several profiles

# The entries of a profile record that the runtime and verify read, with their types.
_PROFILE_INTS = ("latent_channels", "pixel_scale", "txt_dim", "min_batch", "opt_batch", "max_batch", "text_length")
_PROFILE_SIZES = ("min_hw", "opt_hw", "max_hw")


class EngineMetadataError(BackendError):
    """engine.json is unreadable or holds a wrong value (one line naming the field and file)."""


@dataclass(frozen=True)
class EngineMetadata:
    format: int = 1
    library: str = "tensorrt"  # pid_runtime.trt_library key: "tensorrt" | "rtx"
    library_name: str | None = None
    library_version: str | None = None
    compute_capabilities: list[str] = field(default_factory=list)  # empty: not recorded
    compute_capabilities_source: str = "library default"  # | "--compute-capability" | "build GPU"
    built_on: str | None = None
    gpu_name: str | None = None  # format 1: the build GPU
    precision: str | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)  # EngineProfile records + "as_built"
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    attention_layers: int | None = None
    decomposable_attention_layers: int | None = None
    onnx_name: str = "model.onnx"
    onnx_sha256: str | None = None
    stripped: bool = False
    builder_optimization_level: int | None = None
    workspace_gb: float | None = None
    build_seconds: float | None = None
    created: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "engine metadata") -> "EngineMetadata":
        """The record of a sidecar's JSON object; EngineMetadataError naming `source` and the field."""
        data = dict(data)
        if "library_version" not in data and data.get("tensorrt_version"):  # format 1
            data["library_version"] = data["tensorrt_version"]
        if "compute_capabilities" not in data and data.get("compute_capability"):
            data["compute_capabilities"] = [data["compute_capability"]]
            data.setdefault("compute_capabilities_source", "build GPU")
        if "profiles" not in data and isinstance(data.get("profile"), dict):
            data["profiles"] = [data["profile"]]
        known = {f.name: f for f in fields(cls)}
        values = {}
        for name, value in data.items():
            if name not in known or (value is None and name != "library"):
                continue
            values[name] = _checked(name, value, source)
        if "compute_capabilities" in values:
            values["compute_capabilities"] = [str(cc) for cc in values["compute_capabilities"]]
        return cls(**values)

    @classmethod
    def load(cls, path: Path | str) -> "EngineMetadata":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineMetadataError(f"cannot read engine metadata {path}: {exc}") from None
        if not isinstance(data, dict):
            raise EngineMetadataError(f"engine metadata {path} is not a JSON object")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path | str) -> None:
        """Written whole or not at all (temp name, then rename)."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        atomic_write(Path(path), lambda temp: temp.write_text(text))

    @property
    def targets_library_defaults(self) -> bool:
        return self.compute_capabilities_source == "library default"


def _checked(name: str, value: Any, source: str) -> Any:
    """`value` when it has field `name`'s type (and a file name is a plain name), else the one line."""
    def wrong(expected: str) -> EngineMetadataError:
        return EngineMetadataError(f"engine metadata {source}: {name} must be {expected}, got {value!r:.80}")

    if name in ("format", "attention_layers", "decomposable_attention_layers", "builder_optimization_level"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong("an integer")
    elif name in ("workspace_gb", "build_seconds"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise wrong("a number")
    elif name == "stripped":
        if not isinstance(value, bool):
            raise wrong("true or false")
    elif name == "compute_capabilities":
        if not isinstance(value, list) or not all(isinstance(cc, (str, int, float)) for cc in value):
            raise wrong("a list of compute capabilities like \"8.9\"")
    elif name in ("profiles", "inputs", "outputs"):
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise wrong("a list of objects")
        if name == "profiles":
            for index, profile in enumerate(value):
                _check_profile(profile, index, source)
    elif name == "onnx_name":
        if not isinstance(value, str) or not is_plain_name(value):
            raise wrong("a file name inside the export directory (no directory part)")
    elif not isinstance(value, str):
        raise wrong("a string")
    return value


def _check_profile(profile: Mapping[str, Any], index: int, source: str) -> None:
    for key in _PROFILE_INTS:
        value = profile.get(key)
        if key in profile and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise EngineMetadataError(f"engine metadata {source}: profiles[{index}].{key} must be a positive "
                                      f"integer, got {value!r:.80}")
    for key in _PROFILE_SIZES:
        value = profile.get(key)
        if key in profile and not (isinstance(value, list) and len(value) == 2
                                   and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise EngineMetadataError(f"engine metadata {source}: profiles[{index}].{key} must be [height, width], "
                                      f"got {value!r:.80}")


def is_plain_name(name: str) -> bool:
    """A file name with no directory part: it can only name a file beside the sidecar."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


__all__ = ["ENGINE_METADATA_FORMAT", "EngineMetadata", "EngineMetadataError", "is_plain_name"]
