"""The export pipeline: checkpoint -> PidNet -> ONNX -> TensorRT engine -> verify.

`run_export` carries out one `pid-export` request; the demo and the benchmarks use its
steps on their own. The request flows down once, each step in its own module:

    plan     engine_plan.plan_engine   library, targets and profiles, or why no engine (cheap,
                                       before any slow work: option mistakes fail here)
    staging  staging.py                a foreign --out refused; everything written into a
                                       staging directory that replaces the export at the end
    load     load_step.load_network    checkpoint (path or hub) -> verified float32 PidNet
    export   onnx_step.export_network  PidNet -> ONNX export directory (fails on TensorRT lint
             (fp8_export.export_fp8    problems); --precision fp8: calibrate, quantise, guard)
    caption  caption_export            the unconditional caption embedding, when an encoder is available
    build    engine_step.build_and_verify  engine.plan as planned (+ --verify against float32)

Each step prints numbered progress through `stages.Stages` and raises `PipelineError`
with one line the user can act on; callers turn it into their own error output.
Nothing here parses command lines.
"""

from __future__ import annotations

from pathlib import Path

from .caption_export import store_empty_caption
from .engine_plan import (  # re-exported: the engine step's planning, as callers know it
    EnginePlan,
    check_engine_options,
    plan_engine,
    planned_profiles,
    profiles_for,
)
from .engine_step import build_and_verify
from .interrupts import stage_boundary
from .load_step import LoadedNetwork, load_network, reload_float32
from .onnx_step import export_network
from .request import EngineOptions, ExportRequest
from .staging import ExportTransaction, check_output_dir
from .stages import Log, PipelineError, Stages, WriteFailure, one_line_write_errors


def run_export(request: ExportRequest, log: Log) -> Path:
    """Checkpoint -> ONNX -> caption -> engine (-> verify); returns the export directory.

    One transaction (staging.py): everything is written into a staging directory beside
    `request.out_dir`, which replaces it in one rename at the end; until then an earlier
    export there is untouched, and on any failure or signal it stays as it was.
    """
    # Said before minutes of export, and a required engine fails here, not after them.
    plan = plan_engine(request, log)
    if plan is not None and request.precision == "fp32":
        log("note: building an fp32 engine; use --precision bf16 for speed")
    stages = Stages(log)
    with one_line_write_errors(request.out_dir):
        check_output_dir(request.out_dir)  # a foreign --out: one line, before any work
        with ExportTransaction(request.out_dir, log) as transaction:
            stage = transaction.stage
            loaded = load_network(request.network, request.release, request.checkpoint, stages)
            if request.precision == "fp8":
                from .fp8_export import Fp8Options, export_fp8

                export_fp8(loaded, stage, request.release, request.fp8 or Fp8Options(),
                           static_shape=request.static_shape, allow_lint_problems=request.allow_lint_problems,
                           stages=stages)
            else:
                export_network(loaded, stage, request.precision, request.release, request.static_shape,
                               request.allow_lint_problems, stages, in_place=True, shown_as=request.out_dir)
            if request.empty_caption:
                stage_boundary("caption", log)
                store_empty_caption(stage, request.caption_model, notify=stages.detail,
                                    txt_embed_dim=request.network.txt_embed_dim,
                                    download=request.download_caption_model)
            if plan is not None:
                # The export cast the network to its precision: --verify reloads the float32 weights.
                reference = reload_float32(loaded, request.network) if plan.verify else None
                build_and_verify(stage, plan, reference, stages)
            transaction.commit()
    return request.out_dir


__all__ = ["EngineOptions", "EnginePlan", "ExportRequest", "LoadedNetwork", "PipelineError", "Stages",
           "WriteFailure", "build_and_verify", "check_engine_options", "export_network", "load_network",
           "one_line_write_errors", "plan_engine", "planned_profiles", "profiles_for", "reload_float32",
           "run_export"]
