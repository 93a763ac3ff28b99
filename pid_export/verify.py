"""Checking a built engine against a reference before anyone decodes with it (`pid-export --verify`).

The engine runs on random inputs at each profile's min, opt and max size (max only
when it fits in GPU memory) and is compared with the float32 PyTorch network (or ONNX
Runtime on the ONNX it was built from). Captions get a few large channels, like real
Gemma-2 states, because reduced-precision normalisation fails on exactly those. A
result passes when it is finite and its relative error is within the precision's
tolerance; `require_passed` turns any failure into an EngineError.

Running an engine needs a CUDA GPU the engine was built for: without one, nothing can
be verified, and `pid-export --verify` refuses before the export (see pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch

from pid_runtime.backends.base import BackendError, OutOfDeviceMemory
from pid_runtime.backends.onnxruntime import create_session, session_device
from pid_runtime.backends.tensorrt import TensorRTBackend
from pid_runtime.engine_metadata import EngineMetadata
from pid_runtime.trt_plan import engine_metadata_path
from pid_runtime.metadata import ENGINE_NAME, MODEL_METADATA, ModelMetadata
from pid_runtime.signature import INPUT_NAMES, OUTPUT_NAMES, input_shapes

from .engine import EngineError

Log = Callable[[str], None]

# Largest accepted ||engine - reference|| / ||reference|| against the float32 network, per
# precision of the engine's graph. The graph's own error, measured on CPU with these
# inputs (tests/test_tensorrt_verify.py measures it; numbers in README "Engines"):
# bf16 1.2e-2..1.6e-2 and fp16 1.5e-3..2.1e-3 on the golden networks, bf16 / fp16 of the
# full-size network at 256x256 in the slow test. The tolerance leaves >= 3x (tested) for the
# engine's own kernels (fused attention, different accumulation order; fp32 engines use
# TF32 matmuls by default, an fp16-like 10-bit mantissa) and stays far below the O(1)
# error of a wrong engine.
# fp8: twice bf16's, from the accuracy guard's held-out decodes (FP8 image error 1.8x bf16's on
# the tiny lsdf16 network); the guard in ONNX Runtime is the accuracy check, this one catches a
# broken engine. Not yet measured on a GPU.
TOLERANCE = {"fp32": 1e-2, "fp16": 1e-2, "bf16": 6e-2, "fp8": 1.2e-1}
DEFAULT_TOLERANCE = TOLERANCE["bf16"]  # an unknown precision gets the loosest one


@dataclass
class VerifyResult:
    rel_error: float  # ||engine - reference|| / ||reference||
    max_abs_error: float
    finite: bool
    tolerance: float
    reference: str  # what the engine was compared with
    x_shape: list[int]
    label: str = ""  # which profile size ("min of profile 1", ...)

    @property
    def passed(self) -> bool:
        return self.finite and self.rel_error <= self.tolerance

    def summary(self) -> str:
        where = f"{self.label} " if self.label else ""
        verdict = "ok" if self.passed else ("FAILED: output has NaN/Inf" if not self.finite else
                                            f"FAILED: above the tolerance {self.tolerance:g}")
        return (f"engine vs {self.reference} at {where}x{self.x_shape}: relative error {self.rel_error:.3g}, "
                f"max abs {self.max_abs_error:.3g}: {verdict}")


def compare_with_reference(got: Any, want: Any, precision: str, *, reference: str, x_shape: list[int],
                           label: str = "") -> VerifyResult:
    """The decision: engine output `got` vs reference `want` for an engine of `precision`."""
    got64 = np.asarray(got, dtype=np.float64)
    want64 = np.asarray(want, dtype=np.float64)
    if got64.shape != want64.shape:
        raise EngineError(f"engine output shape {list(got64.shape)} differs from the reference's {list(want64.shape)}")
    finite = bool(np.isfinite(got64).all())
    diff = got64 - want64
    return VerifyResult(
        rel_error=float(np.linalg.norm(diff) / max(float(np.linalg.norm(want64)), 1e-30)) if finite else np.inf,
        max_abs_error=float(np.abs(diff).max()) if finite else np.inf,
        finite=finite,
        tolerance=TOLERANCE.get(precision, DEFAULT_TOLERANCE),
        reference=reference,
        x_shape=x_shape,
        label=label,
    )


def require_passed(results: list[VerifyResult]) -> None:
    """EngineError naming the first failed check (or the absence of any check)."""
    if not results:
        raise EngineError("the engine was not verified at any size")
    failed = [r for r in results if not r.passed]
    if failed:
        more = f" (and {len(failed) - 1} more size(s))" if len(failed) > 1 else ""
        raise EngineError(f"engine verification failed: {failed[0].summary()}{more}")


class VerifySize(NamedTuple):
    """One verification run: a profile's min, opt or max point."""

    label: str  # "min", or "min of profile 2" when the engine has several profiles
    batch: int
    height: int
    width: int
    profile: int  # index of the optimization profile whose point this is


