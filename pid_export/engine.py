"""Building a TensorRT engine from an exported PiD ONNX model.

The network is parsed strongly typed, so the engine's precision is the ONNX
graph's (fp16 / bf16 weights and compute, float32 at the boundary). One
optimization profile covers a release's size range; kernels are tuned for
its `opt` size and activation memory is sized for `max`.

Files written next to the ONNX (export directory layout, see pid_runtime.metadata):
    engine.plan    the serialized engine (written to a temp name, then renamed)
    engine.json    what the plan was built with (checked by the runtime before loading)
    timing.cache   TensorRT's kernel timing cache, reused by the next build
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from pid_runtime.backends.base import BackendError
from pid_runtime.backends.tensorrt import (
    TensorRTBackend,
    engine_metadata_path,
    installed_tensorrt_version,
    last_errors,
    recording_logger,
    tensorrt_problem,
    version_tuple,
)
from pid_runtime.io import atomic_write
from pid_runtime.metadata import ENGINE_NAME, INPUT_NAMES, MODEL_METADATA, ModelMetadata

from .config import PidConfig

if TYPE_CHECKING:
    import tensorrt as trt

TIMING_CACHE_NAME = "timing.cache"
ENGINE_METADATA_FORMAT = 1

Shape = tuple[int, ...]
HW = tuple[int, int]
Log = Callable[[str], None]


class EngineError(RuntimeError):
    """A problem building or checking an engine that the user can act on."""


def tensorrt_status() -> tuple[bool, str]:
    """(usable, one line): can this machine build and run engines? Cheap; no GPU work."""
    reason = _unusable_reason()
    if reason is not None:
        return False, f"{reason}; engine step skipped"
    return True, f"TensorRT {installed_tensorrt_version()}"


def _unusable_reason() -> str | None:
    version = installed_tensorrt_version()
    problem = tensorrt_problem(version)
    if problem is not None:
        return problem
    if not torch.cuda.is_available():
        return f"TensorRT {version} is installed but no CUDA GPU is visible"
    return None


# ---------------------------------------------------------------------------
# Optimization profile (pure; no TensorRT needed)


def parse_hw(text: str) -> HW:
    """'2048x1536' (height x width) -> (2048, 1536)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise EngineError(f"size {text!r} is not HEIGHTxWIDTH, e.g. 2048x2048")
    return int(match.group(1)), int(match.group(2))


