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
import torch

from pid_runtime.metadata import MODEL_METADATA, ONNX_NAME, ModelMetadata

from . import calibration as cal
from .accuracy_guard import GuardThresholds, reference_images, run_guard
from .fp8 import BASE_PRECISIONS, QuantizationError, qdq_counts, quantize_onnx
from .load_step import LoadedNetwork
from .network import PidNet
from .releases import Release
from .stages import PipelineError, Stages, silent_stages


@dataclass
class Fp8Options:
    base: str = "bf16"  # precision of everything not quantised
    calibration_dir: Path | None = None
    attention: bool = False  # experimental FP8 attention (Q/DQ on Q, K, V)
    thresholds: GuardThresholds = field(default_factory=GuardThresholds)
    accept_accuracy_loss: bool = False
    calibration_items: int = cal.SYNTHETIC_ITEMS
    guard_items: int = cal.GUARD_ITEMS
    max_side: int | None | str = "auto"  # decode size cap in px; "auto": trained sizes on a GPU, 512 on a CPU
    guard_max_side: int | None | str = "auto"  # "auto": trained sizes on a GPU, 256 on a CPU
    seed: int = 0


GUARD_CPU_MAX_SIDE = 256


def _cap(value: int | None | str, device: torch.device, cpu_default: int) -> int | None:
    if value == "auto":
        return None if device.type == "cuda" else cpu_default
    return value  # type: ignore[return-value]


def prepare_items(net: PidNet, release: Release | None, options: Fp8Options, device: torch.device, say,
                  static_shape: tuple[int, int, int] | None = None):
    """(calibration items, held-out items, where the held-out ones came from).

    A static export's items are made at the trained sizes, then reshaped to its inputs."""
    if static_shape is not None:
        options = dataclasses.replace(options, max_side=None, guard_max_side=None)
    calib_side = _cap(options.max_side, device, cal.CPU_MAX_SIDE)
    guard_side = _cap(options.guard_max_side, device, GUARD_CPU_MAX_SIDE)
    net_cfg = net.cfg
    sizes = cal.item_sizes(release, net_cfg)
    scale = net_cfg.pixel_scale
    if options.calibration_dir is not None:
        items = cal.load_calibration_dir(options.calibration_dir, net_cfg)
        calibration, held_out = cal.split_held_out(items)
        calibration = [cal.crop_for(item, scale, calib_side) for item in calibration]
        held_out = [cal.crop_for(item, scale, guard_side) for item in held_out]
        source = f"{len(held_out)} of the {len(items)} items in {options.calibration_dir}"
        say(f"calibration: {len(calibration)} item(s) from {options.calibration_dir}")
    else:
        calibration = cal.synthetic_items(net_cfg, cal.scaled_sizes(sizes, scale, calib_side),
                                          options.calibration_items, seed=options.seed)
        held_out = []
        say(f"calibration: built-in synthetic set ({len(calibration)} items with Gemma-like caption outliers); "
            "your own latents and captions calibrate better: --calibration DIR")
    if not held_out:
        held_out = cal.synthetic_items(net_cfg, cal.scaled_sizes(sizes, scale, guard_side), options.guard_items,
                                       seed=options.seed + 7919, prefix="held-out")
        source = f"{len(held_out)} synthetic item(s), seeds unlike the calibration set's"
    if device.type == "cpu" and (calib_side or guard_side):
        say(f"no GPU: calibrating at <= {calib_side} px and guarding at <= {guard_side} px per side "
            "(trained sizes cost ~45 TFLOP per network call)")
    if static_shape is not None:
        # The static export's size (latents resized by nearest) and caption length (onnx_export's: the maximum).
        _, height, width = static_shape
        latent_size, text_len = (height // scale, width // scale), net_cfg.txt_max_length
        calibration, held_out = ([cal.CalibrationItem(item.name, torch.nn.functional.interpolate(
            item.latents, size=latent_size, mode="nearest"), item.caption[:, :text_len], item.sigma)
            for item in items] for items in (calibration, held_out))
    return calibration, held_out, source


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
    try:
        with stages("preparing FP8 calibration data"):
            calibration, held_out, held_source = prepare_items(net, release, options, device, stages.detail,
                                                               static_shape)
        with stages(f"calibrating FP8 scales on {device.type.upper()} (float32 network, 4-step decodes)"):
            net.to(device)
            recorder = cal.calibrate(net, cfg, calibration, attention=options.attention, seed=options.seed,
                                     device=device, log=stages.detail)
            references = reference_images(net, cfg.pixel_scale, held_out, options.seed + 1000, device,
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
                "source": str(options.calibration_dir) if options.calibration_dir else "synthetic",
                "device": device.type,
            }
            stages.detail(f"{len(summary.layers)} layers in FP8 ({summary.fp8_weight_bytes / 1e6:.1f} MB of FP8 "
                          f"weights); {counts['QuantizeLinear']} QuantizeLinear, {counts['DequantizeLinear']} "
                          "DequantizeLinear")
        with stages("accuracy guard: FP8 and " + options.base + " graphs vs float32 on held-out inputs"):
            report = run_guard(onnx_path, base.onnx_path, options.base, held_out, references, cfg.pixel_scale,
                               options.thresholds, options.seed + 1000, held_out=held_source, log=stages.detail)
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
