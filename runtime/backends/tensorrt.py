"""TensorRT backend: runs an `engine.plan` built by `pid-export`.

TensorRT is imported lazily, so `pid_runtime` works without it. The checks a
user meets first (is this file a plan, was it built for this TensorRT and this
GPU, is a shape inside the engine's profile) are plain functions that need no
TensorRT: `probe_plan`, `check_plan_compatibility`, `profile_violation`.

Buffer discipline: per (batch, H, W, text length) the input shapes are set, the
I/O buffers (torch CUDA tensors) are allocated and their addresses handed to
TensorRT once; each network call then only copies `t` and runs
`execute_async_v3`. The sampler keeps x in the bound x buffer (`input_buffer`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..metadata import INPUT_NAMES, OUTPUT_NAMES, ModelMetadata
from ..precision import precision_problem
from ..sampler import MAX_STEPS, sample
from .base import Backend, BackendError

if TYPE_CHECKING:
    import tensorrt as trt

    from ..cuda_graph import CapturedSampler
    from ..sampler import Noise

MIN_TENSORRT = (10, 14)
INSTALL_HINT = ("pip install --extra-index-url https://pypi.nvidia.com 'tensorrt>=10.14' "
                "(needs an NVIDIA GPU)")
ONNX_FALLBACK = "pid-run can run the export directory's model.onnx with ONNX Runtime instead"

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------
# Finding TensorRT (no TensorRT needed)


def installed_tensorrt_version() -> str | None:
    """Version of the importable TensorRT, or None.

    `import tensorrt` alone proves nothing: with only `tensorrt-stubs` installed
    it imports an empty namespace package. A real install has `__version__`.
    """
    try:
        import tensorrt as trt_module
    except (ImportError, OSError):  # OSError: wheel present but libnvinfer missing
        return None
    # Not in the 10.13 stubs, but every real TensorRT wheel sets it.
    version = getattr(trt_module, "__version__", None)
    return version if isinstance(version, str) else None


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.14.1.48' -> (10, 14, 1, 48); stops at the first non-numeric part."""
    parts: list[int] = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def tensorrt_problem(version: str | None) -> str | None:
    """Why TensorRT `version` (from `installed_tensorrt_version`) cannot be used, or None."""
    if version is None:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    if version_tuple(version)[:2] < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        return f"TensorRT {version} is too old (need >= {need}): {INSTALL_HINT}"
    return None


def require_tensorrt() -> str:
    """The installed TensorRT version; BackendError when it is absent or too old."""
    version = installed_tensorrt_version()
    problem = tensorrt_problem(version)
    if problem is not None or version is None:
        raise BackendError(f"{problem} ({ONNX_FALLBACK})")
    return version


# ---------------------------------------------------------------------------
# Checks on a plan file and its metadata sidecar (no TensorRT needed)


def probe_plan(path: Path) -> str | None:
    """What is obviously wrong with `path` as a TensorRT plan, or None.

    The plan format itself is undocumented, so this only recognises files that
    are certainly something else; TensorRT has the last word when it loads.
    """
    path = Path(path)
    if not path.exists():
        return f"engine file {path} does not exist"
    if path.is_dir():
        return f"engine path {path} is a directory (expected an engine.plan file)"
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head:
        return f"{path} is empty, not a TensorRT engine (the build may have been interrupted)"
    kind = _known_non_plan(head, path.suffix.lower())
    if kind is not None:
        return f"{path} is {kind}, not a TensorRT engine plan"
    return None


def _known_non_plan(head: bytes, suffix: str) -> str | None:
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "a JSON file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (.npz / .pth?)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    if suffix == ".onnx" or _looks_like_onnx(head):
        return "an ONNX model (build an engine with pid-export, or run it with the ONNX Runtime backend)"
    return None


def _looks_like_onnx(head: bytes) -> bool:
    # An ONNX ModelProto starts with field 1 (ir_version, a small varint),
    # followed by another ModelProto field tag (producer, domain, graph, opsets).
    model_proto_tags = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72}
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 30 and head[2] in model_proto_tags


def engine_metadata_path(plan_path: Path) -> Path:
    """The sidecar of `engine.plan` is `engine.json` (same stem, next to it)."""
    return Path(plan_path).with_suffix(".json")


