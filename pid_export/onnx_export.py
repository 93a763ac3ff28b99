"""PidNet -> ONNX with dynamic batch / output size / text length.

The graph: inputs x[B,3,H,W], t[B], y[B,Lt,D], lq_latent[B,C,h,w], degrade_sigma[B]
(float32), output velocity[B,3,H,W] (float32), Lt in 1..txt_max_length. The output
size H, W (multiples of the patch size) and the latent's h, w are independent
dynamic dims: the network aligns the latent to the patch grid itself (native size
H = h * pixel_scale, or any other). Exported with torch's dynamo
exporter at opset 23 so each attention is one `Attention` op (TensorRT's fused
IAttention). The export is written into a staging directory beside `out_dir`
and renamed into place only when complete, so a failed run leaves nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import onnx
import torch

from pid_runtime.metadata import MODEL_METADATA, ONNX_NAME, GraphLimits, ModelMetadata
from pid_runtime.signature import INPUT_NAMES, INPUTS, OUTPUT_NAMES, input_shapes

from .interrupts import stage_boundary
from .network import PidNet
from .onnx_lint import LintReport, lint_model
from .precision import apply_precision
from .releases import Release, is_released, variant_sides
from .staging import staged

OPSET = 23
TRACE_BATCH = 2  # batch 1 (like any size-1 dim) would be specialised by torch.export
TRACE_LATENT = (2, 3)  # latent h, w of the trace inputs: small, non-square, not 0/1
# Patch grid of the trace image: not the latent's native grid (nor a multiple of it), so
# the traced graph cannot have taken a native-size shortcut or tied H, W to h, w.
TRACE_GRID = (5, 7)
MAX_BATCH = 64
MAX_LATENT = 1024
MAX_GRID = 1024  # patches per side (16384 px)

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    pass


@dataclass
class ExportResult:
    out_dir: Path
    onnx_path: Path
    metadata: ModelMetadata
    lint: LintReport
    seconds: float

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.out_dir.iterdir() if f.is_file())


def trace_inputs(net: PidNet, batch: int = TRACE_BATCH, latent_hw: tuple[int, int] = TRACE_LATENT,
                 size: tuple[int, int] | None = None, text_len: int | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random float32 inputs in `signature.INPUTS` order (only the shapes matter for tracing);
    `size` = output (H, W), default the TRACE_GRID patch grid."""
    cfg = net.cfg
    height, width = size or (TRACE_GRID[0] * cfg.patch_size, TRACE_GRID[1] * cfg.patch_size)
    shapes = input_shapes(dict(batch=batch, height=height, width=width,
                               text_len=text_len or min(cfg.txt_max_length, 8), txt_dim=cfg.txt_embed_dim,
                               latent_channels=cfg.lq_latent_channels, latent_h=latent_hw[0], latent_w=latent_hw[1]))
    gen = torch.Generator().manual_seed(seed)
    # Timesteps in [0, 1000) and sigmas in [0, 1) like the sampler's; the rest standard normal.
    scale = {"t": 1000.0, "degrade_sigma": 1.0}
    return tuple(torch.rand(shape, generator=gen) * scale[name] if name in scale
                 else torch.randn(shape, generator=gen) for name, shape in shapes.items())


def dynamic_shapes(net: PidNet) -> dict[str, dict[int, Any]]:
    """torch.export Dims for each input's dynamic axes (`signature.DYNAMIC`), with the graph's bounds."""
    Dim = torch.export.Dim
    patch = net.cfg.patch_size
    # The output size is its own pair of dims (whole patches), not a function of the latent's.
    dims = {
        "batch": Dim("batch", min=1, max=MAX_BATCH),
        "height": Dim("patches_h", min=1, max=MAX_GRID) * patch,
        "width": Dim("patches_w", min=1, max=MAX_GRID) * patch,
        "text_len": Dim("text_len", min=1, max=net.cfg.txt_max_length),
        "latent_h": Dim("latent_h", min=1, max=MAX_LATENT),
        "latent_w": Dim("latent_w", min=1, max=MAX_LATENT),
    }
    return {spec.name: {axis: dims[dim] for axis, dim in spec.dynamic_axes().items()} for spec in INPUTS}


def _io_description(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(values) -> list[dict]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                        "shape": dims})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def _versions() -> dict[str, str]:
    import onnxscript

    from . import __version__

    return {"pid_export": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__}


def _quiet_export(net: PidNet, args: tuple, path: Path, shapes, opset: int):
    """torch.onnx.export (dynamo) without its per-stage chatter; returns the ONNXProgram."""
    import contextlib
    import io
    import logging
    import warnings

    sink = io.StringIO()
    # torch logs one warning per torchvision op it cannot register; irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            net, args, None, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
            dynamic_shapes=shapes, opset_version=opset, dynamo=True, optimize=False, verbose=False,
        )


