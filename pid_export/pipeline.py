"""The export pipeline: checkpoint -> PidNet -> ONNX -> TensorRT engine -> verify.

One module for the steps `pid-export`, `pid-export --demo` and the benchmarks share.
Each step prints numbered progress through `log` (`[n] title ...` / `done in X s`)
and raises `PipelineError` with one line the user can act on; callers turn it into
their own error output. Nothing here parses command lines.

    load_network    checkpoint (path or hub) -> verified float32 PidNet
    export_network  PidNet -> ONNX export directory (fails on TensorRT lint problems)
    store_caption   the unconditional caption embedding, when an encoder is available
    build_and_verify  engine.plan (+ --verify against the float32 network)
    run_export      all of the above for one release or custom network
                    (--precision fp8: fp8_export.export_fp8 replaces export_network)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import PidConfig
from .network import PidNet
from .staging import ExportTransaction

Log = Callable[[str], None]
HW = tuple[int, int]


class PipelineError(RuntimeError):
    """A step failed for a reason the user can act on (one line)."""


class WriteFailure(PipelineError):
    """The export could not be written (full disk, I/O error): a failure of the run, not of its input."""


class Stages:
    """Numbered progress around long steps: `[n] title ...`, then `    done in X s`."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.count = 0

    def __call__(self, title: str) -> "_Stage":
        self.count += 1
        return _Stage(self.log, f"[{self.count}] {title}")

    def detail(self, message: str) -> None:
        self.log(f"    {message}")


class _Stage:
    def __init__(self, log: Log, title: str) -> None:
        self.log, self.title = log, title

    def __enter__(self) -> "_Stage":
        self.start = time.perf_counter()
        self.log(f"{self.title} ...")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.log(f"    done in {time.perf_counter() - self.start:.1f} s")
        return False


# ---------------------------------------------------------------------------
# Checkpoint -> network


@dataclass
class LoadedNetwork:
    net: PidNet  # float32, CPU, eval mode
    checkpoint: Path | None
    sha256: str | None


def load_network(network: PidConfig, release: Any = None, checkpoint: Path | str | None = None,
                 stages: Stages | None = None) -> LoadedNetwork:
    """Find (local path, else the release's hub file), load and verify a checkpoint; build the network."""
    from .checkpoints import CheckpointError, file_sha256, load_checkpoint, resolve_checkpoint, verify_checkpoint

    stages = stages or Stages(lambda message: None)
    try:
        with stages("locating the checkpoint"):
            path = resolve_checkpoint(release, checkpoint)
            stages.detail(f"{path} ({path.stat().st_size / 1e9:.2f} GB)")
        with stages("loading and verifying the checkpoint"):
            state = load_checkpoint(path)
            verify_checkpoint(state, network, getattr(release, "label", None))
            sha = file_sha256(path)
            count = sum(t.numel() for t in state.values())
            stages.detail(f"{len(state)} tensors, {count / 1e9:.3f} B parameters, sha256 {sha[:16]}...")
    except CheckpointError as exc:
        raise PipelineError(str(exc)) from None
    with stages("building the network"):
        with torch.device("meta"):
            net = PidNet(network)
        # Float32 on the CPU, like the reference's weights under autocast; export_network
        # applies the export precision.
        net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        del state
    return LoadedNetwork(net.eval(), path, sha)


def reload_float32(loaded: LoadedNetwork, network: PidConfig) -> LoadedNetwork:
    """The same checkpoint as a fresh float32 network (the exported one was cast in place)."""
    from .checkpoints import load_checkpoint

    if loaded.checkpoint is None:
        raise PipelineError("the float32 reference needs the checkpoint file the network came from")
    with torch.device("meta"):
        net = PidNet(network)
    net.load_state_dict({k: v.float() for k, v in load_checkpoint(loaded.checkpoint).items()},
                        strict=True, assign=True)
    return LoadedNetwork(net.eval(), loaded.checkpoint, loaded.sha256)


