"""Which TensorRT library builds and runs engines: enterprise TensorRT or TensorRT for RTX.

    tensorrt  NVIDIA TensorRT (`import tensorrt`): data-centre (H100/H200, B200) and RTX GPUs.
              A build times kernels on the GPU it runs on, so it needs that GPU.
    rtx       TensorRT for RTX (`import tensorrt_rtx`, PyPI `tensorrt-rtx-cu13`): RTX-class GPUs
              (compute capability 8.0, 8.6, 8.9, 12.0 and later; not Hopper or B200). Builds
              ahead of time on a machine without a GPU; kernels are specialised at first run.

Both expose the same Python API for what this project does; where they differ,
the difference is probed as a feature (`hasattr`), never read off a version number.
The choice: an explicit one (`--trt`), else $PID_TRT, else "auto": whichever is
importable, enterprise first when a CUDA GPU is visible (it serves every GPU and
builds there), TensorRT-RTX first when none is (it is the one that can build).

A plan runs only with the library that built it: the engine sidecar records it
(`engine.json` "library"), and `library_for_plan` refuses the other one.
Nothing here imports a TensorRT library until asked, and `pid_runtime` imports
without either.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from .backends.base import BackendError

if TYPE_CHECKING:
    import tensorrt as trt

    from .engine_metadata import EngineMetadata

Shape = tuple[int, ...]

ENV_VAR = "PID_TRT"
AUTO, ENTERPRISE, RTX = "auto", "tensorrt", "rtx"
CHOICES = (AUTO, ENTERPRISE, RTX)

RTX_PIN = "tensorrt-rtx-cu13==1.7.1.116"  # the version CI builds with (pyproject's `rtx` extra)


@dataclass(frozen=True)
class LibraryKind:
    """What a user needs to know about one library, before it is imported."""

    key: str  # the --trt value
    module_name: str
    label: str
    install: str
    serves: str


KINDS: dict[str, LibraryKind] = {
    ENTERPRISE: LibraryKind(
        ENTERPRISE, "tensorrt", "TensorRT",
        "pip install --extra-index-url https://pypi.nvidia.com 'tensorrt>=10.14'",
        "data-centre and RTX GPUs; builds need that GPU"),
    RTX: LibraryKind(
        RTX, "tensorrt_rtx", "TensorRT-RTX",
        f"pip install 'pid-export[rtx]' (or {RTX_PIN})",
        "RTX GPUs, compute capability 8.0/8.6/8.9/12.0+; builds without a GPU"),
}

# TensorRT-RTX's default build targets (its documentation: "compute capability 8.0, 8.6,
# 8.9, 12.0, and later"); `--compute-capability` narrows or widens them.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0+")


class LibraryError(BackendError):
    """No usable TensorRT library, or the wrong one for a plan (one line for the user)."""


def normalise_choice(choice: str | None) -> str:
    """`choice`, else $PID_TRT, else "auto"; a clear error for anything else."""
    value = choice if choice is not None else os.environ.get(ENV_VAR) or AUTO
    key = {"tensorrt_rtx": RTX, "tensorrt-rtx": RTX}.get(value.strip().lower(), value.strip().lower())
    if key not in CHOICES:
        source = "--trt" if choice is not None else f"${ENV_VAR}"
        raise LibraryError(f"{source}={value!r} is not a TensorRT library: use {', '.join(CHOICES)}")
    return key


# ---------------------------------------------------------------------------
# One imported library and its features


@dataclass(frozen=True)
class TensorRTLibrary:
    kind: LibraryKind
    module: Any  # the imported `tensorrt` / `tensorrt_rtx` module (one API; typed by tensorrt-stubs)
    version: str

    @property
    def key(self) -> str:
        return self.kind.key

    @property
    def label(self) -> str:
        return self.kind.label

    @property
    def description(self) -> str:
        return f"{self.label} {self.version}"

    # Features, probed on the module itself.
    @property
    def builds_without_gpu(self) -> bool:
        """Ahead-of-time builds for a list of target compute capabilities (TensorRT-RTX)."""
        return hasattr(self.module.IBuilderConfig, "set_compute_capability")

    @property
    def uses_timing_cache(self) -> bool:
        """Kernel timing happens only where kernels are timed on the build GPU. TensorRT-RTX keeps
        the timing-cache calls, but they do nothing except query a GPU (which a CPU build lacks)."""
        return not self.builds_without_gpu

    @property
    def needs_strongly_typed_flag(self) -> bool:
        """TensorRT 10.x still has weak typing (precision flags) and must be asked for strong
        typing; TensorRT 11 and TensorRT-RTX networks are always strongly typed."""
        return hasattr(self.module.BuilderFlag, "FP16")

    @property
    def has_engine_validity(self) -> bool:
        """`Runtime.get_engine_validity(plan)`: a cheap header check before deserialising."""
        return hasattr(self.module.Runtime, "get_engine_validity")

    @property
    def has_runtime_cache(self) -> bool:
        """A serialisable cache of the kernels compiled at run time (JIT)."""
        config = getattr(self.module, "IRuntimeConfig", None)
        return config is not None and hasattr(config, "set_runtime_cache")

    @property
    def eager_kernel_specialization(self) -> Any:
        """The runtime config value that compiles each shape's specialised kernels before its
        first run (TensorRT-RTX's `DynamicShapesKernelSpecializationStrategy.EAGER`), or None
        where kernels are not specialised at run time (enterprise TensorRT)."""
        strategy = getattr(self.module, "DynamicShapesKernelSpecializationStrategy", None)
        return getattr(strategy, "EAGER", None)

    @property
    def has_whole_graph_capture(self) -> bool:
        """The library captures and replays each engine launch as a CUDA graph itself."""
        return hasattr(getattr(self.module, "CudaGraphStrategy", None), "WHOLE_GRAPH_CAPTURE")


def _import(kind: LibraryKind) -> tuple[ModuleType | None, str | None]:
    """(module, None) for a real, usable install; (None, why not) otherwise."""
    try:
        module = importlib.import_module(kind.module_name)
    except (ImportError, OSError):  # OSError: the wheel is there but its shared libraries are not
        return None, f"{kind.label} is not installed: {kind.install}"
    # `tensorrt-stubs` alone makes `import tensorrt` succeed on an empty namespace package.
    version = getattr(module, "__version__", None)
    if not isinstance(version, str) or not hasattr(module, "Builder"):
        return None, f"{kind.label} is not installed (only its typing stubs are): {kind.install}"
    if not hasattr(module, "IAttention"):  # the ONNX Attention op imports as IAttention (TensorRT >= 10.14)
        return None, (f"{kind.label} {version} is too old: it has no fused attention layer for the ONNX "
                      f"Attention op (needs TensorRT >= 10.14): {kind.install}")
    return module, None


_loaded: dict[str, TensorRTLibrary | str] = {}


def load(key: str) -> TensorRTLibrary | str:
    """The library `key` ("tensorrt" / "rtx"), imported once; or the sentence saying why it is unusable."""
    if key not in _loaded:
        kind = KINDS[key]
        module, problem = _import(kind)
        if module is None:
            _loaded[key] = problem or f"{kind.label} cannot be imported"
        else:
            _loaded[key] = TensorRTLibrary(kind, module, module.__version__)
    return _loaded[key]


def problem_of(key: str) -> str | None:
    found = load(key)
    return found if isinstance(found, str) else None


def gpu_visible() -> bool:
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------
# Choosing


def choose_library(choice: str | None, problem: Callable[[str], str | None], gpu: bool) -> str:
    """The key of the library to use (pure decision; `problem(key)` is None when `key` is usable).

    Libraries are probed lazily, in order, so "auto" never imports the second one
    when the first will do.
    """
    key = normalise_choice(choice)
    if key != AUTO:
        reason = problem(key)
        if reason is not None:
            raise LibraryError(reason)
        return key
    order = (ENTERPRISE, RTX) if gpu else (RTX, ENTERPRISE)
    for candidate in order:
        if problem(candidate) is None:
            return candidate
    raise LibraryError("no TensorRT library is installed: " + "; or ".join(
        f"{KINDS[k].label} ({KINDS[k].serves}): {KINDS[k].install}" for k in order))


def select_library(choice: str | None = None) -> TensorRTLibrary:
    """The library to build or run with (see the module docstring); LibraryError when none fits."""
    found = load(choose_library(choice, problem_of, gpu_visible()))
    if isinstance(found, str):  # not reached: choose_library returns usable keys only
        raise LibraryError(found)
    return found


def library_status(choice: str | None = None) -> tuple[TensorRTLibrary | None, str]:
    """(library or None, one line naming it or saying why there is none). Never raises."""
    try:
        lib = select_library(choice)
    except LibraryError as exc:
        return None, str(exc)
    return lib, lib.description


def library_for_plan(engine_meta: "EngineMetadata | None", choice: str | None = None,
                     plan_name: str = "engine plan") -> TensorRTLibrary:
    """The library that can load a plan: the one its sidecar names (a sidecar from before
    TensorRT-RTX support names none and means enterprise TensorRT). Asking for the other
    one, or not having the right one, is refused with one line."""
    if engine_meta is None:
        return select_library(choice)
    built_key = engine_meta.library or ENTERPRISE
    if built_key not in KINDS:
        raise LibraryError(f"{plan_name} was built with an unknown library {built_key!r}; rebuild it with pid-export")
    built = KINDS[built_key]
    built_version = engine_meta.library_version or ""
    built_text = f"{built.label} {built_version}".strip()
    wanted = normalise_choice(choice)
    if wanted not in (AUTO, built_key):
        raise LibraryError(f"{plan_name} was built with {built_text} and cannot run with {KINDS[wanted].label} "
                           f"(a plan runs only with the library that built it): rebuild it with "
                           f"pid-export --trt {wanted}, or use {built.label}")
    found = load(built_key)
    if isinstance(found, str):
        raise LibraryError(f"{plan_name} was built with {built_text}, which is not usable here ({found})")
    return found


def rtx_default_targets_include(compute_capability: str) -> bool:
    """Whether a GPU of `compute_capability` ("8.6") is among TensorRT-RTX's default targets."""
    major, _, minor = compute_capability.partition(".")
    return f"{major}.{minor}" in RTX_DEFAULT_TARGETS or int(major) >= 12


# ---------------------------------------------------------------------------
# Glue shared by the builder (pid_export.engine) and the backend (needs a library)


def recording_logger(lib: TensorRTLibrary, errors: list[str], echo: Callable[[str], None] | None = None,
                     verbose: bool = False) -> "trt.ILogger":
    """A logger of `lib` that appends error messages to `errors` (the reason behind a None
    from the builder or runtime) and echoes warnings and errors."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = lib.module

    error_levels = {trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR}
    echo_levels = error_levels | {trt.ILogger.Severity.WARNING}
    if verbose:
        echo_levels |= {trt.ILogger.Severity.INFO}
    label = lib.label

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # TensorRT requires the explicit base init

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in error_levels:
                errors.append(msg)
            if echo is not None and severity in echo_levels:
                echo(f"[{label}] {msg}")

    return RecordingLogger()


def last_errors(errors: Sequence[str], count: int = 3) -> str:
    return " | ".join(errors[-count:]) if errors else "no error was logged"


def dims_tuple(dims: "trt.Dims") -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


def torch_dtype(lib: TensorRTLibrary, dtype: "trt.DataType") -> torch.dtype:
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = lib.module

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise BackendError(f"engine I/O type {dtype} has no torch equivalent")
    return table[dtype]


__all__ = ["AUTO", "CHOICES", "ENTERPRISE", "ENV_VAR", "KINDS", "LibraryError", "RTX", "RTX_DEFAULT_TARGETS",
           "TensorRTLibrary", "choose_library", "gpu_visible", "library_for_plan", "library_status",
           "last_errors", "load", "normalise_choice", "recording_logger", "torch_dtype", "dims_tuple", "rtx_default_targets_include", "select_library"]
