"""TensorRT backend: runs an `engine.plan` built by `pid-export`, with enterprise TensorRT
or TensorRT-RTX (whichever built it; see `pid_runtime.trt_library`).

The library is imported lazily, so `pid_runtime` works without one. The checks a
user meets first (is this file a plan, which library built it, does it fit this
GPU, is a shape inside one of the engine's profiles) need no TensorRT and live in
`pid_runtime.trt_plan` (re-exported here); the logger and type tables shared with
the builder in `pid_runtime.trt_library`.

Buffer discipline: per (profile, batch, H, W, text length) the input shapes are set,
the I/O buffers (torch CUDA tensors) are allocated and their addresses handed to
TensorRT once; each network call then only copies `t` and runs `execute_async_v3`.
The sampler keeps x in the bound x buffer (`input_buffer`). Every method that
enqueues CUDA work runs with the backend's device current (`--device cuda:1`).

TensorRT-RTX specialises kernels for each new shape before its first run (EAGER, so
every run of a shape uses the same kernels, see `_create_context`); they are kept in
`engine.runtime.cache` beside the plan (written atomically when the engine is
closed, reused on the next run, ignored with a note when it was made for another
GPU or library version).

`close()` releases the per-shape buffers and scratch memory and keeps the engine: the
backend stays usable, the next `bind()` allocates again (as ONNX Runtime's does).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import torch
from torch import Tensor

from ..engine_metadata import EngineMetadata
from ..errors import first_line
from ..io import atomic_write
from ..metadata import ModelMetadata
from ..precision import precision_problem
from ..sampler import MAX_STEPS, sample
from ..signature import IMAGE_CHANNELS, INPUT_NAMES, INPUTS, OUTPUT_NAMES
from ..trt_library import dims_tuple, last_errors, recording_logger, torch_dtype
from ..trt_plan import (  # re-exported: the plan checks were first defined here
    ONNX_FALLBACK,
    ProfileShapes,
    Shape,
    check_plan_compatibility,
    compute_capability_string,
    describe_invalidity,
    engine_metadata_path,
    load_engine_metadata,
    out_of_memory_line,
    probe_plan,
    profile_violation,
    require_tensorrt,
    runtime_cache_path,
    select_profile,
    shapes_text,
    union_ranges,
    why_engine_cannot_run,
    why_plan_cannot_run_here,
)
from .base import Backend, BackendError, OutOfDeviceMemory

if TYPE_CHECKING:
    import tensorrt as trt

    from ..cuda_graph import CapturedSampler
    from ..sampler import Noise

F = TypeVar("F", bound=Callable[..., Any])


def on_own_device(method: F) -> F:
    """Run a TensorRTBackend method with the backend's device current: TensorRT enqueues on
    the current device's streams and allocates there, so `--device cuda:1` needs it."""
    @functools.wraps(method)
    def wrapper(self: "TensorRTBackend", *args: Any, **kwargs: Any) -> Any:
        with torch.cuda.device(self.device):
            return method(self, *args, **kwargs)

    wrapper.runs_on_own_device = True  # type: ignore[attr-defined]  # checked by the tests
    return wrapper  # type: ignore[return-value]


