"""Building a TensorRT or TensorRT-RTX engine from an exported PiD ONNX model.

The network is parsed strongly typed, so the engine's precision is the ONNX
graph's (fp16 / bf16 weights and compute, float32 at the boundary). Which library
builds it: `pid_runtime.trt_library` (enterprise TensorRT on the GPU it will run
on; TensorRT-RTX ahead of time, no GPU needed, for a list of target compute
capabilities). One or more optimization profiles cover a release's size range
(2kto4k releases: a 2K-class profile tuned at 2048x2048 and a 4K-class one tuned
at 3840x3840); kernels are tuned for each profile's `opt` size.

Files written next to the ONNX (export directory layout, see pid_runtime.metadata):
    engine.plan    the serialized engine (written to a temp name, then renamed)
    engine.json    what the plan was built with: library and version, target compute
                   capabilities, profiles (checked by the runtime before loading)
    timing.cache   enterprise TensorRT's kernel timing cache, reused by the next build
                   (TensorRT-RTX times no kernels at build time: it has none)
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from pid_runtime.engine_metadata import ENGINE_METADATA_FORMAT, EngineMetadata
from pid_runtime.io import atomic_write
from pid_runtime.metadata import ENGINE_NAME, INPUT_NAMES, MODEL_METADATA, ModelMetadata
from pid_runtime.trt_library import TensorRTLibrary, last_errors, recording_logger
from pid_runtime.trt_plan import engine_metadata_path

from .engine_errors import EngineError, MissingSizeRange
from .engine_plan import (  # re-exported: pid_export.engine is where callers find them
    BuildTarget,
    EnginePlan,
    build_target,
    parse_compute_capabilities,
    tensorrt_status,
    why_engines_cannot_run_here,
)
from .engine_profiles import (  # re-exported, as above
    HW,
    PROFILE_2K_CLASS_MAX,
    PROFILE_2K_CLASS_OPT,
    PROFILE_4K_CLASS_OPT,
    EngineProfile,
    ProfileSpec,
    Shape,
    default_profile_specs,
    engine_profiles,
    parse_hw,
    parse_profiles,
    profile_shapes,
)
from .interrupts import native_calls, raise_if_requested, requested, stage_boundary

if TYPE_CHECKING:
    import tensorrt as trt

TIMING_CACHE_NAME = "timing.cache"

Log = Callable[[str], None]


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


def build_engine(onnx_path: Path | str, out_dir: Path | str,
                 plan: EnginePlan | EngineProfile | Sequence[EngineProfile], *, library: str | None = None,
                 compute_capabilities: Sequence[str] | None = None, workspace_gb: float | None = None,
                 opt_level: int = 3, strip_weights: bool = False, timing_cache: Path | str | None = None,
                 log: Log = print) -> Path:
    """Build `out_dir/engine.plan` (+ engine.json) from `onnx_path` as `plan` says; returns the plan's path.

    `plan` is pid-export's `EnginePlan`; given profiles instead, the keywords plan the build
    (`EnginePlan.for_profiles`: `library` / `compute_capabilities` choose the library and
    its targets). With enterprise TensorRT, the timing cache (default out_dir/timing.cache)
    is read when present and rewritten after the build.

    The steps (`build_planned`), in the order they run: parse, fit the profiles to the
    parsed inputs, configure, add the profiles, serialize, write.
    """
    if not isinstance(plan, EnginePlan):
        plan = EnginePlan.for_profiles(plan, library=library, compute_capabilities=compute_capabilities,
                                       workspace_gb=workspace_gb, opt_level=opt_level, strip_weights=strip_weights,
                                       timing_cache=timing_cache)
    return build_planned(onnx_path, out_dir, plan, log)


def build_planned(onnx_path: Path | str, out_dir: Path | str, plan: EnginePlan, log: Log = print) -> Path:
    """`build_engine` of an `EnginePlan` (what pid-export's engine step calls): the steps, in
    the order they run."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    _check_inputs(onnx_path, plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    # Once SIGINT/SIGTERM arrived, the library's "build canceled" messages are not news.
    logger = recording_logger(plan.library, errors, echo=lambda message: None if requested() else log(message))
    build = _Build(plan, plan.library.module, logger, errors, log)
    with native_calls():  # SIGINT/SIGTERM: recorded in the callbacks, raised when the library returns
        parsed = parse_onnx(build, onnx_path)
        profiles = fit_profiles(plan.profiles, parsed.io)
        config = configure(build, parsed.builder, plan.timing_cache or out_dir / TIMING_CACHE_NAME)
        as_built = add_profiles(build, parsed.builder, config, profiles)
        serialized = serialize(build, parsed, config, profiles)
        meta = _engine_metadata(onnx_path, profiles, as_built, parsed, plan, serialized.seconds)
        return write_plan(out_dir / ENGINE_NAME, serialized.plan, meta, log)


@dataclass
class _Build:
    """What the steps of one build share: the plan, the library's module, its logger and the
    error messages the logger recorded (the reason behind a None from the library)."""

    plan: EnginePlan
    trt: Any
    logger: Any
    errors: list[str]
    log: Log
    timing_cache: Path | None = None  # where configure read it (enterprise TensorRT): serialize rewrites it

    @property
    def lib(self) -> TensorRTLibrary:
        return self.plan.library

    def failed(self, what: str) -> EngineError:
        return EngineError(f"{self.lib.label} {what}: {last_errors(self.errors)}")


@dataclass
class ParsedNetwork:
    builder: Any  # trt.Builder
    network: Any  # trt.INetworkDefinition
    parser: Any  # trt.OnnxParser: owns the weights the network refers to until the build
    io: dict[str, list[dict[str, Any]]]  # the network's inputs and outputs as the sidecar records them
    attention_layers: int
    decomposable_attention_layers: int


@dataclass
class SerializedPlan:
    plan: Any  # trt.IHostMemory
    seconds: float


def _check_inputs(onnx_path: Path, plan: EnginePlan) -> None:
    if not plan.profiles:
        raise EngineError("an engine needs at least one optimization profile")
    if not onnx_path.is_file():
        raise EngineError(f"ONNX model {onnx_path} does not exist")
    for profile in plan.profiles:
        profile.validate()


def parse_onnx(build: _Build, onnx_path: Path) -> ParsedNetwork:
    """The ONNX graph as a (strongly typed) TensorRT network; float32 attentions marked decomposable."""
    lib, trt = build.lib, build.trt
    builder = trt.Builder(build.logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
                                     if lib.needs_strongly_typed_flag else 0)
    parser = trt.OnnxParser(network, build.logger)
    build.log(f"parsing {onnx_path.name} with {lib.description}")
    start = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):  # from the path: finds the external weights
        details = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"{lib.label} could not parse {onnx_path}: "
                          f"{' | '.join(details[:3]) or last_errors(build.errors)}")
    attention, decomposable = mark_fp32_attention_decomposable(lib, network)
    build.log(f"parsed in {time.perf_counter() - start:.1f} s: {network.num_layers} layers, {attention} attention "
              f"({decomposable} float32 ones decomposable: no fused float32 kernel exists)" if decomposable else
              f"parsed in {time.perf_counter() - start:.1f} s: {network.num_layers} layers, {attention} fused "
              f"attention")
    raise_if_requested()
    return ParsedNetwork(builder, network, parser, _network_io(network), attention, decomposable)


