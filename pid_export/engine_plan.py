"""The engine step, planned once before the export: library, targets, profiles, or why there is none.

`plan_engine(request, log)` decides everything the engine step of `pid-export` will do,
cheaply (no GPU work, no export needed) and before minutes of export, so that every
mistake in the engine options is one line up front. The export then carries the
`EnginePlan` to `engine_step.build_and_verify`, which builds and verifies exactly it:

    library     `pid_runtime.trt_library`: enterprise TensorRT on the GPU it will run on,
                TensorRT-RTX ahead of time (no GPU needed) for target compute capabilities
    target      `BuildTarget`: the compute capabilities the plan is built for
    profiles    `EngineProfile`s from the export's size range and --min/--opt/--max/--profiles
                (engine_profiles.py), checked here against what the export's metadata will say
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from pid_runtime.engine_metadata import EngineMetadata
from pid_runtime.metadata import ModelMetadata
from pid_runtime.trt_library import KINDS, RTX, RTX_DEFAULT_TARGETS, LibraryError, TensorRTLibrary, gpu_visible, select_library
from pid_runtime.trt_plan import compute_capability_string, why_engine_cannot_run

from .config import PidConfig
from .engine_errors import EngineError, MissingSizeRange
from .engine_profiles import EngineProfile, default_profile_specs, engine_profiles
from .releases import Release
from .request import EngineOptions, ExportRequest
from .stages import Log, PipelineError

LIBRARY_DEFAULT = "library default"  # BuildTarget.source when no target was asked for


# ---------------------------------------------------------------------------
# Library and targets


def buildable_library(library: str | None = None) -> TensorRTLibrary:
    """The library that builds here, or EngineError saying why none does. Cheap; no GPU work."""
    try:
        lib = select_library(library)
    except LibraryError as exc:
        raise EngineError(str(exc)) from None
    if not lib.builds_without_gpu and not gpu_visible():
        rtx = KINDS[RTX]
        raise EngineError(f"{lib.description} builds engines on a CUDA GPU and none is visible ({rtx.label} builds "
                          f"without one: {rtx.install})")
    return lib


def tensorrt_status(library: str | None = None) -> tuple[bool, str]:
    """(can build here, one line naming the library and how it builds, or saying why not)."""
    try:
        lib = buildable_library(library)
    except EngineError as exc:
        return False, str(exc)
    return True, library_line(lib)


def library_line(lib: TensorRTLibrary) -> str:
    how = "ahead of time, no GPU needed" if lib.builds_without_gpu else "on this GPU"
    return f"{lib.description} ({how})"


def why_engines_cannot_run_here(lib: TensorRTLibrary, targets: Sequence[str] | None = None,
                                device: torch.device | str | None = None) -> str | None:
    """Why an engine of `lib` for `targets` (None: the library's defaults) cannot run on `device`
    (default: the current CUDA device), or None: the runtime's own check, on what the build
    will record. Cheap: no GPU work beyond asking torch about the device."""
    planned = None  # enterprise TensorRT builds for this very GPU
    if lib.key == RTX:
        planned = EngineMetadata(library=lib.key, compute_capabilities=list(targets or RTX_DEFAULT_TARGETS),
                                 compute_capabilities_source=LIBRARY_DEFAULT if targets is None
                                 else "--compute-capability")
    return why_engine_cannot_run(lib, planned, device)


def parse_compute_capabilities(text: str) -> tuple[str, ...]:
    """'8.9,12.0' (also '89,120' or 'sm89,sm120') -> ('8.9', '12.0')."""
    found: list[str] = []
    for part in text.split(","):
        item = part.strip().lower().removeprefix("sm_").removeprefix("sm")
        dotted = re.fullmatch(r"(\d{1,2})\.(\d)", item)
        packed = re.fullmatch(r"(\d{1,2})(\d)", item)
        match = dotted or packed
        if match is None:
            raise EngineError(f"compute capability {part.strip()!r} is not like 8.9 or 12.0 (comma-separated)")
        value = f"{int(match.group(1))}.{match.group(2)}"
        if value not in found:
            found.append(value)
    if not found:
        raise EngineError("--compute-capability needs at least one value, e.g. 8.9,12.0")
    return tuple(found)


@dataclass(frozen=True)
class BuildTarget:
    """What a build produces code for, decided before any slow work."""

    library: TensorRTLibrary
    compute_capabilities: tuple[str, ...]  # recorded in the sidecar
    source: str  # LIBRARY_DEFAULT | "--compute-capability" | "build GPU"
    rtx_targets: tuple[str, ...] | None = None  # ComputeCapability member names set on the config
    gpu_name: str | None = None  # the GPU the build runs on, when it uses one

    @property
    def on_gpu(self) -> bool:
        return self.gpu_name is not None

    @property
    def asked_targets(self) -> tuple[str, ...] | None:
        """The targets the user (or FP8) chose; None when the library's defaults apply."""
        return None if self.source == LIBRARY_DEFAULT else self.compute_capabilities

    def why_it_cannot_run_here(self) -> str | None:
        """Why the engine this target builds cannot run on the current CUDA device, or None."""
        return why_engines_cannot_run_here(self.library, self.asked_targets)


def build_target(library: str | None = None, compute_capabilities: Sequence[str] | None = None,
                 strip_weights: bool = False) -> BuildTarget:
    """The library and targets of a build, or EngineError with the reason it cannot happen here."""
    return target_for(buildable_library(library), compute_capabilities, strip_weights)


def target_for(lib: TensorRTLibrary, compute_capabilities: Sequence[str] | None = None,
               strip_weights: bool = False) -> BuildTarget:
    """The targets `lib` builds for, or EngineError.

    Enterprise TensorRT builds for the GPU it runs on. TensorRT-RTX builds CPU-only for its
    default targets or the given ones; a weight-stripped TensorRT-RTX plan needs a GPU and
    one target (its documentation: "a GPU device is required for the AOT build and at most
    one compute capability can be set"), so without a GPU it is refused here, before the
    export, instead of failing inside the builder with a CUDA error.
    """
    requested = tuple(compute_capabilities) if compute_capabilities else None
    gpu = torch.cuda.is_available()
    here = compute_capability_string(torch.device("cuda", torch.cuda.current_device())) if gpu else None
    gpu_name = torch.cuda.get_device_name(torch.cuda.current_device()) if gpu else None

    if not lib.builds_without_gpu:
        if requested is not None and requested != (here,):
            raise EngineError(f"{lib.description} builds for the GPU it runs on (compute capability {here}), "
                              f"not for {', '.join(requested)}: build on such a GPU, or with TensorRT-RTX "
                              f"(--trt rtx) for RTX-class targets")
        return BuildTarget(lib, (str(here),), "build GPU", gpu_name=gpu_name)

    available = {name for name in lib.module.ComputeCapability.__members__ if name.startswith("SM")}
    if strip_weights:
        if not gpu:
            raise EngineError(f"--strip-weights with {lib.label} needs a CUDA GPU at build time (a weightless "
                              f"{lib.label} plan is compiled on the GPU it targets) and none is visible: build "
                              f"without --strip-weights here, or on the target GPU")
        if requested is not None and requested != (here,):
            raise EngineError(f"--strip-weights with {lib.label} builds for this GPU only (compute capability "
                              f"{here}), not for {', '.join(requested)}")
        return BuildTarget(lib, (str(here),), "build GPU", ("CURRENT",), gpu_name)
    if requested is None:
        return BuildTarget(lib, RTX_DEFAULT_TARGETS, LIBRARY_DEFAULT)
    names = []
    for cc in requested:
        name = "SM" + cc.replace(".", "")
        if name not in available:
            offered = ", ".join(sorted((f"{n[2:-1]}.{n[-1]}" for n in available), key=lambda v: float(v)))
            raise EngineError(f"{lib.description} cannot build for compute capability {cc}: it offers {offered}")
        names.append(name)
    return BuildTarget(lib, requested, "--compute-capability", tuple(names))


# ---------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class EnginePlan:
    """Everything the engine step builds, decided once (`plan_engine`, or `for_profiles` for a
    build on its own); `engine.build_engine` builds it, recomputing nothing."""

    target: BuildTarget
    profiles: tuple[EngineProfile, ...]
    precision: str | None = None  # the export's, for the progress lines (the sidecar reads the model's)
    workspace_gb: float | None = None
    strip_weights: bool = False
    opt_level: int = 3
    timing_cache: Path | None = None  # enterprise TensorRT; None: timing.cache beside the plan
    verify: bool = False  # run it against the float32 network after the build

    @property
    def library(self) -> TensorRTLibrary:
        return self.target.library

    @classmethod
    def for_profiles(cls, profiles: EngineProfile | Sequence[EngineProfile], *, library: str | None = None,
                     compute_capabilities: Sequence[str] | None = None, workspace_gb: float | None = None,
                     opt_level: int = 3, strip_weights: bool = False,
                     timing_cache: Path | str | None = None) -> "EnginePlan":
        """A build of given profiles outside pid-export (tests, benchmarks)."""
        return cls(build_target(library, compute_capabilities, strip_weights),
                   (profiles,) if isinstance(profiles, EngineProfile) else tuple(profiles),
                   workspace_gb=workspace_gb, strip_weights=strip_weights, opt_level=opt_level,
                   timing_cache=Path(timing_cache) if timing_cache is not None else None)

    def sizes(self, separator: str = ", ") -> str:
        return separator.join(f"{p.min_hw}..{p.max_hw} tuned for {p.opt_hw}" for p in self.profiles)


def check_engine_options(options: EngineOptions, precision: str | None = None,
                         lib: TensorRTLibrary | None = None) -> BuildTarget:
    """What the engine step will need, checked before any slow work; returns the BuildTarget.

    FP8 engines run on Ada or newer only: TensorRT-RTX then builds for 8.9 and 12.0 unless
    --compute-capability says otherwise, and any older target (or, for enterprise TensorRT,
    an older build GPU) is refused.

    `--verify` runs the engine, so it needs a GPU the engine can run on. Without one it is
    an error, not a note: the user asked for a checked engine, and a build that ends with
    "ready" but was never run would read as checked. It is refused here, before minutes of
    export and build, with what to do instead.
    """
    from .fp8 import FP8_DEFAULT_TARGETS, fp8_targets_problem

    try:
        lib = lib or buildable_library(options.library)
        target = target_for(lib, options.compute_capabilities, options.strip_weights)
        if precision == "fp8" and target.source == LIBRARY_DEFAULT:
            target = target_for(lib, FP8_DEFAULT_TARGETS, options.strip_weights)
    except EngineError as exc:
        raise PipelineError(str(exc)) from None
    if precision == "fp8":
        problem = fp8_targets_problem(target.compute_capabilities)
        if problem is not None:
            raise PipelineError(problem)
    if options.verify:
        why = target.why_it_cannot_run_here()
        if why is not None:
            raise PipelineError(f"--verify runs the engine, and it cannot run here: {why}. Build without --verify "
                                f"here and check the engine where it runs (pid-export --verify on that GPU)")
    return target


def profiles_for(meta: ModelMetadata, release: Release | None, options: EngineOptions) -> list[EngineProfile]:
    """The engine's optimization profiles for an export's metadata: --profiles, else
    --min/--opt/--max over the export's range (opt: the release's main size), else the
    release's default profiles (two for 2kto4k releases)."""
    # A static export (--static) has one size: one profile at it, whatever the release's defaults.
    fixed = meta.min_size is not None and list(meta.min_size) == list(meta.max_size or [])
    specs = options.profiles
    if specs is None and not fixed and (options.min_hw, options.opt_hw, options.max_hw) == (None, None, None):
        specs = default_profile_specs(release)
    opt_hw = options.opt_hw
    if opt_hw is None and not specs:
        if fixed:
            opt_hw = tuple(meta.min_size)
        elif release is not None:
            opt_hw = release.opt_size
    return engine_profiles(meta, specs, options.min_hw, opt_hw, options.max_hw, max_batch=options.max_batch)


def planned_metadata(network: PidConfig, release: Release | None,
                     static_shape: tuple[int, int, int] | None = None) -> ModelMetadata:
    """What the export's model metadata will say about sizes (onnx_export writes the same)."""
    low = high = None
    if release is not None:
        low, high = release.min_size, release.max_size
    if static_shape is not None:
        low = high = static_shape[1:]
    return ModelMetadata(release=release.name if release is not None else None,
                         latent_channels=network.lq_latent_channels,
                         latent_down_factor=network.latent_spatial_down_factor, sr_factor=network.sr_scale,
                         txt_embed_dim=network.txt_embed_dim, txt_max_length=network.txt_max_length,
                         precision="unknown",
                         trained_sizes=[list(s) for s in release.trained_sizes] if release is not None else [],
                         min_size=list(low) if low else None, max_size=list(high) if high else None,
                         network=network.to_dict())


def planned_profiles(network: PidConfig, release: Release | None, options: EngineOptions,
                     static_shape: tuple[int, int, int] | None = None) -> list[EngineProfile]:
    """`profiles_for` from what the export's metadata will say, so that profile mistakes
    fail before the export instead of after it."""
    meta = planned_metadata(network, release, static_shape)
    return profiles_for(meta, release, options)


def plan_engine(request: ExportRequest, log: Log) -> EnginePlan | None:
    """The engine step of `request`, or None when this run builds no engine (the reason is
    logged; a required engine that cannot be built is a PipelineError). Said before minutes
    of export: a custom network without a size range gets no engine (a note) unless
    --engine demands one."""
    options = request.engine
    plan = None if request.onnx_only else _plan(request, log)
    if options.verify and plan is None:
        log("note: --verify applies to the engine, which is not built in this run")
    return plan


def _plan(request: ExportRequest, log: Log) -> EnginePlan | None:
    options = request.engine
    try:
        lib = buildable_library(options.library)
    except EngineError as exc:
        if request.require_engine:
            raise PipelineError(f"cannot build the engine: {exc}") from None
        log(f"engine step will be skipped: {exc}")
        return None
    target = check_engine_options(options, request.precision, lib)
    try:
        profiles = planned_profiles(request.network, request.release, options, request.static_shape)
    except MissingSizeRange as exc:
        if request.require_engine:
            raise PipelineError(str(exc)) from None
        log(f"engine step will be skipped: {exc}")
        return None
    except EngineError as exc:
        raise PipelineError(str(exc)) from None
    log(f"engine: {lib.description}, {len(profiles)} optimization profile(s), "
        f"{'built on ' + target.gpu_name if target.gpu_name else 'built CPU-only'} for compute capability "
        f"{', '.join(target.compute_capabilities)}")
    return EnginePlan(target, tuple(profiles), request.precision, options.workspace_gb, options.strip_weights,
                      verify=options.verify)
