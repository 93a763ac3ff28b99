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
from . import load_model_metadata, resolve_device
from .base import Backend, BackendError

CUDA_PROVIDER = "CUDAExecutionProvider"
# Largest widened model handed to ONNX Runtime as bytes (protobuf's limit is 2 GiB); larger
# ones are written with their weights beside them in a temporary directory the backend owns.
IN_MEMORY_LIMIT = 1 << 30
GPU_HINT = "pip install 'pid-export[gpu]' (onnxruntime-gpu)"


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike[str], device: str | torch.device | None = None,
                 threads: int | None = None):
        """`threads`: ONNX Runtime's intra-op threads (default: its own choice, all cores); a serving
        replica or batch actor sets its share of the cores so replicas do not oversubscribe them."""
        try:
            import onnxruntime as ort
        except ModuleNotFoundError:
            raise BackendError("ONNX Runtime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None

        self._ort = ort
        self.onnx_path = Path(onnx_path)
        meta = load_model_metadata(self.onnx_path)
        has_cuda_provider = CUDA_PROVIDER in ort.get_available_providers()
        if device is None or str(device) == "auto":
            run_device = resolve_device("auto") if has_cuda_provider else torch.device("cpu")
        else:
            run_device = resolve_device(device)
            if run_device.type == "cuda" and not has_cuda_provider:
                raise BackendError(f"device {device} needs ONNX Runtime's CUDA provider: {GPU_HINT}")
        super().__init__(meta, run_device)

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: shape-inference chatter would drown the timings
        if threads is not None:
            if threads < 1:
                raise BackendError(f"threads must be at least 1, got {threads}")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if run_device.type == "cuda":
            providers: list = [(CUDA_PROVIDER, {"device_id": run_device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.widened = run_device.type == "cpu" and has_low_precision(self.onnx_path)
        try:
            model: Any = str(self.onnx_path)
            if self.widened:
                model = self._widened_source()
            self.session = ort.InferenceSession(model, options, providers=providers)
        except BackendError:
            raise
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            raise BackendError(f"ONNX Runtime cannot load {self.onnx_path}: {first_line(exc)}") from None
        names = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(INPUT_NAMES) or list(outputs) != list(OUTPUT_NAMES):
            raise BackendError(f"{self.onnx_path} is not a PiD export: inputs {names}, outputs {outputs} "
                               f"(expected {list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)})")
        self._fixed: dict[str, Tensor] = {}
        self._binding = None
        self._out: Tensor | None = None

    def _widened_source(self) -> bytes | str:
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