def fit_profiles(profiles: Sequence[EngineProfile], io: Mapping[str, Any]) -> list[EngineProfile]:
    """The plan's profiles as the parsed network takes them: a static export's caption length
    is the traced one; each profile checked against the inputs in the user's terms."""
    fitted = [_fixed_text_length(profile, io) for profile in profiles]
    _check_profiles_fit(fitted, io)
    return fitted


def configure(build: _Build, builder: Any, cache_path: Path) -> Any:
    """The builder config: optimisation level, workspace, weight stripping, targets, timing cache."""
    trt, plan = build.trt, build.plan
    config = builder.create_builder_config()
    config.builder_optimization_level = plan.opt_level
    if plan.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_gb * (1 << 30)))
    # Lets the runtime size scratch memory for the actual shape, not the profile max.
    # A 10.x preview feature; looked up by name so a library without it still builds.
    resize = getattr(trt.PreviewFeature, "RUNTIME_ACTIVATION_RESIZE_10_10", None)
    if resize is not None:
        config.set_preview_feature(resize, True)
    if plan.strip_weights:
        # Weightless plan; the runtime refits it from the same ONNX. Enterprise: REFIT_IDENTICAL
        # (the same weights come back); TensorRT-RTX documents REFIT for weightless plans.
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT if build.lib.builds_without_gpu else trt.BuilderFlag.REFIT_IDENTICAL)
    if plan.target.rtx_targets is not None:
        _set_compute_capabilities(build.lib, config, plan.target.rtx_targets)
    if build.lib.uses_timing_cache:
        _use_timing_cache(config, cache_path, build.log)
        build.timing_cache = cache_path
    return config