# ---------------------------------------------------------------------------
# Network -> ONNX


def export_network(loaded: LoadedNetwork, out_dir: Path, precision: str, release: Any = None,
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

    stages = stages or Stages(lambda message: None)
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


# ---------------------------------------------------------------------------
# Caption


def store_caption(export_dir: Path, network: PidConfig, caption_model: str | None,
                  stages: Stages | None = None, download: bool = False) -> Path | None:
    """empty_caption.npy for pid-run's caption-less default, when an encoder is available."""
    from .caption_export import store_empty_caption

    stages = stages or Stages(lambda message: None)
    return store_empty_caption(export_dir, caption_model, notify=stages.detail,
                               txt_embed_dim=network.txt_embed_dim, download=download)


# ---------------------------------------------------------------------------
# ONNX -> engine -> verify


@dataclass
class EngineOptions:
    min_hw: HW | None = None
    opt_hw: HW | None = None
    max_hw: HW | None = None
    max_batch: int = 1
    profiles: list[Any] | None = None  # engine.ProfileSpec list (--profiles); None: the release's default
    library: str | None = None  # "tensorrt" | "rtx" | "auto"; None: $PID_TRT, else auto
    compute_capabilities: tuple[str, ...] | None = None  # TensorRT-RTX targets; None: its defaults
    workspace_gb: float | None = None
    strip_weights: bool = False
    verify: bool = False


def engine_status(library: str | None = None) -> tuple[bool, str]:
    """(can build here, one line saying which library or why not); cheap, no GPU work."""
    from .engine import tensorrt_status

    return tensorrt_status(library)


def check_engine_options(options: EngineOptions, precision: str | None = None) -> Any:
    """What the engine step will need, checked before any slow work; returns the BuildTarget.

    FP8 engines run on Ada or newer only: TensorRT-RTX then builds for 8.9 and 12.0 unless
    --compute-capability says otherwise, and any older target (or, for enterprise TensorRT,
    an older build GPU) is refused.

    `--verify` runs the engine, so it needs a GPU the engine can run on. Without one it is
    an error, not a note: the user asked for a checked engine, and a build that ends with
    "ready" but was never run would read as checked. It is refused here, before minutes of
    export and build, with what to do instead.
    """
    from .engine import EngineError, build_target, why_engines_cannot_run_here
    from .fp8 import FP8_DEFAULT_TARGETS, fp8_targets_problem

    try:
        target = build_target(options.library, options.compute_capabilities, options.strip_weights)
        if precision == "fp8" and target.source == "library default":
            target = build_target(options.library, FP8_DEFAULT_TARGETS, options.strip_weights)
    except EngineError as exc:
        raise PipelineError(str(exc)) from None
    if precision == "fp8":
        problem = fp8_targets_problem(target.compute_capabilities)
        if problem is not None:
            raise PipelineError(problem)
    if options.verify:
        targets = None if target.source == "library default" else target.compute_capabilities
        why = why_engines_cannot_run_here(target.library, targets)
        if why is not None:
            raise PipelineError(f"--verify runs the engine, and it cannot run here: {why}. Build without --verify "
                                f"here and check the engine where it runs (pid-export --verify on that GPU)")
    return target


def profiles_for(meta: Any, release: Any, options: EngineOptions) -> list[Any]:
    """The engine's optimization profiles (engine.EngineProfile) for an export's metadata:
    --profiles, else --min/--opt/--max over the export's range (opt: the release's main
    size), else the release's default profiles (two for 2kto4k releases)."""
    from .engine import default_profile_specs, engine_profiles

    # A static export (--static) has one size: one profile at it, whatever the release's defaults.
    fixed = meta.min_size is not None and list(meta.min_size) == list(meta.max_size or [])
    specs = options.profiles
    if specs is None and not fixed and (options.min_hw, options.opt_hw, options.max_hw) == (None, None, None):
        specs = default_profile_specs(release)
    opt_hw = options.opt_hw
    if opt_hw is None and not specs:
        if fixed:
            opt_hw = tuple(meta.min_size)
        elif getattr(release, "opt_size", None) is not None:
            opt_hw = tuple(release.opt_size)
    return engine_profiles(meta, specs, options.min_hw, opt_hw, options.max_hw, max_batch=options.max_batch)


def planned_profiles(network: PidConfig, release: Any, options: EngineOptions,
                     static_shape: tuple[int, int, int] | None = None) -> list[Any]:
    """`profiles_for` from what the export's metadata will say, so that profile mistakes
    fail before the export instead of after it."""
    from pid_runtime.metadata import ModelMetadata

    sizes = [list(s) for s in getattr(release, "trained_sizes", ())]
    low, high = getattr(release, "min_size", None), getattr(release, "max_size", None)
    if static_shape is not None:
        low = high = static_shape[1:]
    meta = ModelMetadata(release=getattr(release, "name", None), latent_channels=network.lq_latent_channels,
                         latent_down_factor=network.latent_spatial_down_factor, sr_factor=network.sr_scale,
                         txt_embed_dim=network.txt_embed_dim, txt_max_length=network.txt_max_length,
                         precision="unknown", trained_sizes=sizes, min_size=list(low) if low else None,
                         max_size=list(high) if high else None)
    return profiles_for(meta, release, options)


def build_and_verify(export_dir: Path, release: Any, precision: str, options: EngineOptions,
                     reference: LoadedNetwork | None = None, stages: Stages | None = None) -> Path:
    """engine.plan in `export_dir`; with `options.verify`, compared with `reference` (float32 PidNet).

    A plan that fails verification is set aside as rejected-engine.plan (the runtime would
    otherwise load it) and the step fails.
    """
    from pid_runtime.metadata import MODEL_METADATA, ONNX_NAME, ModelMetadata

    from .engine import EngineError, build_engine, set_aside_rejected
    from .interrupts import stage_boundary
    from .verify import require_passed, verify_engine

    stages = stages or Stages(lambda message: None)
    meta = ModelMetadata.load(export_dir / MODEL_METADATA)
    try:
        target = check_engine_options(options, precision)
        profiles = profiles_for(meta, release, options)
        sizes = ", ".join(f"{p.min_hw}..{p.max_hw} tuned for {p.opt_hw}" for p in profiles)
        with stages(f"building the {target.library.label} engine ({precision}, {len(profiles)} profile(s): {sizes})"):
            plan = build_engine(export_dir / ONNX_NAME, export_dir, profiles, target=target,
                                workspace_gb=options.workspace_gb, strip_weights=options.strip_weights,
                                log=stages.detail)
            stages.detail(f"{plan.name} ({plan.stat().st_size / 1e6:.1f} MB)")
        if options.verify:
            if reference is None:
                raise PipelineError("--verify needs the float32 network the engine was exported from")
            with stages("verifying the engine against the float32 PyTorch network (min, opt, max sizes)"):
                stage_boundary("verify", stages.detail)
                try:
                    require_passed(verify_engine(plan, export_dir / ONNX_NAME, net=reference.net,
                                                 log=stages.detail))
                except EngineError as exc:
                    if plan.exists():
                        stages.detail(f"the plan is kept as {set_aside_rejected(plan)}, not as {plan.name}")
                    raise
    except EngineError as exc:
        raise PipelineError(str(exc)) from None
    return plan


# ---------------------------------------------------------------------------
# Everything


@dataclass
class ExportRequest:
    """One `pid-export` run: what to export, where, and which optional steps to take."""

    network: PidConfig
    out_dir: Path
    release: Any = None  # a registry Release (None for a custom network)
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
    fp8: Any = None  # fp8_export.Fp8Options for precision "fp8" (None: its defaults)


def _engine_plan_ok(request: ExportRequest, log: Log) -> bool:
    """Engine options and profiles checked before the export. A custom network without a
    size range gets no engine (a note) unless --engine demands one."""
    from .engine import EngineError, MissingSizeRange

    target = check_engine_options(request.engine, request.precision)
    try:
        profiles = planned_profiles(request.network, request.release, request.engine, request.static_shape)
    except MissingSizeRange as exc:
        if request.require_engine:
            raise PipelineError(str(exc)) from None
        log(f"engine step will be skipped: {exc}")
        return False
    except EngineError as exc:
        raise PipelineError(str(exc)) from None
    log(f"engine: {target.library.description}, {len(profiles)} optimization profile(s), "
        f"{'built on ' + target.gpu_name if target.gpu_name else 'built CPU-only'} for compute capability "
        f"{', '.join(target.compute_capabilities)}")
    return True


def run_export(request: ExportRequest, log: Log) -> Path:
    """Checkpoint -> ONNX -> caption -> engine (-> verify); returns the export directory.

    One transaction (staging.py): everything is written into a staging directory beside
    `request.out_dir`, which replaces it in one rename at the end; until then an earlier
    export there is untouched, and on any failure or signal it stays as it was.
    """
    from .staging import StagingError, check_output_dir

    try:
        check_output_dir(request.out_dir)  # a foreign --out: one line, before any work
    except StagingError as exc:
        raise PipelineError(str(exc)) from None
    stages = Stages(log)
    build = False
    if not request.onnx_only:
        # Said before minutes of export, and a required engine fails here, not after them.
        usable, why = engine_status(request.engine.library)
        if usable:
            build = _engine_plan_ok(request, log)
            if build and request.precision == "fp32":
                log("note: building an fp32 engine; use --precision bf16 for speed")
        elif request.require_engine:
            raise PipelineError(f"cannot build the engine: {why}")
        else:
            log(f"engine step will be skipped: {why}")
    if request.engine.verify and not build:
        log("note: --verify applies to the engine, which is not built in this run")

    with one_line_write_errors(request.out_dir), ExportTransaction(request.out_dir, log) as transaction:
        _export_into(transaction.stage, request, build, stages, log)
        transaction.commit()
    return request.out_dir


def _export_into(stage: Path, request: ExportRequest, build: bool, stages: Stages, log: Log) -> None:
    """Every file of the export (ONNX, caption, engine, verify) into the staging directory."""
    from .interrupts import stage_boundary

    loaded = load_network(request.network, request.release, request.checkpoint, stages)
    if request.precision == "fp8":
        from .fp8_export import Fp8Options, export_fp8

        export_fp8(loaded, stage, request.release, request.fp8 or Fp8Options(), static_shape=request.static_shape,
                   allow_lint_problems=request.allow_lint_problems, stages=stages)
    else:
        export_network(loaded, stage, request.precision, request.release, request.static_shape,
                       request.allow_lint_problems, stages, in_place=True, shown_as=request.out_dir)
    if request.empty_caption:
        stage_boundary("caption", log)
        store_caption(stage, request.network, request.caption_model, stages, download=request.download_caption_model)
    if build:
        # export_network cast the network to the export precision: --verify reloads float32 weights.
        reference = reload_float32(loaded, request.network) if request.engine.verify else None
        build_and_verify(stage, request.release, request.precision, request.engine, reference, stages)


@contextmanager
def one_line_write_errors(out_dir: Path) -> Iterator[None]:
    """A full disk (or any write failure) anywhere in the export is one line, not a traceback."""
    from .staging import StagingError

    kept = " (the previous export there is unchanged)" if out_dir.exists() else ""
    try:
        yield
    except StagingError as exc:
        raise PipelineError(str(exc)) from None
    except OSError as exc:
        raise WriteFailure(f"cannot write the export to {out_dir}: {exc.strerror or exc}{kept}") from None