def export_onnx(net: PidNet, out_dir: str | Path, precision: str = "fp32", *, release: Release | None = None,
                checkpoint_sha256: str | None = None, static_shape: tuple[int, int, int] | None = None,
                opset: int = OPSET, progress: Progress | None = None,
                require_lint_clean: bool = False, float32_residuals: bool | None = None,
                in_place: bool = False) -> ExportResult:
    """Export `net` (cast in place to `precision`) into `out_dir`.

    static_shape=(batch, H, W) exports fixed shapes (faster to export; for
    benchmarks and tests); otherwise batch, H, W and text length are dynamic.
    `release` (a registry entry, optional) supplies the name and trained sizes.
    `require_lint_clean` fails the export (nothing written) on TensorRT lint problems.
    `float32_residuals` overrides the precision policy's residual-stream dtype (precision.py).
    The export is staged beside `out_dir` and renamed into place when complete (staging.py:
    an existing `out_dir` must be an export of this tool); `in_place` writes straight into
    `out_dir`, an empty directory the caller stages itself (pid-export's whole-run stage).
    """
    say = progress or (lambda msg: None)
    out_dir = Path(out_dir)
    cfg = net.cfg
    start = time.perf_counter()
    if static_shape is not None:
        batch, height, width = static_shape
        scale = cfg.pixel_scale
        if height < scale or width < scale or height % scale or width % scale:
            raise ExportError(f"static size {height}x{width} is not a positive multiple of the pixel scale {scale}")
        # Fixed caption length = the network's maximum: what caption files, the unconditional
        # caption and pid-run's encoder give (the caption encoder pads to it).
        args = trace_inputs(net, batch=batch, latent_hw=(height // scale, width // scale), size=(height, width),
                            text_len=cfg.txt_max_length)
        shapes = None
    else:
        args, shapes = trace_inputs(net), dynamic_shapes(net)  # float32 inputs, whatever the precision

    with staged(out_dir, say, in_place) as stage:
        net = apply_precision(net.eval(), precision, float32_residuals)
        metadata, lint = _write_export(net, stage, precision, opset, args, shapes, static_shape, release,
                                       checkpoint_sha256, require_lint_clean, say)
    return ExportResult(out_dir, out_dir / ONNX_NAME, metadata, lint, time.perf_counter() - start)


def _write_export(net: PidNet, stage: Path, precision: str, opset: int, args: tuple, shapes: Any,
                  static_shape: tuple[int, int, int] | None, release: Release | None, checkpoint_sha256: str | None,
                  require_lint_clean: bool, say: Progress) -> tuple[ModelMetadata, LintReport]:
    """model.onnx (+ .data) and pid_export.json into the empty directory `stage`."""
    cfg = net.cfg
    stage_boundary("tracing", say)
    t0 = time.perf_counter()
    say(f"tracing the network ({precision}, opset {opset}, "
        f"{'static ' + 'x'.join(map(str, static_shape)) if static_shape else 'dynamic shapes'})")
    with torch.no_grad():
        program = _quiet_export(net, args, stage / ONNX_NAME, shapes, opset)
    say(f"traced in {time.perf_counter() - t0:.0f} s; folding constants")
    stage_boundary("folding", say)
    import onnxscript.optimizer

    # Constant folding and dead-code removal only: no fusions, so the graph keeps
    # opsets TensorRT 10.14 imports (the default rewriter would emit RMSNormalization).
    onnxscript.optimizer.optimize(program.model)
    onnx_path = stage / ONNX_NAME
    stage_boundary("onnx-write", say)
    t0 = time.perf_counter()
    program.save(str(onnx_path), external_data=True)
    del program
    say(f"wrote {ONNX_NAME} ({_dir_size(stage) / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s; checking")
    onnx.checker.check_model(str(onnx_path), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(onnx_path), str(onnx_path))
    graph = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = _io_description(graph)
    metadata = _metadata(net, release, precision, opset, checkpoint_sha256, static_shape, inputs, outputs)
    lint = lint_model(graph, expected_attention=cfg.patch_depth + cfg.pixel_depth)
    del graph
    if require_lint_clean and not lint.ok:
        raise ExportError(f"the exported graph is not TensorRT-ready: {'; '.join(lint.problems)} "
                          "(--allow-lint-problems exports it anyway)")
    metadata.save(stage / MODEL_METADATA)
    return metadata, lint


def _metadata(net: PidNet, release: Release | None, precision: str, opset: int, checkpoint_sha256: str | None,
              static_shape: tuple[int, int, int] | None, inputs: list, outputs: list) -> ModelMetadata:
    """`release`: a registry entry, the demo's built-in model, or None (a custom network)."""
    cfg = net.cfg
    trained = [list(s) for s in release.trained_sizes] if release else []
    min_size = list(release.min_size) if release else None
    max_size = list(release.max_size) if release else None
    # Only a released checkpoint has a backbone and variant (the runtime names the release that
    # covers a size from them); the demo's built-in model is none of the released networks.
    registered = release if release is not None and is_released(release) else None
    # The graph's own bounds (the traced Dims of `dynamic_shapes`), whatever the release's range.
    limits = GraphLimits(max_batch=MAX_BATCH, max_latent_side=MAX_LATENT, max_patches_side=MAX_GRID)
    if static_shape is not None:
        min_size = max_size = [static_shape[1], static_shape[2]]
        limits = GraphLimits(max_batch=static_shape[0], max_latent_side=MAX_LATENT,
                             max_patches_side=max(static_shape[1:]) // cfg.patch_size)
    return ModelMetadata(
        release=release.name if release else None,
        latent_channels=cfg.lq_latent_channels,
        latent_down_factor=cfg.latent_spatial_down_factor,
        sr_factor=cfg.sr_scale,
        txt_embed_dim=cfg.txt_embed_dim,
        txt_max_length=cfg.txt_max_length,
        precision=precision,
        trained_sizes=trained,
        min_size=min_size,
        max_size=max_size,
        any_output_size=static_shape is None,
        opset=opset,
        network=cfg.to_dict(),
        checkpoint_sha256=checkpoint_sha256,
        versions=_versions(),
        inputs=inputs,
        outputs=outputs,
        graph_limits=limits,
        backbone=registered.backbone if registered else None,
        variant=registered.variant if registered else None,
        variant_sides={v: list(sides) for v, sides in variant_sides(registered.backbone).items()} if registered else {},
    )


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())

