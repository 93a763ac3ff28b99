"""The metadata sidecar of an export directory (written by pid_export, read here).

An export directory holds:
    model.onnx, model.onnx.data   the network (float32 at the boundary)
    pid_export.json               this metadata (MODEL_METADATA)
    engine.plan, engine.json      optional TensorRT engine and its metadata
    empty_caption.npy             optional unconditional caption embedding [1, 300, 2304]
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_METADATA = "pid_export.json"
ENGINE_METADATA = "engine.json"
ONNX_NAME = "model.onnx"
ENGINE_NAME = "engine.plan"
EMPTY_CAPTION_NAME = "empty_caption.npy"

# The network's tensors are declared in signature.py; their names are re-exported here.
from .signature import INPUT_NAMES, OUTPUT_NAMES  # noqa: E402, F401  (re-exported; after the file-name constants)
# The per-field checks (and the error they raise) are the schema's; re-exported here.
from .metadata_schema import PRECISIONS, MetadataError, check_model_metadata, plain_file_name  # noqa: E402, F401


@dataclass
class GraphLimits:
    """What the exported graph itself can take, whatever the release was trained for.

    The dynamic dims are traced with bounds (pid_export.onnx_export: torch.export Dims),
    and the caption's position table holds txt_max_length rows; beyond these the graph
    is not valid, so the runtime refuses such requests before allocating anything.
    """

    max_batch: int  # items per network call
    max_latent_side: int  # latent cells per side (h, w)
    max_patches_side: int  # output patches per side (H / patch_size, W / patch_size)


# Exports made before the limits were recorded were all traced with these bounds.
LEGACY_GRAPH_LIMITS = GraphLimits(max_batch=64, max_latent_side=1024, max_patches_side=1024)


@dataclass
class ModelMetadata:
    """What a runtime needs to know about an exported PiD network."""

    release: str | None  # registry name, None for a custom network
    latent_channels: int
    latent_down_factor: int
    sr_factor: int
    txt_embed_dim: int
    txt_max_length: int
    precision: str  # fp32 | fp16 | bf16 | fp8 (inside the graph; the boundary is float32)
    # Trained output sizes [[H, W], ...] and the range the export is meant for.
    trained_sizes: list[list[int]] = field(default_factory=list)
    min_size: list[int] | None = None  # [H, W]
    max_size: list[int] | None = None
    # True: the graph decodes any output size (multiples of the patch size), not only the
    # latent's native one. Exports made before output sizes were free lack it (False).
    any_output_size: bool = False
    opset: int | None = None
    network: dict[str, Any] = field(default_factory=dict)
    checkpoint_sha256: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    # fp8 only: what was quantised and how (base precision, layers, calibration), and
    # the accuracy guard's report (PSNR / error vs float32 beside the base precision's).
    quantization: dict[str, Any] | None = None
    accuracy_guard: dict[str, Any] | None = None
    # What the graph takes (None: an export made before they were recorded; see `limits`).
    graph_limits: GraphLimits | None = None
    # The release's registry entry, recorded at export time so the runtime needs no registry of
    # its own: backbone and variant (None: a custom network, or an export made before they were
    # recorded), and {variant: [shortest, longest] trained side in px} of every released variant
    # of that backbone, which names the release to use for a size outside this one's range.
    backbone: str | None = None
    variant: str | None = None
    variant_sides: dict[str, list[int]] = field(default_factory=dict)

    @property
    def limits(self) -> GraphLimits:
        return self.graph_limits or LEGACY_GRAPH_LIMITS

    @property
    def patch_size(self) -> int:
        return int(self.network.get("patch_size", 16))

    @property
    def pixel_scale(self) -> int:
        """Output pixels per latent cell: H = h * pixel_scale."""
        return self.latent_down_factor * self.sr_factor

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelMetadata":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MetadataError(f"cannot read model metadata {path}: {exc}") from None
        if not isinstance(data, dict):
            raise MetadataError(f"model metadata {path} is not a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        check_model_metadata(known, path)
        if isinstance(known.get("graph_limits"), dict):
            known["graph_limits"] = GraphLimits(**known["graph_limits"])
        missing = [f.name for f in fields(cls)
                   if f.name not in known and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise MetadataError(f"model metadata {path} is incomplete: no field {', '.join(repr(m) for m in missing)}")
        return cls(**known)
