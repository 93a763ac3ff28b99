"""`pid-export --precision fp8`: calibrate, export, quantise, guard; the pipeline's FP8 step.

    1. calibration data: --calibration DIR (held-out part split off) or the synthetic set
    2. max calibration of the float32 network (4-step decodes) + float32 reference decodes
       of the held-out inputs
    3. base-precision (bf16 / fp16) ONNX export, as `--precision bf16` writes it
    4. FP8 Q/DQ rewrite of that graph (fp8.py), checked and linted
    5. accuracy guard (accuracy_guard.py): FP8 and base graphs vs float32 on the held-out inputs
Everything is written in a staging directory beside `out_dir` and moved into place
only after the guard passed (or `accept_accuracy_loss`): a failed guard leaves nothing.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from pid_runtime.metadata import MODEL_METADATA, ONNX_NAME, ModelMetadata

from . import calibration as cal
from .accuracy_guard import GuardThresholds, run_guard
from .fp8 import (BASE_PRECISIONS, QuantizationError, attention_module_names, qdq_counts, quantize_onnx,
                  quantized_layer_names)
from .load_step import LoadedNetwork
from .releases import Release
from .stages import PipelineError, Stages, silent_stages


@dataclass
class Fp8Options:
    base: str = "bf16"  # precision of everything not quantised
    attention: bool = False  # experimental FP8 attention (Q/DQ on Q, K, V)
    thresholds: GuardThresholds = field(default_factory=GuardThresholds)
    accept_accuracy_loss: bool = False
    items: cal.ItemSettings = field(default_factory=cal.ItemSettings)  # what calibrates and guards (--calibration)


def export_fp8(loaded: LoadedNetwork, out_dir: Path, release: Release | None, options: Fp8Options, *,
               static_shape: tuple[int, int, int] | None = None, allow_lint_problems: bool = False,
               stages: Stages | None = None):
    """The FP8 export of `loaded.net` (float32; cast in place to the base precision) written into
    `out_dir`, an empty directory: pid-export's staging directory (pipeline.run_export)."""
    from .onnx_export import ExportError, ExportResult, export_onnx
    from .onnx_lint import lint_model

    stages = stages or silent_stages()
    if options.base not in BASE_PRECISIONS:
        raise PipelineError(f"--fp8-base must be one of {', '.join(BASE_PRECISIONS)}, got {options.base}")
    start = time.perf_counter()
    net, cfg = loaded.net, loaded.net.cfg
    device = cal.default_device()
    settings = options.items
    # The layers the quantiser will quantise are the ones calibration records.
    layers = quantized_layer_names(net)
    attention_modules = attention_module_names(net) if options.attention else ()
    try:
        with stages("preparing FP8 calibration data"):
            calibration, held_out, held_source = cal.prepare_items(cfg, release, settings, device, stages.detail,
                                                                   static_shape)
        with stages(f"calibrating FP8 scales on {device.type.upper()} (float32 network, 4-step decodes)"):
            net.to(device)
            recorder = cal.calibrate(net, cfg, calibration, layers, attention_modules, seed=settings.seed,
                                     device=device, log=stages.detail)
            references = cal.reference_images(net, cfg.pixel_scale, held_out, settings.seed + 1000, device,
                                          log=stages.detail)
            net.to("cpu")
    except cal.CalibrationError as exc:
        raise PipelineError(str(exc)) from None

    stage = out_dir / ".fp8-work"  # scratch inside the caller's staging directory
    stage.mkdir(parents=True)
    try:
        base_dir, fp8_dir = stage / "base", stage / "fp8"
        with stages(f"exporting the {options.base} graph"):
            try:
                base = export_onnx(net, base_dir, options.base, release=release, checkpoint_sha256=loaded.sha256,
                                   static_shape=static_shape, progress=stages.detail,
                                   require_lint_clean=not allow_lint_problems)
            except ExportError as exc:
                raise PipelineError(str(exc)) from None
        with stages("inserting FP8 Q/DQ" + (" (with experimental FP8 attention)" if options.attention else "")):
            fp8_dir.mkdir()
            try:
                summary = quantize_onnx(base.onnx_path, fp8_dir / ONNX_NAME, recorder.amax, options.base,
                                        recorder.attention if options.attention else None)
            except QuantizationError as exc:
                raise PipelineError(f"FP8 quantisation failed: {exc}") from None
            onnx_path = fp8_dir / ONNX_NAME
            onnx.checker.check_model(str(onnx_path), full_check=False)
            onnx.shape_inference.infer_shapes_path(str(onnx_path), str(onnx_path))
            graph = onnx.load(str(onnx_path), load_external_data=False)
            lint = lint_model(graph, expected_attention=cfg.patch_depth + cfg.pixel_depth)
            counts = qdq_counts(graph)
            del graph
            if not allow_lint_problems and not lint.ok:
                raise PipelineError(f"the FP8 graph is not TensorRT-ready: {'; '.join(lint.problems)}")
            summary.calibration = {
                "method": "max (amax) per tensor, 4-step decodes of the float32 network",
                "items": [item.describe(cfg.pixel_scale) for item in calibration],
                "source": str(settings.calibration_dir) if settings.calibration_dir else "synthetic",
                "device": device.type,
            }
            stages.detail(f"{len(summary.layers)} layers in FP8 ({summary.fp8_weight_bytes / 1e6:.1f} MB of FP8 "
                          f"weights); {counts['QuantizeLinear']} QuantizeLinear, {counts['DequantizeLinear']} "
                          "DequantizeLinear")
        with stages("accuracy guard: FP8 and " + options.base + " graphs vs float32 on held-out inputs"):
            report = run_guard(onnx_path, base.onnx_path, options.base, held_out, references, cfg.pixel_scale,
                               options.thresholds, settings.seed + 1000, held_out=held_source, log=stages.detail)
            stages.detail(report.summary())
            if not report.passed:
                if not options.accept_accuracy_loss:
                    raise PipelineError(f"FP8 accuracy guard failed: {'; '.join(report.problems)} "
                                        "(nothing written; --accept-accuracy-loss keeps it anyway)")
                report.accepted_loss = True
                stages.detail(f"WARNING: accuracy guard failed ({'; '.join(report.problems)}); "
                              "kept because of --accept-accuracy-loss")
        meta = dataclasses.replace(base.metadata, precision="fp8", quantization=summary.to_dict(),
                                   accuracy_guard=report.to_dict())
        meta.save(fp8_dir / MODEL_METADATA)
        for path in fp8_dir.iterdir():
            path.rename(out_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportResult(out_dir, out_dir / ONNX_NAME, meta, lint, time.perf_counter() - start)


def read_guard_report(export_dir: Path) -> dict[str, Any] | None:
    return ModelMetadata.load(Path(export_dir) / MODEL_METADATA).accuracy_guard