def load_engine_metadata(plan_path: Path) -> dict[str, Any] | None:
    """The plan's sidecar as a dict, None when there is none; BackendError when unreadable."""
    path = engine_metadata_path(plan_path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackendError(f"cannot read engine metadata {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BackendError(f"engine metadata {path} is not a JSON object")
    return data


def check_plan_compatibility(engine_meta: Mapping[str, Any], trt_version: str,
                             compute_capability: str) -> str | None:
    """The sentence TensorRT would log when refusing this plan here, or None.

    A plan runs only on the TensorRT version and GPU compute capability it was
    built with (TensorRT's own wording: "expecting" is this machine, "got" is
    the plan). Fields missing from the metadata are not checked.
    """
    built_version = engine_meta.get("tensorrt_version")
    if built_version and str(built_version) != trt_version:
        return (f"engine plan is not compatible with this version of TensorRT, expecting library "
                f"version {trt_version} got {built_version}; rebuild it here with pid-export")
    built_compute = engine_meta.get("compute_capability")
    if built_compute and str(built_compute) != compute_capability:
        gpu = engine_meta.get("gpu_name")
        built_on = f" ({gpu})" if gpu else ""
        return (f"engine plan was generated on an incompatible device{built_on}, expecting compute "
                f"{compute_capability} got compute {built_compute}; rebuild it on this GPU with pid-export")
    return None


def compute_capability_string(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


# What each dimension of each input means, for "outside the profile" messages.
_DIM_LABELS: dict[str, Sequence[str]] = {
    "x": ("batch", "channels", "height", "width"),
    "t": ("batch",),
    "y": ("batch", "caption length", "caption embedding width"),
    "lq_latent": ("batch", "latent channels", "latent height", "latent width"),
    "degrade_sigma": ("batch",),
}


def profile_violation(shapes: Mapping[str, Shape],
                      ranges: Mapping[str, tuple[Shape, Shape]]) -> str | None:
    """First input dimension outside the engine's [min, max] profile, as a sentence; else None.

    `ranges[name] = (min_shape, max_shape)` from `get_tensor_profile_shape`.
    The output size (x) is reported first since it is what users choose.
    """
    for name in INPUT_NAMES:
        if name not in shapes or name not in ranges:
            continue
        shape, (low, high) = shapes[name], ranges[name]
        if len(shape) != len(low):
            return f"input {name} has shape {list(shape)}; the engine expects {len(low)} dimensions"
        labels = _DIM_LABELS.get(name, ())
        for axis, (value, lo, hi) in enumerate(zip(shape, low, high)):
            if lo <= value <= hi:
                continue
            label = labels[axis] if axis < len(labels) else f"dimension {axis}"
            if name == "x" and axis in (2, 3):
                return (f"output size {shape[2]}x{shape[3]} is outside the engine profile "
                        f"{low[2]}x{low[3]} .. {high[2]}x{high[3]} (HxW); use an engine built for it "
                        f"(pid-export --min/--max HxW) or the export's model.onnx")
            allowed = f"{lo}" if lo == hi else f"{lo}..{hi}"
            return f"{label} {value} (input {name}) is outside the engine profile: allowed {allowed}"
    return None


# ---------------------------------------------------------------------------
# TensorRT glue (needs TensorRT)


def recording_logger(errors: list[str], echo: Callable[[str], None] | None = None,
                     verbose: bool = False) -> "trt.ILogger":
    """A TensorRT logger that appends error messages to `errors` (the reason
    behind a None from the builder or runtime) and echoes warnings and errors."""
    import tensorrt as trt

    error_levels = {trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR}
    echo_levels = error_levels | {trt.ILogger.Severity.WARNING}
    if verbose:
        echo_levels |= {trt.ILogger.Severity.INFO}

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # TensorRT requires the explicit base init

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in error_levels:
                errors.append(msg)
            if echo is not None and severity in echo_levels:
                echo(f"[TensorRT] {msg}")

    return RecordingLogger()


def last_errors(errors: Sequence[str], count: int = 3) -> str:
    return " | ".join(errors[-count:]) if errors else "no error was logged"


def _dims(dims: "trt.Dims") -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: "trt.DataType") -> torch.dtype:
    import tensorrt as trt

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


class TensorRTBackend(Backend):
    """One deserialized engine, one execution context, buffers bound per shape.

    `cuda_graph=True` makes `sample` capture the whole sampler loop as one CUDA
    graph per (shape, steps) (see `pid_runtime.cuda_graph`).
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | Path, meta: ModelMetadata | None = None,
                 device: torch.device | str | None = None, *, cuda_graph: bool = False,
                 log: Callable[[str], None] | None = None):
        """`meta` defaults to the export's pid_export.json beside the plan;
        `device` to the current CUDA device; `log` receives TensorRT's warnings."""
        plan_path = Path(plan_path)
        problem = probe_plan(plan_path)
        if problem is not None:
            raise BackendError(problem)
        trt_version = require_tensorrt()
        if meta is None:
            from . import load_model_metadata

            meta = load_model_metadata(plan_path)
        if not torch.cuda.is_available():
            raise BackendError(f"TensorRT needs a CUDA GPU and none is visible ({ONNX_FALLBACK})")
        dev = torch.device(device if device is not None else "cuda")
        if dev.type != "cuda":
            raise BackendError(f"TensorRT runs on a CUDA device, not {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        super().__init__(meta, dev)

        engine_meta = load_engine_metadata(plan_path)
        precision = (engine_meta or {}).get("precision") or meta.precision
        problem = precision_problem(precision, compute_capability_string(dev), where=torch.cuda.get_device_name(dev))
        if problem is not None:  # e.g. an FP8 engine on an Ampere GPU: say so before TensorRT fails
            raise BackendError(f"{plan_path}: {problem}")
        if engine_meta is not None:
            problem = check_plan_compatibility(engine_meta, trt_version, compute_capability_string(dev))
            if problem is not None:
                raise BackendError(f"{plan_path}: {problem}")

        import tensorrt as trt

        self._errors: list[str] = []
        self._logger = recording_logger(self._errors, echo=log)
        with torch.cuda.device(dev):
            self._runtime = trt.Runtime(self._logger)
            # The stubs say ICudaEngine, but a plan TensorRT rejects gives None.
            engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if engine is None:
                raise BackendError(f"{plan_path} could not be loaded as a TensorRT engine: "
                                   f"{last_errors(self._errors)}")
            if engine_meta is not None and engine_meta.get("stripped"):
                self._refit(engine, plan_path.parent / str(engine_meta.get("onnx_name", "model.onnx")))
            self._engine = engine
            self._dtypes, self._ranges = self._read_io(engine)
            context: trt.IExecutionContext | None = engine.create_execution_context(
                trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise BackendError(f"could not create a TensorRT execution context: {last_errors(self._errors)}")
            self._context = context
            self._stream = torch.cuda.Stream(dev)
        self.cuda_graph = cuda_graph
        self._shape_key: tuple[Shape, ...] | None = None
        self._buffers: dict[str, Tensor] = {}
        self._activations: Tensor | None = None  # TensorRT's scratch memory, sized per shape
        self._graphs: dict[int, CapturedSampler] = {}  # steps -> captured loop for the bound shape

    # -- loading ----------------------------------------------------------
    def _refit(self, engine: "trt.ICudaEngine", onnx_path: Path) -> None:
        """Fill a weight-stripped plan with the weights of the ONNX it was built from."""
        import tensorrt as trt

        if not onnx_path.exists():
            raise BackendError(f"this engine was built without weights; it needs {onnx_path} "
                               f"(the ONNX it was built from) next to it")
        refitter = trt.Refitter(engine, self._logger)
        onnx_refitter = trt.OnnxParserRefitter(refitter, self._logger)
        if not onnx_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise BackendError(f"could not load the weights of {onnx_path} into the engine: "
                               f"{last_errors(self._errors)}")

    def _read_io(self, engine: "trt.ICudaEngine") -> tuple[dict[str, torch.dtype], dict[str, tuple[Shape, Shape]]]:
        import tensorrt as trt

        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        missing = [n for n in (*INPUT_NAMES, *OUTPUT_NAMES) if n not in names]
        if missing:
            raise BackendError(f"engine is not a PiD export: it lacks tensor(s) {', '.join(missing)}")
        dtypes = {name: _torch_dtype(engine.get_tensor_dtype(name)) for name in names}
        ranges: dict[str, tuple[Shape, Shape]] = {}
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                low, _opt, high = engine.get_tensor_profile_shape(name, 0)
                ranges[name] = (_dims(low), _dims(high))
        return dtypes, ranges

    @property
    def profile_ranges(self) -> dict[str, tuple[Shape, Shape]]:
        """Per input: (min shape, max shape) of the engine's optimization profile."""
        return dict(self._ranges)

    # -- binding ----------------------------------------------------------
    def bind(self, y: Tensor, lq_latent: Tensor, degrade_sigma: Tensor, height: int, width: int) -> None:
        batch = int(lq_latent.shape[0])
        shapes: dict[str, Shape] = {
            "x": (batch, 3, height, width),
            "t": (batch,),
            "y": tuple(int(d) for d in y.shape),
            "lq_latent": tuple(int(d) for d in lq_latent.shape),
            "degrade_sigma": tuple(int(d) for d in degrade_sigma.shape),
        }
        problem = profile_violation(shapes, self._ranges)
        if problem is not None:
            raise BackendError(problem)
        key = tuple(shapes[name] for name in INPUT_NAMES)
        if key != self._shape_key:
            self._allocate(shapes)
            self._shape_key = key
        self._buffers["y"].copy_(y)
        self._buffers["lq_latent"].copy_(lq_latent)
        self._buffers["degrade_sigma"].copy_(degrade_sigma)

    def _allocate(self, shapes: Mapping[str, Shape]) -> None:
        """Set input shapes, allocate I/O buffers and scratch memory, hand addresses to TensorRT."""
        self._stream.synchronize()  # old buffers may still be in use by queued work
        self._graphs.clear()
        self._buffers = {}
        self._shape_key = None  # stays unset if anything below fails
        ctx = self._context
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise BackendError(f"TensorRT rejected shape {list(shape)} for input {name}: "
                                   f"{last_errors(self._errors)}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise BackendError(f"TensorRT could not infer shapes for {', '.join(unresolved)}")
        buffers = {name: torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                   for name, shape in shapes.items()}
        for name in OUTPUT_NAMES:
            shape = _dims(ctx.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
        for name, buffer in buffers.items():
            if not ctx.set_tensor_address(name, buffer.data_ptr()):
                raise BackendError(f"TensorRT rejected the buffer of {name}: {last_errors(self._errors)}")
        # Scratch memory for these shapes only, not the profile's max (a 2K decode
        # with a 2K..4K engine should not hold 4K activations).
        needed = ctx.update_device_memory_size_for_shapes()
        if self._activations is None or self._activations.numel() < needed:
            self._activations = None
            self._activations = torch.empty(max(needed, 1), dtype=torch.uint8, device=self.device)
        ctx.set_device_memory(self._activations.data_ptr(), self._activations.numel())
        self._buffers = buffers

    def input_buffer(self) -> Tensor | None:
        return self._buffers.get("x")

    # -- running ----------------------------------------------------------
    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The network output for x, t. It lives in the bound output buffer and is
        overwritten by the next call."""
        if not self._buffers:
            raise BackendError("TensorRTBackend.velocity called before bind()")
        x_buffer = self._buffers["x"]
        if x.data_ptr() != x_buffer.data_ptr():
            x_buffer.copy_(x)
        self._buffers["t"].copy_(t)
        self._execute()
        out = self._buffers["velocity"]
        return out if out.dtype == torch.float32 else out.float()

    def _execute(self) -> None:
        current = torch.cuda.current_stream(self.device)
        if current == torch.cuda.default_stream(self.device):
            # TensorRT on the legacy default stream adds syncs; run on ours, ordered with it.
            self._stream.wait_stream(current)
            ok = self._context.execute_async_v3(self._stream.cuda_stream)
            current.wait_stream(self._stream)
        else:
            # A caller's stream, or the stream a CUDA graph is being captured on.
            ok = self._context.execute_async_v3(current.cuda_stream)
        if not ok:
            raise BackendError(f"TensorRT execution failed: {last_errors(self._errors)}")

    def sample(self, noise: "Tensor | Noise", eps: Sequence[Tensor] | Tensor | None = None, steps: int = MAX_STEPS,
               on_step: Callable[[int, float], None] | None = None, out: Tensor | None = None) -> Tensor:
        """The sampler loop with x kept in the bound buffer (`noise`, `eps`, `out`: see
        `pid_runtime.sampler.sample`); replayed CUDA graphs, one per step, when `cuda_graph` is set."""
        if not self._buffers:
            raise BackendError("TensorRTBackend.sample called before bind()")
        if not self.cuda_graph:
            return sample(self.velocity, noise, eps, steps, x_buffer=self._buffers["x"], on_step=on_step, out=out)
        from ..cuda_graph import CapturedSampler

        graph = self._graphs.get(steps)
        if graph is None:
            graph = CapturedSampler(self.velocity, tuple(self._buffers["x"].shape), steps, self.device,
                                    x_buffer=self._buffers["x"])
            self._graphs[steps] = graph
        return graph(noise, eps, on_step=on_step, out=out)

    def close(self) -> None:
        if self._buffers:
            self._stream.synchronize()
        self._graphs.clear()
        self._buffers = {}
        self._activations = None
