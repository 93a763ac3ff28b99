"""What one `pid-export` run is asked to do: the export request and its engine options.

Typed records only (no logic): the CLI and the demo fill them in, `pipeline.run_export`
carries out a request, `engine_plan.plan_engine` reads its engine part once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import PidConfig
from .engine_profiles import HW, ProfileSpec
from .releases import Release

if TYPE_CHECKING:  # fp8_export imports torch and onnx; a request is made before either is needed
    from .fp8_export import Fp8Options


@dataclass
class EngineOptions:
    min_hw: HW | None = None
    opt_hw: HW | None = None
    max_hw: HW | None = None
    max_batch: int = 1
    profiles: list[ProfileSpec] | None = None  # --profiles; None: the release's default
    library: str | None = None  # "tensorrt" | "rtx" | "auto"; None: $PID_TRT, else auto
    compute_capabilities: tuple[str, ...] | None = None  # TensorRT-RTX targets; None: its defaults
    workspace_gb: float | None = None
    strip_weights: bool = False
    verify: bool = False


@dataclass
class ExportRequest:
    """One `pid-export` run: what to export, where, and which optional steps to take."""

    network: PidConfig
    out_dir: Path
    release: Release | None = None  # a registry release (None for a custom network)
    checkpoint: Path | None = None  # None: the release's hub file
    precision: str = "bf16"
    static_shape: tuple[int, int, int] | None = None
    onnx_only: bool = False
    require_engine: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)
    allow_lint_problems: bool = False
    empty_caption: bool = True
    caption_model: str | None = None
    download_caption_model: bool = True  # fetch a hub caption model that is not cached (unless offline)
    fp8: "Fp8Options | None" = None  # for precision "fp8" (None: its defaults)
