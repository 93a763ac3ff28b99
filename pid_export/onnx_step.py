"""The export's ONNX step (fp32 / fp16 / bf16): a loaded PidNet -> the ONNX export directory.

(`--precision fp8` takes fp8_export.export_fp8 instead: calibrate, export, quantise, guard.)
"""

from __future__ import annotations

from pathlib import Path

from .load_step import LoadedNetwork
from .releases import Release
from .stages import PipelineError, Stages, WriteFailure, silent_stages


def export_network(loaded: LoadedNetwork, out_dir: Path, precision: str, release: Release | None = None,
                   static_shape: tuple[int, int, int] | None = None, allow_lint_problems: bool = False,
                   stages: Stages | None = None, in_place: bool = False, shown_as: Path | None = None):
    """ONNX export directory of `loaded.net` (cast in place to `precision`); returns the ExportResult.

    `in_place`: `out_dir` is the caller's (empty) staging directory, `shown_as` the
    export directory it becomes (what the progress lines name).

    TensorRT lint problems (ops it cannot import, an unfused attention, float64)
    fail the export unless `allow_lint_problems`: an engine built from such a
    graph would fail late or run slowly.
    """
    from .onnx_export import ExportError, export_onnx
    from .progress import PhaseTimer

    stages = stages or silent_stages()
    try:
        with stages(f"exporting ONNX ({precision}) to {shown_as or out_dir}"):
            with PhaseTimer(stages.detail) as phases:  # a heartbeat while tracing; the total split by phase
                result = export_onnx(loaded.net, out_dir, precision, release=release,
                                     checkpoint_sha256=loaded.sha256, static_shape=static_shape,
                                     progress=phases.say, require_lint_clean=not allow_lint_problems,
                                     in_place=in_place)
            stages.detail(phases.summary())
    except ExportError as exc:
        raise PipelineError(str(exc)) from None
    except OSError as exc:
        raise WriteFailure(f"cannot write the export to {shown_as or out_dir}: {exc.strerror or exc}") from None
    stages.detail(f"{result.size_bytes / 1e9:.2f} GB; ops: {result.lint.histogram()}")
    for problem in result.lint.problems:
        stages.detail(f"TensorRT lint (allowed by --allow-lint-problems): {problem}")
    return result