def verify_sizes(profiles: list[Mapping[str, Any]]) -> list[VerifySize]:
    """Each profile's own min, opt and max, profile by profile, smallest first within one.

    Not de-duplicated across profiles: two profiles that share a size (a 4K profile's min is
    often the 2K one's) are two sets of kernels, and each is verified at its own extremes.
    Within one profile, a point equal to an earlier one (min == opt) runs once.
    """
    sizes: list[VerifySize] = []
    for index, prof in enumerate(profiles):
        which = f" of profile {index + 1}" if len(profiles) > 1 else ""
        seen: set[tuple[int, int, int]] = set()
        for point in ("min", "opt", "max"):
            height, width = prof[f"{point}_hw"]
            key = (int(prof[f"{point}_batch"]), int(height), int(width))
            if key not in seen:
                seen.add(key)
                sizes.append(VerifySize(point + which, *key, index))
    return sizes


def verify_engine(engine: Path | str, onnx_path: Path | str | None = None, *, net: torch.nn.Module | None = None,
                  seed: int = 0, log: Log = print) -> list[VerifyResult]:
    """Run the engine and a reference on the same random inputs at every size of `verify_sizes`.

    The reference is `net` in float32 on the GPU when given (independent of the ONNX;
    `net` itself is cast to float32 and moved to the GPU), else ONNX Runtime on
    `onnx_path` (default: the ONNX the engine was built from; its CPU provider has no
    bf16 MatMul, so a bf16 export needs `net` or onnxruntime-gpu). The largest size is
    skipped with a note when the GPU runs out of memory for it.
    """
    plan_path = Path(engine)
    if plan_path.is_dir():
        plan_path = plan_path / ENGINE_NAME
    sidecar = engine_metadata_path(plan_path)
    if not sidecar.exists():
        raise EngineError(f"{sidecar} is missing: cannot tell which sizes {plan_path.name} accepts")
    try:
        engine_meta = EngineMetadata.load(sidecar)
    except BackendError as exc:
        raise EngineError(str(exc)) from None
    profiles = engine_meta.profiles
    if not profiles:
        raise EngineError(f"{sidecar} lists no optimization profile: cannot tell which sizes {plan_path.name} accepts")
    precision = engine_meta.precision or "unknown"
    meta = _metadata_for(plan_path, profiles[0])
    onnx_file = Path(onnx_path) if onnx_path is not None else plan_path.parent / engine_meta.onnx_name
    sizes = verify_sizes(profiles)
    results: list[VerifyResult] = []
    try:
        backend = TensorRTBackend(plan_path, meta)
    except BackendError as exc:
        raise EngineError(str(exc)) from None
    try:
        dev = backend.device
        ref_net = net.float().to(dev).eval() if net is not None else None
        # Each point in its own profile: where two profiles share a size, both sets of kernels run.
        for label, batch, height, width, profile in sizes:
            inputs = verify_inputs(profiles[profile], batch, height, width, seed)
            try:
                backend.bind(inputs["y"], inputs["lq_latent"], inputs["degrade_sigma"], height, width,
                             profile=profile)
                got = backend.velocity(inputs["x"].to(dev), inputs["t"].to(dev)).float().cpu().numpy()
                if ref_net is not None:
                    reference = "PyTorch (fp32)"
                    with torch.no_grad():
                        want = ref_net(*(inputs[n].to(dev) for n in INPUT_NAMES)).float().cpu().numpy()
                else:
                    reference = f"ONNX Runtime ({onnx_file.name})"
                    want = _run_onnxruntime(onnx_file, {n: inputs[n].numpy() for n in INPUT_NAMES})
            except (torch.OutOfMemoryError, OutOfDeviceMemory):  # the reference's, or the engine's buffers
                if not label.startswith("max"):
                    raise EngineError(f"out of GPU memory verifying the engine at {label} "
                                      f"{batch}x3x{height}x{width}: free the GPU, or build with a smaller "
                                      f"--max / --max-batch") from None
                log(f"skipped {label} ({batch}x3x{height}x{width}): the engine and the float32 reference "
                    f"do not fit in GPU memory together")
                torch.cuda.empty_cache()
                continue
            except BackendError as exc:
                raise EngineError(str(exc)) from None
            result = compare_with_reference(got, want, precision, reference=reference,
                                            x_shape=[batch, 3, height, width], label=label)
            log(result.summary())
            results.append(result)
    finally:
        backend.close()
    return results


