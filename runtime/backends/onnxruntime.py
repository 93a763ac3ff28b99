"""ONNX Runtime backend: runs an exported model.onnx (CPU, or CUDA with onnxruntime-gpu).

The session is created once. On the CPU, inputs go through numpy views of the
torch tensors (no copies). On CUDA, an IOBinding points ONNX Runtime straight at
torch's device tensors, so nothing crosses to the host between steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import first_line
from ..metadata import INPUT_NAMES, OUTPUT_NAMES
from . import load_model_metadata, resolve_device
from .base import Backend, BackendError

CUDA_PROVIDER = "CUDAExecutionProvider"
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
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
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
            (out,) = self.session.run(list(OUTPUT_NAMES), feeds)
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
        self.session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        return self._out

    def close(self) -> None:
        self._fixed = {}
        self._binding = None
        self._out = None
