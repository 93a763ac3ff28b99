"""ONNX Runtime backend: runs an exported model.onnx (CPU, or CUDA with onnxruntime-gpu).

The session is created once. On the CPU, inputs go through numpy views of the
torch tensors (no copies). On CUDA, an IOBinding points ONNX Runtime straight at
torch's device tensors, so nothing crosses to the host between steps.

ONNX Runtime's CPU provider has no bf16 kernels for most ops (Conv, MatMul) and few
fp16 ones, so on the CPU a bf16/fp16 export runs *widened*: its weights are widened
to float32 exactly and every op computes in float32 (`widened_model`). The image is
then that of the float32 network with the export's rounded weights, slightly closer to
the float32 reference than an engine's; reduced precision only pays off on a GPU anyway.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import first_line
from ..metadata import INPUT_NAMES, OUTPUT_NAMES
from ..signals import cancel_on_signal
from .base import Backend, BackendError, load_model_metadata, resolve_device

CUDA_PROVIDER = "CUDAExecutionProvider"
# Largest widened model handed to ONNX Runtime as bytes (protobuf's limit is 2 GiB); larger
# ones are written with their weights beside them in a temporary directory the backend owns.
IN_MEMORY_LIMIT = 1 << 30
GPU_HINT = "pip install 'pid-export[gpu]' (onnxruntime-gpu)"


def onnxruntime_module() -> Any:
    """The `onnxruntime` module, or a BackendError saying how to install it."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise BackendError("ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    return ort


def session_device(device: str | torch.device | None = None) -> torch.device:
    """Where an ONNX Runtime session runs: None/"auto" is the current CUDA device when ONNX Runtime
    has its CUDA provider (and torch a GPU), else the CPU; a CUDA device without the provider is refused."""
    has_cuda_provider = CUDA_PROVIDER in onnxruntime_module().get_available_providers()
    if device is None or str(device) == "auto":
        return resolve_device("auto") if has_cuda_provider else torch.device("cpu")
    run_device = resolve_device(device)
    if run_device.type == "cuda" and not has_cuda_provider:
        raise BackendError(f"device {device} needs ONNX Runtime's CUDA provider: {GPU_HINT}")
    return run_device