def add_profiles(build: _Build, builder: Any, config: Any,
                 profiles: Sequence[EngineProfile]) -> list[dict[str, list[list[int]]]]:
    """One optimization profile per EngineProfile; returns each one's shapes as the config holds them."""
    trt = build.trt
    as_built: list[dict[str, list[list[int]]]] = []
    for index, profile in enumerate(profiles):
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        if config.add_optimization_profile(trt_profile) < 0:
            raise build.failed(f"rejected optimization profile {index + 1} ({profile.min_hw}..{profile.max_hw})")
        as_built.append({name: [[int(dims[i]) for i in range(len(dims))] for dims in trt_profile.get_shape(name)]
                         for name in INPUT_NAMES})
    if config.num_optimization_profiles != len(profiles):
        raise EngineError(f"{build.lib.label} kept {config.num_optimization_profiles} of {len(profiles)} profiles")
    return as_built


def serialize(build: _Build, parsed: ParsedNetwork, config: Any, profiles: Sequence[EngineProfile]) -> SerializedPlan:
    """The build itself (minutes): the serialized plan; the timing cache saved for the next build."""
    target = build.plan.target
    sizes = "; ".join(f"{p.min_hw}..{p.max_hw} tuned for {p.opt_hw}" for p in profiles)
    where = f"on {target.gpu_name}" if target.on_gpu else "CPU-only, ahead of time"
    build.log(f"building ({where}) for compute capability {', '.join(target.compute_capabilities)} "
              f"({target.source}); profile(s) {sizes}, batch {profiles[0].min_batch}..{profiles[0].max_batch}; "
              f"this takes minutes")
    start = time.perf_counter()
    monitor = build_progress(build.trt, build.log)  # kept referenced for the whole build
    if monitor is not None:
        config.progress_monitor = monitor
    # The stubs say IHostMemory, but a failed build returns None (the reason is in the log).
    plan: trt.IHostMemory | None = parsed.builder.build_serialized_network(parsed.network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise_if_requested()  # cancelled by SIGINT/SIGTERM, not a build failure
        raise build.failed("could not build the engine")
    build.log(f"built in {seconds:.0f} s ({plan.nbytes / 2**20:.1f} MiB)")
    if build.timing_cache is not None:
        write_atomic(build.timing_cache, bytes(config.get_timing_cache().serialize()))
    return SerializedPlan(plan, seconds)


def write_plan(plan_path: Path, plan: Any, meta: EngineMetadata, log: Log) -> Path:
    """engine.plan, then its sidecar: never an old sidecar beside a new plan, never half a plan."""
    sidecar = engine_metadata_path(plan_path)
    sidecar.unlink(missing_ok=True)  # never leave an old sidecar describing a new plan
    stage_boundary("plan-write", log)
    raise_if_requested()
    write_atomic(plan_path, bytes(plan))
    meta.save(sidecar)
    return plan_path


def build_progress(trt: Any, log: Log) -> Any:
    """An IProgressMonitor for the build: a few lines (the builder's main phases, with the time
    since the build began) and cancellation: a step returns False once SIGINT/SIGTERM arrived,
    which makes build_serialized_network stop and return None. None if the library has none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class BuildProgress(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.start = time.perf_counter()
            self.depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            self.depth[phase_name] = depth
            if depth == 0:
                stage_boundary("engine-build", log)
            # Depth 1-2 are the few phases that take the time (graph optimisation, tactic costs);
            # deeper ones repeat per node.
            if 1 <= depth <= 2 and requested() is None:
                log(f"  build: {phase_name.lower()} (at {time.perf_counter() - self.start:.1f} s)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return requested() is None

        def phase_finish(self, phase_name: str) -> None:
            pass

    return BuildProgress()


def mark_fp32_attention_decomposable(lib: TensorRTLibrary, network: "trt.INetworkDefinition") -> tuple[int, int]:
    """(attention layers, how many were marked decomposable).

    Neither library has a fused float32 attention kernel, and an attention layer that is
    not decomposable must get one, so an fp32 graph fails to build ("Attention operation
    was not supported by a dedicated kernel"). Float32 attentions are marked decomposable
    (plain MatMul/Softmax/MatMul); fp16/bf16 ones are left fused, which is the speed.
    """
    trt: Any = lib.module  # IAttention is newer than the 10.13 typing stubs
    output_type = getattr(trt.LayerType, "ATTENTION_OUTPUT", None)
    attention = marked = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if output_type is None or layer.type != output_type:
            continue
        attention += 1
        output: Any = layer
        output.__class__ = trt.IAttentionOutputLayer  # the Python API's documented downcast
        query = output.attention.get_input(0)
        if query is not None and query.dtype == trt.DataType.FLOAT:
            output.attention.decomposable = True
            marked += 1
    return attention, marked


def _set_compute_capabilities(lib: TensorRTLibrary, config: "trt.IBuilderConfig", names: Sequence[str]) -> None:
    members: Any = lib.module.ComputeCapability  # TensorRT-RTX only
    setattr(config, "num_compute_capabilities", len(names))
    for index, name in enumerate(names):
        getattr(config, "set_compute_capability")(getattr(members, name), index)


def _use_timing_cache(config: "trt.IBuilderConfig", cache_path: Path, log: Log) -> None:
    blob = cache_path.read_bytes() if cache_path.exists() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception as exc:  # a corrupt cache only costs build time: start a fresh one
        log(f"ignoring unreadable timing cache {cache_path}: {exc}")
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, False):
        log(f"timing cache {cache_path} is from another GPU or TensorRT; building without it")
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _network_io(network: "trt.INetworkDefinition") -> dict[str, list[dict[str, Any]]]:
    def describe(tensor: "trt.ITensor") -> dict[str, Any]:
        return {"name": tensor.name, "dtype": str(tensor.dtype).rsplit(".", 1)[-1],
                "shape": [int(tensor.shape[i]) for i in range(len(tensor.shape))]}

    return {"inputs": [describe(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [describe(network.get_output(i)) for i in range(network.num_outputs)]}


def _fixed_text_length(profile: EngineProfile, io: Mapping[str, Any]) -> EngineProfile:
    """A static export (--static) fixes the caption length it was traced with; its profile
    takes that length instead of the network's maximum."""
    y_shape = next((t["shape"] for t in io["inputs"] if t["name"] == "y"), None)
    if y_shape is None or len(y_shape) != 3 or y_shape[1] < 0:
        return profile
    return dataclasses.replace(profile, text_length=y_shape[1], min_text_length=None)


def _check_profiles_fit(profiles: Sequence[EngineProfile], io: Mapping[str, Any]) -> None:
    """Each profile shape against the parsed network's inputs (names, ranks, fixed dims), in
    the user's terms, before the library reports a profile error in its own."""
    inputs = {t["name"]: t["shape"] for t in io["inputs"]}
    for index, profile in enumerate(profiles):
        shapes = profile.shapes
        unknown = sorted(set(shapes) - set(inputs))
        if unknown:
            raise EngineError(f"the model has no input(s) {', '.join(unknown)}: not a PiD export")
        for name, extremes in shapes.items():
            model_shape = inputs[name]
            for shape in extremes:
                fixed_mismatch = [axis for axis, (want, got) in enumerate(zip(model_shape, shape))
                                  if want >= 0 and want != got]
                if len(shape) != len(model_shape) or fixed_mismatch:
                    raise EngineError(f"profile {index + 1} gives input {name} shape {list(shape)}, but the model's "
                                      f"input is {model_shape} (-1 = any): the profile is for another network")


def _engine_metadata(onnx_path: Path, profiles: Sequence[EngineProfile], as_built: Sequence[Mapping[str, Any]],
                     parsed: ParsedNetwork, plan: EnginePlan, seconds: float) -> EngineMetadata:
    target = plan.target
    lib = target.library
    return EngineMetadata(
        format=ENGINE_METADATA_FORMAT,
        library=lib.key,
        library_name=lib.label,
        library_version=lib.version,
        compute_capabilities=list(target.compute_capabilities),
        compute_capabilities_source=target.source,
        built_on=target.gpu_name or "CPU (ahead of time)",
        precision=_model_precision(onnx_path),
        profiles=[dict(profile.to_dict(), as_built=shapes) for profile, shapes in zip(profiles, as_built)],
        inputs=list(parsed.io["inputs"]),
        outputs=list(parsed.io["outputs"]),
        attention_layers=parsed.attention_layers,
        decomposable_attention_layers=parsed.decomposable_attention_layers,
        onnx_name=onnx_path.name,
        onnx_sha256=onnx_sha256(onnx_path),
        stripped=plan.strip_weights,
        builder_optimization_level=plan.opt_level,
        workspace_gb=plan.workspace_gb,
        build_seconds=round(seconds, 1),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


__all__ = ["HW", "PROFILE_2K_CLASS_MAX", "PROFILE_2K_CLASS_OPT", "PROFILE_4K_CLASS_OPT", "BuildTarget", "EngineError",
           "EnginePlan", "EngineProfile", "MissingSizeRange", "ProfileSpec", "Shape", "build_engine", "build_planned", "build_target",
           "default_profile_specs", "engine_profiles", "mark_fp32_attention_decomposable", "parse_compute_capabilities",
           "parse_hw", "parse_profiles", "profile_shapes", "tensorrt_status",
           "why_engines_cannot_run_here", "write_atomic"]