def _hw(value: Sequence[int]) -> HW:
    if len(value) != 2:
        raise EngineError(f"a size is [height, width], got {list(value)}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class EngineProfile:
    """The shape range one engine accepts.

    Sizes are output pixels (H, W), multiples of the patch size. The output size is
    free of the latent's (the network aligns the latent), so the latent range is the
    outputs' range in latent cells, rounded outward: floor(min / pixel_scale) to
    ceil(max / pixel_scale).
    Caption length is fixed at the model's max (the caption encoder pads to it)
    unless `min_text_length` widens the range.
    """

    latent_channels: int
    pixel_scale: int
    txt_dim: int
    min_hw: HW
    opt_hw: HW
    max_hw: HW
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    text_length: int = 300
    min_text_length: int | None = None
    patch_size: int = 16

    @classmethod
    def for_config(cls, cfg: PidConfig, min_hw: HW, opt_hw: HW, max_hw: HW, *, max_batch: int = 1,
                   opt_batch: int = 1, min_text_length: int | None = None) -> "EngineProfile":
        profile = cls(latent_channels=cfg.lq_latent_channels, pixel_scale=cfg.pixel_scale,
                      txt_dim=cfg.txt_embed_dim, min_hw=_hw(min_hw), opt_hw=_hw(opt_hw),
                      max_hw=_hw(max_hw), max_batch=max_batch, opt_batch=opt_batch,
                      text_length=cfg.txt_max_length, min_text_length=min_text_length, patch_size=cfg.patch_size)
        profile.validate()
        return profile

    @classmethod
    def for_metadata(cls, meta: ModelMetadata, min_hw: HW | None = None, opt_hw: HW | None = None,
                     max_hw: HW | None = None, *, max_batch: int = 1, opt_batch: int = 1) -> "EngineProfile":
        """The export's size range (trained sizes), with the user's overrides.

        Defaults: min/max from the metadata's range, opt = its first trained size.
        """
        low = min_hw or (_hw(meta.min_size) if meta.min_size else None)
        high = max_hw or (_hw(meta.max_size) if meta.max_size else None)
        if low is None or high is None:
            raise EngineError("the export has no trained size range; give --min and --max HxW")
        opt = opt_hw or (_hw(meta.trained_sizes[0]) if meta.trained_sizes else high)
        profile = cls(latent_channels=meta.latent_channels, pixel_scale=meta.pixel_scale,
                      txt_dim=meta.txt_embed_dim, min_hw=_hw(low), opt_hw=_hw(opt), max_hw=_hw(high),
                      max_batch=max_batch, opt_batch=opt_batch, text_length=meta.txt_max_length,
                      patch_size=int(meta.network.get("patch_size", 16)))
        profile.validate()
        return profile

    def validate(self) -> None:
        for label, (height, width) in (("min", self.min_hw), ("opt", self.opt_hw), ("max", self.max_hw)):
            for name, value in (("height", height), ("width", width)):
                if value <= 0 or value % self.patch_size:
                    raise EngineError(f"{label} {name} {value} is not a positive multiple of {self.patch_size} "
                                      f"(the patch size)")
        for axis, name in ((0, "height"), (1, "width")):
            if not self.min_hw[axis] <= self.opt_hw[axis] <= self.max_hw[axis]:
                raise EngineError(f"profile {name}s must satisfy min <= opt <= max, got "
                                  f"{self.min_hw[axis]}, {self.opt_hw[axis]}, {self.max_hw[axis]}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise EngineError(f"batch sizes must satisfy 1 <= min <= opt <= max, got "
                              f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")
        low_text = self.text_length if self.min_text_length is None else self.min_text_length
        if not 1 <= low_text <= self.text_length:
            raise EngineError(f"caption length range {low_text}..{self.text_length} is empty")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shapes"] = {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                          for name, (lo, opt, hi) in profile_shapes(self).items()}
        return data


def profile_shapes(profile: EngineProfile) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per network input: its (min, opt, max) shape under `profile`."""
    def at(batch: int, hw: HW, text: int, latent_cells: Callable[[int], int]) -> dict[str, Shape]:
        height, width = hw
        return {
            "x": (batch, 3, height, width),
            "t": (batch,),
            "y": (batch, text, profile.txt_dim),
            "lq_latent": (batch, profile.latent_channels, latent_cells(height), latent_cells(width)),
            "degrade_sigma": (batch,),
        }

    scale = profile.pixel_scale
    low_text = profile.text_length if profile.min_text_length is None else profile.min_text_length
    low = at(profile.min_batch, profile.min_hw, low_text, lambda px: max(px // scale, 1))
    opt = at(profile.opt_batch, profile.opt_hw, profile.text_length, lambda px: max(px // scale, 1))
    high = at(profile.max_batch, profile.max_hw, profile.text_length, lambda px: -(-px // scale))
    return {name: (low[name], opt[name], high[name]) for name in INPUT_NAMES}


# ---------------------------------------------------------------------------
# Files


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp name in the same directory, then rename: never a half-written file."""
    atomic_write(path, lambda temp: temp.write_bytes(data))


def onnx_sha256(onnx_path: Path) -> str:
    """sha256 over the ONNX file and the external weight files it names (weights define the engine)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    data_files = sorted({entry.value for init in model.graph.initializer
                         for entry in init.external_data if entry.key == "location"})
    digest = hashlib.sha256()
    for path in [onnx_path, *(onnx_path.parent / name for name in data_files)]:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _model_precision(onnx_path: Path) -> str:
    meta_path = onnx_path.parent / MODEL_METADATA
    if meta_path.exists():
        return ModelMetadata.load(meta_path).precision
    return "unknown"


# ---------------------------------------------------------------------------
# Build


def build_engine(onnx_path: Path | str, out_dir: Path | str, profile: EngineProfile, *,
                 workspace_gb: float | None = None, opt_level: int = 3, strip_weights: bool = False,
                 timing_cache: Path | str | None = None, log: Log = print) -> Path:
    """Build `out_dir/engine.plan` (+ engine.json) from `onnx_path`; returns the plan's path.

    `timing_cache` (default out_dir/timing.cache) is read when present and
    rewritten after the build, so rebuilding for the same GPU skips kernel timing.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    reason = _unusable_reason()
    if reason is not None:
        raise EngineError(reason)
    if not onnx_path.is_file():
        raise EngineError(f"ONNX model {onnx_path} does not exist")
    profile.validate()
    out_dir.mkdir(parents=True, exist_ok=True)

    import tensorrt as trt

    errors: list[str] = []
    logger = recording_logger(errors, echo=log)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the path: finds the external weights
        details = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT could not parse {onnx_path}: {' | '.join(details[:5]) or last_errors(errors)}")
    io = _network_io(network)
    shapes = profile_shapes(profile)
    unknown = sorted(set(shapes) - {t["name"] for t in io["inputs"]})
    if unknown:
        raise EngineError(f"{onnx_path} has no input(s) {', '.join(unknown)}: not a PiD export")

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    # Lets the runtime size scratch memory for the actual shape, not the profile max.
    # A 10.x preview feature; looked up by name so a TensorRT without it still builds.
    resize = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if resize is not None:
        config.set_preview_feature(resize, True)
    if strip_weights:
        # Weightless plan; the runtime refits it from the same ONNX (identical weights).
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    trt_profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        trt_profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
    config.add_optimization_profile(trt_profile)

    cache_path = Path(timing_cache) if timing_cache is not None else out_dir / TIMING_CACHE_NAME
    blob = cache_path.read_bytes() if cache_path.exists() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception as exc:  # a corrupt cache only costs build time: start a fresh one
        log(f"ignoring unreadable timing cache {cache_path}: {exc}")
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        log(f"timing cache {cache_path} is from another GPU or TensorRT; building without it")
        config.set_timing_cache(config.create_timing_cache(b""), False)

    log(f"building TensorRT engine for {onnx_path.name}: sizes {profile.min_hw}..{profile.max_hw} "
        f"(opt {profile.opt_hw}), batch {profile.min_batch}..{profile.max_batch}; this takes minutes")
    start = time.perf_counter()
    # The stubs say IHostMemory, but a failed build returns None (the reason is in the log).
    plan: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build the engine: {last_errors(errors)}")
    log(f"engine built in {time.perf_counter() - start:.0f} s ({plan.nbytes / 2**20:.1f} MiB)")

    write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    plan_path = out_dir / ENGINE_NAME
    meta = _engine_metadata(onnx_path, profile, io, stripped=strip_weights, opt_level=opt_level,
                            workspace_gb=workspace_gb)
    sidecar = engine_metadata_path(plan_path)
    sidecar.unlink(missing_ok=True)  # never leave an old sidecar describing a new plan
    write_atomic(plan_path, bytes(plan))
    write_atomic(sidecar, (json.dumps(meta, indent=1) + "\n").encode())
    return plan_path


def _strongly_typed_flags() -> int:
    """TensorRT 11 networks are always strongly typed (flag 0); 10.x must ask for it."""
    import tensorrt as trt

    version = installed_tensorrt_version() or "0"
    if version_tuple(version)[:1] >= (11,):
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _network_io(network: "trt.INetworkDefinition") -> dict[str, list[dict[str, Any]]]:
    def describe(tensor: "trt.ITensor") -> dict[str, Any]:
        return {"name": tensor.name, "dtype": str(tensor.dtype).rsplit(".", 1)[-1],
                "shape": [int(tensor.shape[i]) for i in range(len(tensor.shape))]}

    return {"inputs": [describe(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)]}


def _engine_metadata(onnx_path: Path, profile: EngineProfile, io: Mapping[str, Any], *, stripped: bool,
                     opt_level: int, workspace_gb: float | None) -> dict[str, Any]:
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "format": ENGINE_METADATA_FORMAT,
        "tensorrt_version": installed_tensorrt_version(),
        "gpu_name": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "precision": _model_precision(onnx_path),
        "profile": profile.to_dict(),
        "inputs": io["inputs"],
        "outputs": io["outputs"],
        "onnx_name": onnx_path.name,
        "onnx_sha256": onnx_sha256(onnx_path),
        "stripped": stripped,
        "builder_optimization_level": opt_level,
        "workspace_gb": workspace_gb,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------
# Verify


@dataclass
class VerifyResult:
    rel_error: float  # ||engine - reference|| / ||reference||
    max_abs_error: float
    finite: bool
    reference: str  # what the engine was compared with
    x_shape: list[int]

    def summary(self) -> str:
        status = "" if self.finite else " (engine output has NaN/Inf)"
        return (f"engine vs {self.reference} at x{self.x_shape}: relative error {self.rel_error:.3g}, "
                f"max abs {self.max_abs_error:.3g}{status}")


def verify_engine(engine: Path | str, onnx_path: Path | str | None = None, *,
                  hw: HW | None = None, batch: int | None = None, seed: int = 0,
                  net: torch.nn.Module | None = None, log: Log = print) -> VerifyResult:
    """Run the engine and a reference on the same random inputs at a small size inside the profile.

    The reference is `net` in float32 on the GPU when given (independent of the
    ONNX; `net` itself is cast to float32 and moved to the GPU), else ONNX
    Runtime on `onnx_path` (default: the ONNX the engine was built from; ONNX
    Runtime's CPU provider has no bf16 MatMul, so a bf16 export needs `net` or
    onnxruntime-gpu). Captions get a few large channels, like real Gemma-2
    states, because reduced-precision normalisation fails on exactly those.
    """
    plan_path = Path(engine)
    if plan_path.is_dir():
        plan_path = plan_path / ENGINE_NAME
    sidecar = engine_metadata_path(plan_path)
    if not sidecar.exists():
        raise EngineError(f"{sidecar} is missing: cannot tell which sizes {plan_path.name} accepts")
    engine_meta = json.loads(sidecar.read_text())
    prof = engine_meta["profile"]
    height, width = hw or tuple(prof["min_hw"])
    batch = batch or int(prof["min_batch"])
    meta = _metadata_for(plan_path, prof)
    inputs = _verify_inputs(prof, batch, height, width, seed)

    try:
        backend = TensorRTBackend(plan_path, meta)
        try:
            dev = backend.device
            backend.bind(inputs["y"], inputs["lq_latent"], inputs["degrade_sigma"], height, width)
            out = backend.velocity(inputs["x"].to(dev), inputs["t"].to(dev))
            got = out.float().cpu().numpy().astype(np.float64)
        finally:
            backend.close()
    except BackendError as exc:
        raise EngineError(str(exc)) from None

    if net is not None:
        reference = "PyTorch (fp32)"
        ref_net = net.float().to(dev).eval()
        with torch.no_grad():
            want = ref_net(*(inputs[n].to(dev) for n in INPUT_NAMES)).float().cpu().numpy()
    else:
        onnx_file = Path(onnx_path) if onnx_path is not None else plan_path.parent / engine_meta["onnx_name"]
        reference = f"ONNX Runtime ({onnx_file.name})"
        want = _run_onnxruntime(onnx_file, {n: inputs[n].numpy() for n in INPUT_NAMES})
    want = want.astype(np.float64)
    result = VerifyResult(
        rel_error=float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30)),
        max_abs_error=float(np.abs(got - want).max()),
        finite=bool(np.isfinite(got).all()),
        reference=reference,
        x_shape=[batch, 3, height, width],
    )
    log(result.summary())
    return result