def _metadata_for(plan_path: Path, prof: Mapping[str, Any]) -> ModelMetadata:
    meta_path = plan_path.parent / MODEL_METADATA
    if meta_path.exists():
        return ModelMetadata.load(meta_path)
    # A plan on its own: the profile knows everything verification needs.
    return ModelMetadata(release=None, latent_channels=prof["latent_channels"],
                         latent_down_factor=prof["pixel_scale"], sr_factor=1,
                         txt_embed_dim=prof["txt_dim"], txt_max_length=prof["text_length"], precision="unknown")


def verify_inputs(prof: Mapping[str, Any], batch: int, height: int, width: int,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random network inputs (`signature.INPUTS`) for a profile's model at one size: captions
    of the full length with outlier channels, a mid-schedule timestep and sigma."""
    gen = torch.Generator().manual_seed(seed)
    scale, txt_dim = int(prof["pixel_scale"]), int(prof["txt_dim"])
    shapes = input_shapes(dict(batch=batch, height=height, width=width, text_len=int(prof["text_length"]),
                               txt_dim=txt_dim, latent_channels=int(prof["latent_channels"]),
                               latent_h=height // scale, latent_w=width // scale))
    constant = {"t": 634.0, "degrade_sigma": 0.2}
    inputs = {name: torch.full(shape, constant[name]) if name in constant else torch.randn(shape, generator=gen)
              for name, shape in shapes.items()}
    inputs["y"][..., :: max(txt_dim // 8, 1)] *= 50.0  # outlier channels
    return inputs


def _run_onnxruntime(onnx_file: Path, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """The reference velocity from ONNX Runtime (the runtime's one session set-up, on the GPU when
    its provider is there)."""
    try:
        session = create_session(onnx_file, session_device("auto"), name=onnx_file)
        (out,) = session.run(list(OUTPUT_NAMES), dict(feeds))
    except BackendError as exc:
        raise EngineError(f"ONNX Runtime could not run {onnx_file} as the reference: {exc}") from None
    except Exception as exc:  # ORT raises its own exception types for unsupported ops/types
        raise EngineError(f"ONNX Runtime could not run {onnx_file} as the reference "
                          f"(a bf16 graph needs the CUDA provider; pass the fp32 export or net=): "
                          f"{str(exc).splitlines()[0]}") from None
    return np.asarray(out)


__all__ = ["TOLERANCE", "VerifyResult", "VerifySize", "compare_with_reference", "require_passed", "verify_engine",
           "verify_inputs", "verify_sizes"]