def create_session(model: str | os.PathLike[str] | bytes, device: torch.device, *, threads: int | None = None,
                   fuse_qdq: bool = True, name: str | os.PathLike[str] | None = None) -> Any:
    """The one ONNX Runtime session set-up of the project (pid-run, --verify's reference, the FP8 guard).

    `model`: a file, or a serialized model. `device` (see `session_device`): the CUDA provider on
    that GPU with the CPU's after it, or the CPU's alone. Logging is errors only (shape-inference
    chatter would drown the timings). `threads`: intra-op threads (default: ONNX Runtime's
    choice, all cores; a serving replica sets its share) and one inter-op thread.
    `fuse_qdq=False` runs Q/DQ pairs as written (fake quantisation) instead of fusing them into
    ONNX Runtime's integer/FP8 kernels. `name` is the model in messages (default: `model`).
    A failure is one BackendError line.
    """
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise BackendError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if device.type == "cuda":
        providers: list[Any] = [(CUDA_PROVIDER, {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
        shown = name if name is not None else ("the model" if isinstance(model, bytes) else model)
        raise BackendError(f"ONNX Runtime cannot load {shown}: {first_line(exc)}") from None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    onnx_path: Path  # always set: the model this backend runs

    def __init__(self, onnx_path: str | os.PathLike[str], device: str | torch.device | None = None,
                 threads: int | None = None):
        """`threads`: ONNX Runtime's intra-op threads (default: its own choice, all cores); a serving
        replica or batch actor sets its share of the cores so replicas do not oversubscribe them."""
        self._ort = onnxruntime_module()
        self.onnx_path = Path(onnx_path)
        meta = load_model_metadata(self.onnx_path)
        super().__init__(meta, session_device(device))
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.widened = self.device.type == "cpu" and has_low_precision(self.onnx_path)
        try:
            model = self._widened_source() if self.widened else self.onnx_path
        except BackendError:
            raise
        except Exception as exc:  # onnx's own errors on a damaged file or its weights
            raise BackendError(f"ONNX Runtime cannot load {self.onnx_path}: {first_line(exc)}") from None
        self.session = create_session(model, self.device, threads=threads, name=self.onnx_path)
        names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(INPUT_NAMES) or list(outputs) != list(OUTPUT_NAMES):
            raise BackendError(f"{self.onnx_path} is not a PiD export: inputs {names}, outputs {outputs} "
                               f"(expected {list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)})")
        self._fixed: dict[str, Tensor] = {}
        self._binding = None
        self._out: Tensor | None = None

    def _widened_source(self) -> bytes | str:
        """The model widened to float32: serialized, or a file in the backend's own temporary directory."""
        import onnx

        model = widened_model(onnx.load(str(self.onnx_path)))
        if model.ByteSize() < IN_MEMORY_LIMIT:
            return model.SerializeToString()
        self._workdir = tempfile.TemporaryDirectory(prefix="pid-widened-")
        path = Path(self._workdir.name) / "model.onnx"
        try:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
        except OSError as exc:
            raise BackendError(f"cannot widen {self.onnx_path} to float32 for the CPU in {self._workdir.name}: "
                               f"{exc.strerror or exc} (set TMPDIR to a roomier disk)") from None
        return str(path)

    def bind(self, y: Tensor, lq_latent: Tensor, degrade_sigma: Tensor, height: int, width: int) -> None:
        as_input = {"y": y, "lq_latent": lq_latent, "degrade_sigma": degrade_sigma}
        self._fixed = {name: t.detach().to(self.device, torch.float32).contiguous() for name, t in as_input.items()}
        if self.device.type == "cuda":
            batch = lq_latent.shape[0]
            self._out = torch.empty((batch, 3, height, width), device=self.device, dtype=torch.float32)
            self._binding = self.session.io_binding()
            for name, tensor in self._fixed.items():
                self._bind_cuda(name, tensor, is_output=False)
            self._bind_cuda(OUTPUT_NAMES[0], self._out, is_output=True)

    def _bind_cuda(self, name: str, tensor: Tensor, is_output: bool) -> None:
        assert self._binding is not None
        bind = self._binding.bind_output if is_output else self._binding.bind_input
        bind(name, "cuda", tensor.device.index or 0, np.float32, tuple(tensor.shape), tensor.data_ptr())

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        if not self._fixed:
            raise BackendError("velocity() called before bind()")
        x = x.detach().to(self.device, torch.float32).contiguous()
        t = t.detach().to(self.device, torch.float32).contiguous()
        try:
            if self.device.type == "cuda":
                return self._velocity_cuda(x, t)
            feeds = {name: tensor.numpy() for name, tensor in self._fixed.items()}
            feeds["x"], feeds["t"] = x.numpy(), t.numpy()
            run_options = self._ort.RunOptions()
            with cancel_on_signal(lambda: setattr(run_options, "terminate", True)):  # Ctrl-C ends the step now
                (out,) = self.session.run(list(OUTPUT_NAMES), feeds, run_options)
        except BackendError:
            raise
        except Exception as exc:  # a shape the export does not cover, provider failure, ...
            raise BackendError(f"ONNX Runtime failed on {self.onnx_path}: {first_line(exc)}") from None
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _velocity_cuda(self, x: Tensor, t: Tensor) -> Tensor:
        assert self._binding is not None and self._out is not None
        self._bind_cuda("x", x, is_output=False)
        self._bind_cuda("t", t, is_output=False)
        # ONNX Runtime runs on its own stream: torch's pending writes to x/t must land first.
        torch.cuda.current_stream(self.device).synchronize()
        run_options = self._ort.RunOptions()
        with cancel_on_signal(lambda: setattr(run_options, "terminate", True)):
            self.session.run_with_iobinding(self._binding, run_options)
        self._binding.synchronize_outputs()
        return self._out

    def close(self) -> None:
        """Release the bound inputs; the session is kept, so a later `bind` works again."""
        self._fixed = {}
        self._binding = None
        self._out = None


LOW_PRECISION_NAMES = ("BFLOAT16", "FLOAT16")


def has_low_precision(onnx_path: Path) -> bool:
    """Whether the graph stores bf16/fp16 weights or casts to them (read without its weights)."""
    import onnx

    low = {getattr(onnx.TensorProto, name) for name in LOW_PRECISION_NAMES}
    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(init.data_type in low for init in model.graph.initializer) or any(
        attr.name == "to" and attr.i in low for node in model.graph.node if node.op_type == "Cast"
        for attr in node.attribute)


def widened_model(model: Any) -> Any:
    """`model` (an onnx.ModelProto, changed in place) computing in float32: bf16/fp16 weights and
    constants widened exactly, casts to bf16/fp16 made casts to float32. FP8 weights and their
    DequantizeLinear stay (ONNX Runtime's CPU runs those), with float32 results."""
    import onnx
    from onnx import numpy_helper

    low = {getattr(onnx.TensorProto, name) for name in LOW_PRECISION_NAMES}
    wide = onnx.TensorProto.FLOAT

    def widen(tensor: Any) -> None:
        if tensor.data_type in low:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    graph = model.graph
    for init in graph.initializer:
        widen(init)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            elif attr.i in low and ((node.op_type == "Cast" and attr.name == "to")
                                    or (node.op_type == "DequantizeLinear" and attr.name == "output_dtype")):
                attr.i = wide
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type in low:
            value.type.tensor_type.elem_type = wide
    del graph.value_info[:]  # recorded low-precision types would contradict the widened ops
    return model