def _metadata_for(plan_path: Path, prof: Mapping[str, Any]) -> ModelMetadata:
    meta_path = plan_path.parent / MODEL_METADATA
    if meta_path.exists():
        return ModelMetadata.load(meta_path)
    # A plan on its own: the profile knows everything verification needs.
    return ModelMetadata(release=None, latent_channels=prof["latent_channels"],
                         latent_down_factor=prof["pixel_scale"], sr_factor=1,
                         txt_embed_dim=prof["txt_dim"], txt_max_length=prof["text_length"], precision="unknown")


def _verify_inputs(prof: Mapping[str, Any], batch: int, height: int, width: int,
                   seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scale = int(prof["pixel_scale"])
    y = torch.randn(batch, int(prof["text_length"]), int(prof["txt_dim"]), generator=gen)
    y[..., :: max(int(prof["txt_dim"]) // 8, 1)] *= 50.0  # outlier channels
    return {
        "x": torch.randn(batch, 3, height, width, generator=gen),
        "t": torch.full((batch,), 634.0),
        "y": y,
        "lq_latent": torch.randn(batch, int(prof["latent_channels"]), height // scale, width // scale,
                                 generator=gen),
        "degrade_sigma": torch.full((batch,), 0.2),
    }


def _run_onnxruntime(onnx_file: Path, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(onnx_file), providers=providers)
        (out,) = session.run(["velocity"], dict(feeds))
    except Exception as exc:  # ORT raises its own exception types for unsupported ops/types
        raise EngineError(f"ONNX Runtime could not run {onnx_file} as the reference "
                          f"(a bf16 graph needs the CUDA provider; pass the fp32 export or net=): "
                          f"{str(exc).splitlines()[0]}") from None
    return np.asarray(out)


__all__ = ["EngineError", "EngineProfile", "VerifyResult", "build_engine", "parse_hw",
           "profile_shapes", "tensorrt_status", "verify_engine", "write_atomic"]