class TensorRTBackend(Backend):
    """One deserialized engine, one execution context, buffers bound per shape and profile.

    `cuda_graph=True`: with TensorRT-RTX, its own whole-graph capture (each engine
    launch captured and replayed by the library); otherwise `sample` replays one captured
    CUDA graph per step (`pid_runtime.cuda_graph`).
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | Path, meta: ModelMetadata | None = None,
                 device: torch.device | str | None = None, *, cuda_graph: bool = False,
                 log: Callable[[str], None] | None = None, library: str | None = None):
        """`meta` defaults to the export's pid_export.json beside the plan; `device` to the
        current CUDA device; `log` receives notes and the library's warnings; `library` asks
        for one ("tensorrt"/"rtx"; default: $PID_TRT, else the one that built the plan)."""
        plan_path = Path(plan_path)
        problem = probe_plan(plan_path)
        if problem is not None:
            raise BackendError(problem)
        engine_meta = load_engine_metadata(plan_path)
        lib = require_tensorrt(engine_meta, library, plan_path.name)
        if not torch.cuda.is_available():
            raise BackendError(f"{lib.label} runs engines on a CUDA GPU and none is visible ({ONNX_FALLBACK})")
        if meta is None:
            from . import load_model_metadata

            meta = load_model_metadata(plan_path)
        dev = torch.device(device if device is not None else "cuda")
        if dev.type != "cuda":
            raise BackendError(f"{lib.label} runs on a CUDA device, not {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        super().__init__(meta, dev)
        self.library = lib
        self._note = log or (lambda message: None)
        precision = (engine_meta.precision if engine_meta is not None else None) or meta.precision
        problem = precision_problem(precision, compute_capability_string(dev), where=torch.cuda.get_device_name(dev))
        if problem is not None:  # e.g. an FP8 engine on an Ampere GPU: say so before the library fails
            raise BackendError(f"{plan_path}: {problem}")
        if engine_meta is not None:
            problem = check_plan_compatibility(engine_meta, lib.key, lib.version, compute_capability_string(dev))
            if problem is not None:
                raise BackendError(f"{plan_path}: {problem}")

        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = lib.module

        self._errors: list[str] = []
        self._logger = recording_logger(lib, self._errors, echo=log)
        self._cache_path = runtime_cache_path(plan_path)
        self._cache_blob = b""
        self._runtime_cache: Any = None
        with torch.cuda.device(dev):
            plan = plan_path.read_bytes()
            self._runtime = trt.Runtime(self._logger)
            self._check_validity(plan, plan_path, engine_meta)
            # The stubs say ICudaEngine, but a plan the library rejects gives None.
            engine: trt.ICudaEngine | None = self._runtime.deserialize_cuda_engine(plan)
            del plan
            if engine is None:
                raise BackendError(f"{plan_path} could not be loaded as a {lib.label} engine: "
                                   f"{last_errors(self._errors)}")
            if engine_meta is not None and engine_meta.stripped:
                self._refit(engine, plan_path.parent / engine_meta.onnx_name)  # a plain name: checked on load
            self._engine = engine
            self._dtypes, self._profiles = self._read_io(engine)
            # Per input: (min shape, max shape) over all optimization profiles (what some profile accepts).
            self.profile_ranges = union_ranges(self._profiles)
            self._library_captures = cuda_graph and lib.has_whole_graph_capture
            self._context = self._create_context(engine)
            self._stream = torch.cuda.Stream(dev)
        self.cuda_graph = cuda_graph
        self._profile_index = 0  # a new context starts on profile 0
        self._shape_key: tuple[Any, ...] | None = None
        self._buffers: dict[str, Tensor] = {}
        self._activations: Tensor | None = None  # TensorRT's scratch memory, sized per shape
        self._graphs: dict[int, CapturedSampler] = {}  # steps -> captured loop for the bound shape

    # -- loading ----------------------------------------------------------
    def _check_validity(self, plan: bytes, plan_path: Path, engine_meta: EngineMetadata | None) -> None:
        """TensorRT-RTX's cheap header check (version, compute capability, driver) before
        deserialising, so a misfit plan gets one sentence instead of a failed load."""
        lib = self.library
        if not lib.has_engine_validity:
            return
        validity, diagnostics = getattr(self._runtime, "get_engine_validity")(plan)
        flags = {name: int(value) for name, value in lib.module.EngineInvalidityDiagnostics.__members__.items()}
        if validity == lib.module.EngineValidity.INVALID:
            built = engine_meta.library_version if engine_meta is not None else None
            built_text = f" (built with {lib.label} {built}, this is {lib.version})" if built else ""
            raise BackendError(f"{plan_path} cannot run here: {describe_invalidity(int(diagnostics), flags)}"
                               f"{built_text}; rebuild it with pid-export")
        if validity == lib.module.EngineValidity.SUBOPTIMAL:
            self._note(f"note: {plan_path.name} runs here but not at its best: "
                       f"{describe_invalidity(int(diagnostics), flags)}")

    def _create_context(self, engine: "trt.ICudaEngine") -> "trt.IExecutionContext":
        """An execution context whose scratch memory we provide (sized per shape, not for the
        profile max); with TensorRT-RTX, its runtime cache and whole-graph capture attached."""
        lib = self.library
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = lib.module

        user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        eager = lib.eager_kernel_specialization
        if lib.has_runtime_cache or self._library_captures or eager is not None:
            config = engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(user_managed)
            if eager is not None:
                # TensorRT-RTX's default (LAZY) runs a generic kernel while the shape's specialised
                # one compiles in the background and swaps it in mid-decode: the first images and
                # `--verify` would come from kernels steady-state runs never use, and two runs of
                # one seed could differ. EAGER compiles before the first run of each new shape
                # (once: the runtime cache keeps them), so every run uses the same kernels.
                setattr(config, "dynamic_shapes_kernel_specialization_strategy", eager)
            if lib.has_runtime_cache:
                self._runtime_cache = self._load_runtime_cache(config)
            if self._library_captures:
                setattr(config, "cuda_graph_strategy", getattr(trt, "CudaGraphStrategy").WHOLE_GRAPH_CAPTURE)
            self._runtime_config = config  # must outlive the context
            context: trt.IExecutionContext | None = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context(user_managed)
        if context is None:
            raise BackendError(f"could not create an execution context: {last_errors(self._errors)}")
        return context

    def _load_runtime_cache(self, config: Any) -> Any:
        cache = config.create_runtime_cache()
        if self._cache_path.is_file():
            blob = self._cache_path.read_bytes()
            if cache.deserialize(blob):
                self._cache_blob = blob
            else:
                self._note(f"note: ignoring {self._cache_path.name}: it was made for another GPU or "
                           f"{self.library.label} version; kernels are compiled again and the cache rewritten")
        if not config.set_runtime_cache(cache):
            self._note(f"note: {self.library.label} did not accept a runtime cache; kernels are compiled each run")
            return None
        return cache

    def _save_runtime_cache(self) -> None:
        """Keep the kernels compiled this run for the next one (only when something changed)."""
        if self._runtime_cache is None:
            return
        blob = bytes(self._runtime_cache.serialize())
        if not blob or blob == self._cache_blob:
            return
        try:
            atomic_write(self._cache_path, lambda temp: temp.write_bytes(blob))
            self._cache_blob = blob
        except OSError as exc:
            self._note(f"note: cannot keep the runtime cache at {self._cache_path}: {exc.strerror or exc}")

    def _refit(self, engine: "trt.ICudaEngine", onnx_path: Path) -> None:
        """Fill a weight-stripped plan with the weights of the ONNX it was built from."""
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = self.library.module

        if not onnx_path.exists():
            raise BackendError(f"this engine was built without weights; it needs {onnx_path} "
                               f"(the ONNX it was built from) next to it")
        refitter = trt.Refitter(engine, self._logger)
        onnx_refitter = trt.OnnxParserRefitter(refitter, self._logger)
        if not onnx_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise BackendError(f"could not load the weights of {onnx_path} into the engine: "
                               f"{last_errors(self._errors)}")

    def _read_io(self, engine: "trt.ICudaEngine") -> tuple[dict[str, torch.dtype], list[ProfileShapes]]:
        if TYPE_CHECKING:
            import tensorrt as trt
        else:
            trt = self.library.module

        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        missing = [n for n in (*INPUT_NAMES, *OUTPUT_NAMES) if n not in names]
        if missing:
            raise BackendError(f"engine is not a PiD export: it lacks tensor(s) {', '.join(missing)}")
        dtypes = {name: torch_dtype(self.library, engine.get_tensor_dtype(name)) for name in names}
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        profiles: list[ProfileShapes] = []
        for index in range(engine.num_optimization_profiles):
            shapes: ProfileShapes = {}
            for name in inputs:
                low, opt, high = engine.get_tensor_profile_shape(name, index)
                shapes[name] = (dims_tuple(low), dims_tuple(opt), dims_tuple(high))
            profiles.append(shapes)
        return dtypes, profiles

    # -- binding ----------------------------------------------------------
    @on_own_device
    def bind(self, y: Tensor, lq_latent: Tensor, degrade_sigma: Tensor, height: int, width: int, *,
             profile: int | None = None) -> None:
        """The per-decode inputs, in the optimization profile whose opt is nearest (`select_profile`),
        or in `profile` (an index) when given: verify runs each profile at its own min, opt and max,
        also where two profiles share a size."""
        # The inputs given keep their own shapes (the profile check names a mismatch); x and t
        # follow from the batch and the output size.
        given = {"y": y, "lq_latent": lq_latent, "degrade_sigma": degrade_sigma}
        sizes = {"batch": int(lq_latent.shape[0]), "channels": IMAGE_CHANNELS, "height": height, "width": width}
        shapes: dict[str, Shape] = {spec.name: tuple(int(d) for d in given[spec.name].shape) if spec.name in given
                                    else spec.shape(sizes) for spec in INPUTS}
        if profile is None:
            profile = select_profile(shapes, self._profiles)
        else:
            if not 0 <= profile < len(self._profiles):
                raise BackendError(f"the engine has {len(self._profiles)} optimization profile(s); there is no "
                                   f"profile {profile + 1}")
            chosen = {name: (low, high) for name, (low, _opt, high) in self._profiles[profile].items()}
            problem = profile_violation(shapes, chosen)
            if problem is not None:
                raise BackendError(f"optimization profile {profile + 1}: {problem}")
        key = (profile, *(shapes[name] for name in INPUT_NAMES))
        if key != self._shape_key:
            self._allocate(profile, shapes)
            self._shape_key = key
        self._buffers["y"].copy_(y)
        self._buffers["lq_latent"].copy_(lq_latent)
        self._buffers["degrade_sigma"].copy_(degrade_sigma)

    def _allocate(self, profile: int, shapes: Mapping[str, Shape]) -> None:
        """Switch profile, set input shapes, allocate I/O buffers and scratch memory, hand addresses to TensorRT.

        Every failure is one BackendError line saying what to change; out of GPU memory is
        `OutOfDeviceMemory` (a BackendError), so callers that can try a smaller size tell it apart.
        """
        # Old buffers may still be in use by queued work, on our stream or a caller's (see _execute).
        torch.cuda.synchronize(self.device)
        self._graphs.clear()
        self._buffers = {}
        self._shape_key = None  # stays unset if anything below fails
        ctx = self._context
        if profile != self._profile_index:
            # The bindings raise RuntimeError on failure (their result is False only in older releases).
            try:
                switched = ctx.set_optimization_profile_async(profile, self._stream.cuda_stream)
            except RuntimeError as exc:
                switched = False
                self._errors.append(first_line(exc))
            if not switched:
                raise BackendError(f"could not switch to optimization profile {profile}: {last_errors(self._errors)}"
                                   f"; reopen the engine, or rebuild it with pid-export")
            self._stream.synchronize()
            self._profile_index = profile
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise BackendError(f"the engine rejected shape {list(shape)} for input {name}: "
                                   f"{last_errors(self._errors)}")
        try:
            unresolved = ctx.infer_shapes()
        except RuntimeError as exc:  # shape inference failed for another reason than a missing shape
            raise BackendError(f"the engine cannot run inputs of shapes {shapes_text(shapes)}: {first_line(exc)} "
                               f"({last_errors(self._errors)}); use another size or the export's model.onnx") from None
        if unresolved:
            raise BackendError(f"the engine could not infer shapes for {', '.join(unresolved)}")
        try:
            buffers = {name: torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                       for name, shape in shapes.items()}
            for name in OUTPUT_NAMES:
                shape = dims_tuple(ctx.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            for name, buffer in buffers.items():
                if not ctx.set_tensor_address(name, buffer.data_ptr()):
                    raise BackendError(f"the engine rejected the buffer of {name}: {last_errors(self._errors)}")
            # Scratch memory for these shapes only, not the profile's max (a 2K decode
            # with a 2K..4K engine should not hold 4K activations).
            needed = ctx.update_device_memory_size_for_shapes()
            if needed <= 0:  # the library's way of failing here; 1 byte would fail later, less clearly
                raise BackendError(f"the engine could not size its scratch memory for {shapes_text(shapes)}: "
                                   f"{last_errors(self._errors)}; reopen the engine, or rebuild it with pid-export")
            if self._activations is None or self._activations.numel() < needed:
                self._activations = None
                self._activations = torch.empty(needed, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:
            buffers, self._activations = {}, None
            torch.cuda.empty_cache()
            raise OutOfDeviceMemory(out_of_memory_line(shapes, self.device)) from None
        ctx.set_device_memory(self._activations.data_ptr(), self._activations.numel())
        self._buffers = buffers

    def input_buffer(self) -> Tensor | None:
        return self._buffers.get("x")

    # -- running ----------------------------------------------------------
    @on_own_device
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
            raise BackendError(f"engine execution failed: {last_errors(self._errors)}")

    @on_own_device
    def sample(self, noise: "Tensor | Noise", eps: Sequence[Tensor] | Tensor | None = None, steps: int = MAX_STEPS,
               on_step: Callable[[int, float], None] | None = None, out: Tensor | None = None) -> Tensor:
        """The sampler loop with x kept in the bound buffer (`noise`, `eps`, `out`: see
        `pid_runtime.sampler.sample`). With `cuda_graph`: TensorRT-RTX replays its own captured
        graph per engine launch; enterprise TensorRT replays one captured CUDA graph per step."""
        if not self._buffers:
            raise BackendError("TensorRTBackend.sample called before bind()")
        if not self.cuda_graph or self._library_captures:
            return sample(self.velocity, noise, eps, steps, x_buffer=self._buffers["x"], on_step=on_step, out=out)
        from ..cuda_graph import CapturedSampler

        graph = self._graphs.get(steps)
        if graph is None:
            graph = CapturedSampler(self.velocity, tuple(self._buffers["x"].shape), steps, self.device,
                                    x_buffer=self._buffers["x"])
            self._graphs[steps] = graph
        return graph(noise, eps, on_step=on_step, out=out)

    @on_own_device
    def close(self) -> None:
        """Release buffers and scratch memory (kept: the engine, so the backend can be bound again)."""
        if self._buffers:
            self._stream.synchronize()
        self._graphs.clear()
        self._buffers = {}
        self._shape_key = None  # the next bind() allocates again
        self._activations = None
        self._save_runtime_cache()
