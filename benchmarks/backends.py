"""The backends the harness times, behind one small interface.

Each `BenchBackend` turns the shared fp32 `PidNet` (or an export of it) into a
`velocity(x, t)` for one output size. `prepare` does the per-size work that is
not part of a decode (exporting, loading an engine) and is timed apart; lazy
work done on the first call (torch.compile, ONNX Runtime's first run) shows up
in the harness's first-call time.

    torch-eager    PidNet as is: bf16/fp16 autocast on the GPU, fp32 on the CPU (or, given a
                   network with bf16 weights and autocast=False, what a bf16 export computes)
    torch-compile  torch.compile(PidNet) (mode default or max-autotune), same precision rule
    onnxruntime    pid_runtime's ONNX Runtime backend on an export of the same weights
    tensorrt       pid_runtime's TensorRT backend on a prebuilt engine (--engine)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from pid_export.network import PidNet
from pid_runtime.decode import DecodeInputs  # the runtime's checked, batch-aligned inputs

BACKEND_NAMES = ("torch-eager", "torch-compile", "onnxruntime", "tensorrt")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class BackendSkipped(Exception):
    """This backend cannot run here; the message says why (it becomes the record's reason)."""


class BenchBackend:
    name = "base"
    export_s: float | None = None  # seconds of `prepare` spent exporting, where it exports

    def __init__(self, net: PidNet, device: torch.device, precision: str):
        self.net = net
        self.device = device
        self.precision = precision

    def prepare(self, inputs: DecodeInputs) -> None:
        """Per-size setup outside the decode (export, engine load). Raise BackendSkipped to skip."""

    def velocity_fn(self, inputs: DecodeInputs) -> Callable[[Tensor, Tensor], Tensor]:
        raise NotImplementedError

    def input_buffer(self) -> Tensor | None:
        return None

    def close(self) -> None:
        pass


class TorchEager(BenchBackend):
    """`net` as is, under autocast to `precision` (bf16/fp16) unless `autocast=False` (then the
    network's parameter dtypes decide: see `pid_export.precision.apply_precision`)."""

    name = "torch-eager"

    def __init__(self, net: PidNet, device: torch.device, precision: str, *, autocast: bool = True,
                 name: str | None = None):
        super().__init__(net, device, precision)
        self.autocast = autocast
        if name is not None:
            self.name = name

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None or not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _module(self) -> Callable:
        return self.net

    def velocity_fn(self, inputs: DecodeInputs) -> Callable[[Tensor, Tensor], Tensor]:
        module = self._module()

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            with torch.inference_mode(), self._autocast():
                return module(x, t, inputs.caption, inputs.latents, inputs.sigma)

        return velocity


class TorchCompile(TorchEager):
    """torch.compile with static shapes (`mode`: default, max-autotune, ...): each output size
    compiles once, on its first call."""

    name = "torch-compile"

    def __init__(self, net: PidNet, device: torch.device, precision: str, *, autocast: bool = True,
                 name: str | None = None, mode: str = "default"):
        super().__init__(net, device, precision, autocast=autocast, name=name)
        self.mode = mode
        self._compiled: Callable | None = None

    def prepare(self, inputs: DecodeInputs) -> None:
        # A fresh wrapper per size, so each size is timed with its own compile on the first call.
        torch._dynamo.reset()
        self._compiled = torch.compile(self.net, dynamic=False, mode=self.mode)

    def _module(self) -> Callable:
        assert self._compiled is not None
        return self._compiled

    def close(self) -> None:
        self._compiled = None
        torch._dynamo.reset()


class RuntimeBackend(BenchBackend):
    """A pid_runtime backend (ONNX Runtime / TensorRT) opened on an exported model."""

    def __init__(self, net: PidNet, device: torch.device, precision: str, model_path: Path | None):
        super().__init__(net, device, precision)
        self.model_path = model_path
        self._backend = None

    def _open(self, path: Path, trt: str | None = None):
        try:
            from pid_runtime.backends import BackendError, open_backend
        except ImportError as exc:
            raise BackendSkipped(f"pid_runtime.backends.open_backend is unavailable ({exc})") from None
        try:
            return open_backend(path, device=self.device, trt=trt)
        except BackendError as exc:
            raise BackendSkipped(str(exc)) from None

    def velocity_fn(self, inputs: DecodeInputs) -> Callable[[Tensor, Tensor], Tensor]:
        assert self._backend is not None
        self._backend.bind(inputs.caption, inputs.latents, inputs.sigma, inputs.height, inputs.width)
        backend = self._backend
        return lambda x, t: backend.velocity(x, t)

    def input_buffer(self) -> Tensor | None:
        return self._backend.input_buffer() if self._backend is not None else None

    @property
    def model_precision(self) -> str | None:
        """The opened export's own precision (an --engine / --onnx export may be fp8)."""
        return self._backend.meta.precision if self._backend is not None else None

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class OnnxRuntime(RuntimeBackend):
    """ONNX Runtime on `--onnx DIR` if given, else on a fresh static-shape export per size.

    A static export fixes the caption length at the exporter's trace length, so the
    harness's caption length must match it (the quick mode's configuration does).
    """

    name = "onnxruntime"

    def __init__(self, net: PidNet, device: torch.device, precision: str, model_path: Path | None,
                 work_dir: Path):
        super().__init__(net, device, precision, model_path)
        self.work_dir = work_dir

    def prepare(self, inputs: DecodeInputs) -> None:
        self.close()
        path = self.model_path
        if path is None:
            path = self._export(inputs)
        self._backend = self._open(path)

    def _export(self, inputs: DecodeInputs) -> Path:
        try:
            from pid_export.pipeline import LoadedNetwork, export_network
        except ImportError as exc:
            raise BackendSkipped(f"pid_export.pipeline is unavailable ({exc}); pass --onnx DIR") from None
        height, width = inputs.height, inputs.width
        out_dir = self.work_dir / f"onnx-{self.precision}-b{inputs.batch}-{height}x{width}"
        # torch.onnx logs a warning per torchvision op it cannot register: noise here.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        start = time.perf_counter()
        # The export casts the network it is given in place: export a copy.
        result = export_network(LoadedNetwork(copy.deepcopy(self.net).cpu(), None, None), out_dir, self.precision,
                                static_shape=(inputs.batch, height, width))
        self.export_s = time.perf_counter() - start
        y_shape = next((i["shape"] for i in result.metadata.inputs if i["name"] == "y"), None)
        text_len = inputs.caption.shape[1]
        if y_shape is not None and isinstance(y_shape[1], int) and y_shape[1] != text_len:
            raise BackendSkipped(f"the static export fixes the caption length at {y_shape[1]} tokens but the "
                                 f"benchmark feeds {text_len}: pass --text-len {y_shape[1]} or --onnx DIR "
                                 "(a dynamic export)")
        return out_dir


class TensorRT(RuntimeBackend):
    name = "tensorrt"

    def __init__(self, net: PidNet, device: torch.device, precision: str, model_path: Path | None,
                 library: str | None = None):
        """`library`: "tensorrt" | "rtx" (a plan built by the other one is skipped, never timed
        under this row's name); None: the library that built the plan."""
        super().__init__(net, device, precision, model_path)
        self.library = library

    def prepare(self, inputs: DecodeInputs) -> None:
        if self.model_path is None:
            raise BackendSkipped("no TensorRT engine given (--engine DIR_OR_PLAN)")
        if self.device.type != "cuda":
            raise BackendSkipped("TensorRT needs a CUDA GPU")
        if self._backend is None:  # one engine serves every size inside its profile
            self._backend = self._open(self.model_path, self.library)


def make_backend(name: str, net: PidNet, device: torch.device, precision: str, *,
                 onnx_path: Path | None, engine_path: Path | None, work_dir: Path) -> BenchBackend:
    if name == "torch-eager":
        return TorchEager(net, device, precision)
    if name == "torch-compile":
        return TorchCompile(net, device, precision)
    if name == "onnxruntime":
        return OnnxRuntime(net, device, precision, onnx_path, work_dir)
    if name == "tensorrt":
        return TensorRT(net, device, precision, engine_path)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
